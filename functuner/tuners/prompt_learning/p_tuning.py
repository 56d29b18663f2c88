"""PEFT's P-tuning (Liu et al. 2021, ``PromptEncoderConfig``) as a config plus pure functions.

A table ``E`` ``(num_virtual_tokens, token_dim)`` is re-parameterized by an encoder, and the
encoder's output is prepended to the input embeddings (see :mod:`.common` for the forward).
Encoder (PEFT's ``PromptEncoder``): ``MLP`` = ``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU ->
Linear(h, d)`` with ``h = encoder_hidden_size`` (``encoder_num_layers`` other than 2 is refused: PEFT ignores
it with a warning); ``LSTM`` = a bidirectional ``encoder_num_layers``-layer LSTM of hidden size ``h``
(``encoder_dropout`` between its layers in training, one mask for the whole batch) then ``Linear(2h, 2h) ->
ReLU -> Linear(2h, d)``.  The LSTM is written out (gates ``i, f, g, o`` as ``nn.LSTM``), so it is a pure
function of the params that ``torch.func.grad`` / ``vmap`` go through.

Param names (PEFT's in-memory names): ``prompt_encoder.<adapter>.embedding.weight``,
``prompt_encoder.<adapter>.mlp_head.{0,2,4}.{weight,bias}`` (LSTM: ``mlp_head.{0,2}`` and
``lstm_head.{weight_ih,weight_hh,bias_ih,bias_hh}_l<k>[_reverse]``).  Params holding the table alone are
*encoded* (PEFT's ``inference_mode``): the table is used as it is.  PEFT saves the encoder's output
as ``prompt_embeddings``, so a P-tuning checkpoint (PEFT's or ours in PEFT's layout) loads as
encoded params; training such params trains the table directly (PEFT would instead feed the saved
output through a fresh random encoder).  Initial values use only the generator (PEFT: ``nn.Linear``'s /
``nn.Embedding``'s defaults from the global RNG).  No merged form; no per-sample adapters.
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
from ...core.routing import Routes
from ...errors import ConfigError, ParamsMismatchError
from ..base import CallContext, KeyNaming, Tuner, TunerConfig
from . import calls, common, heads

__all__ = ["PEFT_FORMAT", "PromptEncoderConfig", "encode", "init", "routes", "tuner", "validate"]

_LAYERS = (0, 2, 4)  # the Linear layers of PEFT's mlp_head Sequential (ReLUs at 1 and 3)
_LSTM_MLP = (0, 2)  # the LSTM encoder's mlp_head: Linear, ReLU, Linear


@dataclass(frozen=True, eq=False)
class PromptEncoderConfig(TunerConfig):
    """PEFT's ``PromptEncoderConfig`` fields and defaults (peft 0.21).

    ``num_virtual_tokens`` is required; ``token_dim`` and the other model fields are filled from
    the model at ``init``; ``encoder_hidden_size`` defaults to ``token_dim`` there (PEFT's
    ``_prepare_prompt_learning_config`` does the same).  ``task_type``: see :mod:`.calls`.
    """

    num_virtual_tokens: Any = None
    token_dim: Any = None
    num_transformer_submodules: Any = None
    num_attention_heads: Any = None
    num_layers: Any = None
    modules_to_save: Any = None
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Any = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    auto_mapping: Any = None
    peft_version: Any = None
    swift_type: str = "P_TUNING"
    peft_type: str = "P_TUNING"

    def check(self, *, complete: bool = True) -> None:
        """Field checks naming the field (:func:`.common.check_common` plus the encoder's)."""
        common.check_common(self, complete)
        kind = self.encoder_reparameterization_type
        if kind not in ("MLP", "LSTM"):
            raise ConfigError(f"PromptEncoderConfig.encoder_reparameterization_type={kind!r}: expected 'MLP' or 'LSTM'")
        if self.encoder_hidden_size is not None and (
            isinstance(self.encoder_hidden_size, bool)
            or not isinstance(self.encoder_hidden_size, int)
            or self.encoder_hidden_size <= 0
        ):
            raise ConfigError(
                f"PromptEncoderConfig.encoder_hidden_size must be a positive int, got {self.encoder_hidden_size!r}"
            )
        layers = self.encoder_num_layers
        if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
            raise ConfigError(f"PromptEncoderConfig.encoder_num_layers must be a positive int, got {layers!r}")
        if kind == "MLP" and layers != 2:
            raise ConfigError(
                f"PromptEncoderConfig.encoder_num_layers={layers!r}: the MLP encoder has exactly 2 hidden layers"
                " (PEFT ignores other values with a warning); leave it at 2, or use encoder_reparameterization_type='LSTM'"
            )
        if not isinstance(self.encoder_dropout, (int, float)) or isinstance(self.encoder_dropout, bool):
            raise ConfigError(f"PromptEncoderConfig.encoder_dropout must be a number, got {self.encoder_dropout!r}")


def _mlp_keys(adapter: str, layers: tuple[int, ...] = _LAYERS) -> list[str]:
    return [f"prompt_encoder.{adapter}.mlp_head.{i}.{p}" for i in layers for p in ("weight", "bias")]


def _lstm_keys(adapter: str, num_layers: int) -> list[str]:
    """``nn.LSTM``'s parameter names, in its order (per layer: forward then reverse direction)."""
    return [
        f"prompt_encoder.{adapter}.lstm_head.{w}_l{k}{suffix}"
        for k in range(num_layers)
        for suffix in ("", "_reverse")
        for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]


def _encoder_shapes(config: Any, adapter: str, d: int, h: int) -> dict[str, tuple[int, ...]]:
    """Every encoder tensor's name and shape (PEFT's ``PromptEncoder`` for the config's encoder type)."""
    dims: tuple[tuple[int, int], ...]
    if config.encoder_reparameterization_type == "MLP":
        dims = ((d, h), (h, h), (h, d))
        keys = _mlp_keys(adapter)
    else:
        dims = ((2 * h, 2 * h), (2 * h, d))
        keys = _mlp_keys(adapter, _LSTM_MLP)
    shapes: dict[str, tuple[int, ...]] = {}
    for j, (d_in, d_out) in enumerate(dims):
        shapes[keys[2 * j]], shapes[keys[2 * j + 1]] = (d_out, d_in), (d_out,)
    if config.encoder_reparameterization_type == "LSTM":
        lstm = iter(_lstm_keys(adapter, int(config.encoder_num_layers)))
        for k in range(int(config.encoder_num_layers)):
            d_in = d if k == 0 else 2 * h
            for _ in range(2):
                for shape in ((4 * h, d_in), (4 * h, h), (4 * h,), (4 * h,)):
                    shapes[next(lstm)] = shape
    return shapes


def _linear(d_in: int, d_out: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear``'s default init (Kaiming-uniform weight, uniform bias), drawn from ``generator``."""
    bound = 1.0 / math.sqrt(d_in)
    w = torch.empty(d_out, d_in).uniform_(-bound, bound, generator=generator)
    b = torch.empty(d_out).uniform_(-bound, bound, generator=generator)
    return w, b


def init(
    model: nn.Module, config: PromptEncoderConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """A fresh table (standard normal) and MLP encoder (``nn.Linear``'s init), float32; ``inference_mode``: table only."""
    if not isinstance(config, PromptEncoderConfig):
        raise ConfigError(f"p_tuning.init needs a PromptEncoderConfig, got {type(config).__name__}")
    config.check()
    config = dataclasses.replace(config, **common.fill_from_model(model, config))
    if config.encoder_hidden_size is None:
        config = dataclasses.replace(config, encoder_hidden_size=config.token_dim)
    weight = cast(torch.Tensor, common.word_embeddings(model).weight)
    d, h = int(config.token_dim), int(config.encoder_hidden_size)
    if weight.shape[-1] != d:
        raise ConfigError(f"PromptEncoderConfig.token_dim={d} does not match the word embeddings' {weight.shape[-1]}")
    tensors = {common.embedding_key(adapter_name): torch.randn(int(config.num_virtual_tokens), d, generator=generator)}
    if not config.inference_mode:
        lstm_bound = 1.0 / math.sqrt(h)  # nn.LSTM: every weight and bias uniform(-1/sqrt(h), 1/sqrt(h))
        for key, shape in _encoder_shapes(config, adapter_name, d, h).items():
            if ".lstm_head." in key:
                tensors[key] = torch.empty(shape).uniform_(-lstm_bound, lstm_bound, generator=generator)
            elif key.endswith(".weight"):
                w, b = _linear(shape[1], shape[0], generator)
                tensors[key], tensors[key.removesuffix("weight") + "bias"] = w, b
    tensors = {**tensors, **heads.copies(model, config, adapter_name)}
    return TunerParams({k: v.to(weight.device) for k, v in tensors.items()}, config, adapter_name)


def _lstm_direction(x: torch.Tensor, w: list[torch.Tensor], reverse: bool) -> torch.Tensor:
    """One direction of one LSTM layer over ``x`` ``(T, in)``: ``(T, h)`` (``nn.LSTM``'s gates ``i, f, g, o``)."""
    w_ih, w_hh, b_ih, b_hh = w
    pre = F.linear(x, w_ih, b_ih)  # the input part of every step's gates at once
    h = c = x.new_zeros(w_hh.shape[1])
    out: list[torch.Tensor] = []
    for t in range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0]):
        i, f, g, o = (pre[t] + F.linear(h, w_hh, b_hh)).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        out.append(h)
    return torch.stack(out[::-1] if reverse else out)


def _lstm(
    x: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    adapter_name: str,
    num_layers: int,
    dropout: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """PEFT's bidirectional ``lstm_head`` on the table ``(n, d)``: ``(n, 2h)``; ``dropout`` between layers."""
    keys = iter(_lstm_keys(adapter_name, num_layers))
    for k in range(num_layers):
        if k and dropout:
            keep = torch.empty_like(x).bernoulli_(1.0 - dropout, generator=generator)
            x = x * keep / (1.0 - dropout)
        fwd, bwd = ([state[next(keys)] for _ in range(4)] for _ in range(2))
        x = torch.cat((_lstm_direction(x, fwd, False), _lstm_direction(x, bwd, True)), dim=-1)
    return x


def encode(
    state: Mapping[str, torch.Tensor],
    adapter_name: str,
    *,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The virtual token embeddings ``(n, d)``: the encoder (MLP or LSTM, told apart by the keys) applied to the
    table, or the table when it is encoded.  ``dropout``: the LSTM's between layers (training). Pure."""
    x = state[common.embedding_key(adapter_name)]
    lstm_layers = sum(1 for k in state if ".lstm_head.weight_ih_l" in k and not k.endswith("_reverse"))
    layers: tuple[int, ...]
    if lstm_layers:
        x = _lstm(x, state, adapter_name, lstm_layers, dropout, generator)
        layers = _LSTM_MLP
    elif _mlp_keys(adapter_name)[0] in state:
        layers = _LAYERS
    else:
        return x
    keys = _mlp_keys(adapter_name, layers)
    for j, i in enumerate(layers):
        x = F.linear(x, state[keys[2 * j]], state[keys[2 * j + 1]])
        if i != layers[-1]:
            x = torch.relu(x)
    return x


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` unless ``params`` is a table plus the config's full encoder, or an encoded
    table (plus any ``modules_to_save`` copies)."""
    table = common.check_table(model, params, "P-tuning")
    name, cfg = params.adapter_name, params.config
    encoder = set(heads.split(params)[0]) - {common.embedding_key(name)}
    if not encoder:
        return
    h = int(params[_mlp_keys(name)[0]].shape[0]) if cfg.encoder_reparameterization_type == "MLP" else None
    if h is None:
        first = f"prompt_encoder.{name}.lstm_head.weight_hh_l0"
        h = int(params[first].shape[1]) if first in params else 0
    want = _encoder_shapes(cfg, name, int(table.shape[1]), h)
    if encoder != set(want):
        raise ParamsMismatchError(
            f"P-tuning params ({cfg.encoder_reparameterization_type} encoder): missing"
            f" {sorted(set(want) - encoder)[:4]}, unexpected {sorted(encoder - set(want))[:4]}"
        )
    for key, shape in want.items():
        if tuple(params[key].shape) != shape:
            raise ParamsMismatchError(f"params[{key!r}] has shape {tuple(params[key].shape)}; expected {shape}")


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """A pre slot on the model prepending the encoded virtual tokens (computed inside the call, so grads flow)."""
    validate(model, params)
    state, name = dict(heads.split(params)[0]), params.adapter_name
    p = float(params.config.encoder_dropout) if params.config.encoder_reparameterization_type == "LSTM" else 0.0

    def prompts() -> torch.Tensor:
        return encode(state, name, dropout=p if model.training else 0.0, generator=ctx.generator)

    return common.prompt_routes(model, params, prompts, "P-tuning")


def _check_state(config: Any, state: Mapping[str, torch.Tensor], source: str) -> None:
    for key, t in heads.split(state)[0].items():
        if key.endswith(".embedding.weight") and (t.dim() != 2 or t.shape[0] != config.num_virtual_tokens):
            raise ParamsMismatchError(
                f"{source}: {key!r} has shape {tuple(t.shape)}; expected ({config.num_virtual_tokens}, token_dim)"
            )


PEFT_FORMAT = common.peft_format("P_TUNING", "P-tuning", lambda state, name: encode(state, name))

tuner = Tuner(
    swift_type="P_TUNING",
    config_cls=PromptEncoderConfig,
    init=init,
    routes=routes,
    validate=validate,
    key_naming=KeyNaming(after=("prompt_encoder",)),
    peft=PEFT_FORMAT,
    generation=calls.generating,
    check_state=_check_state,
)
