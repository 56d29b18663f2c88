"""PEFT's P-tuning (Liu et al. 2021, ``PromptEncoderConfig``) as a config plus pure functions.

A table ``E`` ``(num_virtual_tokens, token_dim)`` is re-parameterized by an encoder, and the
encoder's output is prepended to the input embeddings (see :mod:`.common` for the forward).
Encoder (PEFT's ``PromptEncoder``): ``MLP`` = ``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU ->
Linear(h, d)`` with ``h = encoder_hidden_size``.  PEFT's ``LSTM`` encoder is refused (``ConfigError``);
so is ``encoder_num_layers`` other than 2 with ``MLP`` (PEFT ignores it with a warning).

Param names (PEFT's in-memory names): ``prompt_encoder.<adapter>.embedding.weight`` and
``prompt_encoder.<adapter>.mlp_head.{0,2,4}.{weight,bias}``.  Params holding the table alone are
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
from . import common

__all__ = ["PEFT_FORMAT", "PromptEncoderConfig", "encode", "init", "routes", "tuner", "validate"]

_LAYERS = (0, 2, 4)  # the Linear layers of PEFT's mlp_head Sequential (ReLUs at 1 and 3)


@dataclass(frozen=True, eq=False)
class PromptEncoderConfig(TunerConfig):
    """PEFT's ``PromptEncoderConfig`` fields and defaults (peft 0.21).

    ``num_virtual_tokens`` is required; ``token_dim`` and the other model fields are filled from
    the model at ``init``; ``encoder_hidden_size`` defaults to ``token_dim`` there (PEFT's
    ``_prepare_prompt_learning_config`` does the same).  ``task_type`` must be ``"CAUSAL_LM"``.
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
        """Field checks naming the field; functuner's scope (MLP encoder, CAUSAL_LM) included."""
        common.check_common(self, complete)
        kind = self.encoder_reparameterization_type
        if kind == "LSTM":
            raise ConfigError(
                "PromptEncoderConfig.encoder_reparameterization_type='LSTM' is not implemented in functuner; use"
                " 'MLP' (PEFT's recommended encoder), or run it through peft with Swift.prepare_model"
            )
        if kind != "MLP":
            raise ConfigError(f"PromptEncoderConfig.encoder_reparameterization_type={kind!r}: expected 'MLP' or 'LSTM'")
        if self.encoder_hidden_size is not None and (
            isinstance(self.encoder_hidden_size, bool)
            or not isinstance(self.encoder_hidden_size, int)
            or self.encoder_hidden_size <= 0
        ):
            raise ConfigError(
                f"PromptEncoderConfig.encoder_hidden_size must be a positive int, got {self.encoder_hidden_size!r}"
            )
        if self.encoder_num_layers != 2:
            raise ConfigError(
                f"PromptEncoderConfig.encoder_num_layers={self.encoder_num_layers!r}: the MLP encoder has exactly 2"
                " hidden layers (PEFT ignores other values with a warning); leave it at 2"
            )
        if not isinstance(self.encoder_dropout, (int, float)) or isinstance(self.encoder_dropout, bool):
            raise ConfigError(f"PromptEncoderConfig.encoder_dropout must be a number, got {self.encoder_dropout!r}")


def _mlp_keys(adapter: str) -> list[str]:
    return [f"prompt_encoder.{adapter}.mlp_head.{i}.{p}" for i in _LAYERS for p in ("weight", "bias")]


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
        keys = iter(_mlp_keys(adapter_name))
        for d_in, d_out in ((d, h), (h, h), (h, d)):
            w, b = _linear(d_in, d_out, generator)
            tensors[next(keys)], tensors[next(keys)] = w, b
    return TunerParams({k: v.to(weight.device) for k, v in tensors.items()}, config, adapter_name)


def encode(state: Mapping[str, torch.Tensor], adapter_name: str) -> torch.Tensor:
    """The virtual token embeddings ``(n, d)``: the MLP applied to the table, or the table when it is encoded. Pure."""
    x = state[common.embedding_key(adapter_name)]
    keys = _mlp_keys(adapter_name)
    if keys[0] not in state:
        return x
    for j, i in enumerate(_LAYERS):
        x = F.linear(x, state[keys[2 * j]], state[keys[2 * j + 1]])
        if i != _LAYERS[-1]:
            x = torch.relu(x)
    return x


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` unless ``params`` is a table plus a full MLP encoder, or an encoded table."""
    table = common.check_table(model, params, "P-tuning")
    name = params.adapter_name
    encoder = set(params) - {common.embedding_key(name)}
    if not encoder:
        return
    keys = _mlp_keys(name)
    if encoder != set(keys):
        raise ParamsMismatchError(
            f"P-tuning params: missing {sorted(set(keys) - encoder)[:4]}, unexpected {sorted(encoder - set(keys))[:4]}"
        )
    d, h = int(table.shape[1]), int(params[keys[0]].shape[0])
    for j, (d_in, d_out) in enumerate(((d, h), (h, h), (h, d))):
        w, b = params[keys[2 * j]], params[keys[2 * j + 1]]
        if tuple(w.shape) != (d_out, d_in) or tuple(b.shape) != (d_out,):
            raise ParamsMismatchError(
                f"params[{keys[2 * j]!r}] / bias have shapes {tuple(w.shape)} / {tuple(b.shape)};"
                f" expected ({d_out}, {d_in}) / ({d_out},)"
            )


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """A pre slot on the model prepending the encoded virtual tokens (computed inside the call, so grads flow)."""
    validate(model, params)
    state, name = dict(params), params.adapter_name
    return common.prompt_routes(model, params, lambda: encode(state, name), "P-tuning")


def _check_state(config: Any, state: Mapping[str, torch.Tensor], source: str) -> None:
    for key, t in state.items():
        if key.endswith(".embedding.weight") and (t.dim() != 2 or t.shape[0] != config.num_virtual_tokens):
            raise ParamsMismatchError(
                f"{source}: {key!r} has shape {tuple(t.shape)}; expected ({config.num_virtual_tokens}, token_dim)"
            )


PEFT_FORMAT = common.peft_format("P_TUNING", "P-tuning", encode)

tuner = Tuner(
    swift_type="P_TUNING",
    config_cls=PromptEncoderConfig,
    init=init,
    routes=routes,
    validate=validate,
    key_naming=KeyNaming(after=("prompt_encoder",)),
    peft=PEFT_FORMAT,
    check_state=_check_state,
)
