"""PEFT's prefix tuning (Li & Liang 2021, ``PrefixTuningConfig``) as a config plus pure functions.

Learned key/value prefixes of ``num_virtual_tokens`` positions for every attention layer, handed to
the model as its initial KV cache (PEFT's ``get_prompt``): a table ``P`` ``(n, num_layers * 2 * token_dim)``
(or, with ``prefix_projection``, ``E`` ``(n, token_dim)`` through ``Linear -> Tanh -> Linear``) is viewed as
``(n, num_layers * 2, heads, head_dim)`` and split into each layer's keys and values, which fill the call's
empty cache (or a fresh ``DynamicCache``); ``attention_mask`` gets ``n`` ones in front and ``position_ids``
(when given) are shifted by ``n``.  A call whose cache holds tokens already is a decoding step (see
:mod:`.calls`: task types, caches, generation).  With grouped-query attention ``token_dim`` and
``num_attention_heads`` are the KV heads' (as PEFT's ``_prepare_prompt_learning_config`` sets them).

Param names (PEFT's in-memory names): ``prompt_encoder.<adapter>.embedding.weight`` and, with
``prefix_projection``, ``prompt_encoder.<adapter>.transform.{0,2}.{weight,bias}``.  PEFT saves the
encoder's output (``prompt_embeddings``); such a checkpoint loads as the table alone (*encoded*).
Refused with ``ConfigError``: models whose cache PEFT builds specially (Gemma 2/3/4, Bloom), models whose
forward takes no cache, static caches.  No merged form; no per-sample adapters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ...core.params import TunerParams
from ...core.routing import Routes, ensure_slots
from ...errors import ConfigError, ParamsMismatchError
from ..base import CallContext, KeyNaming, Tuner, TunerConfig
from . import calls, common, heads

__all__ = ["PEFT_FORMAT", "PrefixTuningConfig", "encode", "init", "routes", "tuner", "validate"]

_SPECIAL_CACHE = ("gemma2", "gemma3", "gemma4", "bloom")  # PEFT builds their caches its own way


@dataclass(frozen=True, eq=False)
class PrefixTuningConfig(TunerConfig):
    """PEFT's ``PrefixTuningConfig`` fields and defaults (peft 0.21); model fields filled at ``init``."""

    num_virtual_tokens: Any = None
    token_dim: Any = None
    num_transformer_submodules: Any = None
    num_attention_heads: Any = None
    num_layers: Any = None
    modules_to_save: Any = None
    init_weights: Any = None
    encoder_hidden_size: Any = None
    prefix_projection: bool = False
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    auto_mapping: Any = None
    peft_version: Any = None
    swift_type: str = "PREFIX_TUNING"
    peft_type: str = "PREFIX_TUNING"

    def check(self, *, complete: bool = True) -> None:
        """Field checks naming the field (:func:`.common.check_common` plus prefix tuning's own)."""
        common.check_common(self, complete)
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}")
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(
                f"PrefixTuningConfig.prefix_projection must be True or False, got {self.prefix_projection!r}"
            )
        if self.encoder_hidden_size is not None and (
            isinstance(self.encoder_hidden_size, bool)
            or not isinstance(self.encoder_hidden_size, int)
            or self.encoder_hidden_size <= 0
        ):
            raise ConfigError(
                f"PrefixTuningConfig.encoder_hidden_size must be a positive int, got {self.encoder_hidden_size!r}"
            )


def _model_fields(model: nn.Module, config: PrefixTuningConfig) -> dict[str, Any]:
    """PEFT's ``_prepare_prompt_learning_config`` for prefix tuning (KV heads' width under grouped-query attention)."""
    out = common.fill_from_model(model, config)
    mc = getattr(model, "config", None)
    if mc is not None and hasattr(mc, "get_text_config"):
        mc = mc.get_text_config()
    model_type = str(getattr(mc, "model_type", ""))
    if any(model_type.startswith(t) for t in _SPECIAL_CACHE):
        raise ConfigError(
            f"prefix tuning on a {model_type!r} model is not implemented natively (PEFT builds its cache specially);"
            " run it through peft"
        )
    token_dim = out.get("token_dim", config.token_dim)
    n_heads = out.get("num_attention_heads", config.num_attention_heads)
    kv_heads = getattr(mc, "num_key_value_heads", None)
    if kv_heads is not None:
        head_dim = getattr(mc, "head_dim", None) or token_dim // n_heads
        out["token_dim"], out["num_attention_heads"] = int(head_dim) * int(kv_heads), int(kv_heads)
    if config.encoder_hidden_size is None:
        out["encoder_hidden_size"] = out.get("token_dim", config.token_dim)
    return out


def _transform_keys(adapter: str) -> list[str]:
    return [f"prompt_encoder.{adapter}.transform.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]


def init(
    model: nn.Module, config: PrefixTuningConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh prefix params (float32): PEFT's ``PrefixEncoder`` shapes, ``nn.Embedding`` / ``nn.Linear`` init laws."""
    if not isinstance(config, PrefixTuningConfig):
        raise ConfigError(f"prefix_tuning.init needs a PrefixTuningConfig, got {type(config).__name__}")
    config.check()
    config = dataclasses.replace(config, **_model_fields(model, config))
    device = cast(torch.Tensor, common.word_embeddings(model).weight).device
    n, d, layers, h = (
        int(config.num_virtual_tokens),
        int(config.token_dim),
        int(config.num_layers),
        int(config.encoder_hidden_size),
    )
    zero = config.init_weights == "zero"
    tensors: dict[str, torch.Tensor] = {}
    key = common.embedding_key(adapter_name)
    if config.prefix_projection and not config.inference_mode:
        tensors[key] = torch.randn(n, d, generator=generator)
        keys = _transform_keys(adapter_name)
        for j, (d_in, d_out) in enumerate(((d, h), (h, layers * 2 * d))):
            bound = 1.0 / math.sqrt(d_in)
            w = torch.empty(d_out, d_in).uniform_(-bound, bound, generator=generator)
            b = torch.empty(d_out).uniform_(-bound, bound, generator=generator)
            if zero and j == 1:
                w, b = torch.zeros_like(w), torch.zeros_like(b)
            tensors[keys[2 * j]], tensors[keys[2 * j + 1]] = w, b
    else:
        tensors[key] = torch.zeros(n, layers * 2 * d) if zero else torch.randn(n, layers * 2 * d, generator=generator)
    tensors = {**tensors, **heads.copies(model, config, adapter_name)}
    return TunerParams({k: v.to(device) for k, v in tensors.items()}, config, adapter_name)


def encode(state: Mapping[str, torch.Tensor], adapter_name: str) -> torch.Tensor:
    """The flat prefixes ``(n, num_layers * 2 * token_dim)``: the projection applied, or the table itself. Pure."""
    x = state[common.embedding_key(adapter_name)]
    keys = _transform_keys(adapter_name)
    if keys[0] not in state:
        return x
    x = torch.tanh(F.linear(x, state[keys[0]], state[keys[1]]))
    return F.linear(x, state[keys[2]], state[keys[3]])


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` unless the params have PEFT's ``PrefixEncoder`` shapes for their config."""
    cfg, name = params.config, params.adapter_name
    key = common.embedding_key(name)
    n, d, layers = cfg.num_virtual_tokens, cfg.token_dim, cfg.num_layers
    if key not in params:
        raise ParamsMismatchError(f"prefix tuning params lack {key!r}")
    own, copies = heads.split(params)
    heads.validate_heads(model, copies, name)
    extra = set(own) - {key}
    keys = _transform_keys(name)
    if extra and extra != set(keys):
        raise ParamsMismatchError(f"prefix tuning params: unexpected {sorted(extra - set(keys))[:4]}, need {keys}")
    h = int(params[keys[0]].shape[0]) if extra else 0
    want: dict[str, tuple[int, ...]] = {key: (n, d if extra else layers * 2 * d)}
    if extra:
        want.update({keys[0]: (h, d), keys[1]: (h,), keys[2]: (layers * 2 * d, h), keys[3]: (layers * 2 * d,)})
    for k, shape in want.items():
        if tuple(params[k].shape) != shape:
            raise ParamsMismatchError(f"params[{k!r}] has shape {tuple(params[k].shape)}, expected {shape}")
    mc = getattr(model, "config", None)
    if mc is not None and getattr(mc, "num_hidden_layers", layers) != layers:
        raise ParamsMismatchError(f"prefix tuning params are for {layers} layers; the model has {mc.num_hidden_layers}")


def _layers(
    flat: torch.Tensor, batch: int, cfg: PrefixTuningConfig, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's ``get_prompt`` for one transformer stack: each layer's keys and values ``(batch, heads, n, head_dim)``."""
    n, layers, heads_ = int(cfg.num_virtual_tokens), int(cfg.num_layers), int(cfg.num_attention_heads)
    kv = flat.to(dtype).unsqueeze(0).expand(batch, -1, -1)
    kv = kv.reshape(batch, n, layers * 2, heads_, int(cfg.token_dim) // heads_).permute(2, 0, 3, 1, 4)
    return [(layer[0], layer[1]) for layer in torch.split(kv, 2)]


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """A pre slot on the model that hands it the prefixes as its initial cache (PEFT's forward and generation)."""
    validate(model, params)
    ensure_slots([model], pre=True)
    # the tensors, not the TunerParams: functional's route cache holds params weakly and drops routes with them
    state, cfg, name = heads.split(params)[0], params.config, params.adapter_name
    n, task = int(cfg.num_virtual_tokens), str(cfg.task_type)

    def slot(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        dtype = getattr(module, "dtype", None) or torch.float32

        def layers_of(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return _layers(encode(state, name), batch, cfg, dtype)

        return (), calls.prefix_call(
            module, common.as_kwargs(module, args, kwargs), n, task, layers_of, "prefix tuning"
        )

    return common.with_heads(model, params, Routes(forward={}, pre={model: [slot]}))


PEFT_FORMAT = common.peft_format("PREFIX_TUNING", "prefix tuning", encode)

tuner = Tuner(
    swift_type="PREFIX_TUNING",
    config_cls=PrefixTuningConfig,
    init=init,
    routes=routes,
    validate=validate,
    key_naming=KeyNaming(after=("prompt_encoder",)),
    peft=PEFT_FORMAT,
    generation=calls.generating,
)
