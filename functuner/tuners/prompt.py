"""Prompt tuning / visual prompt tuning (Jia et al. 2022) with SWIFT's ``PromptConfig``, as pure functions.

Per targeted layer ``i`` (its name must end in the layer number ``n``, as in
SWIFT) with learned tokens ``p`` of shape ``(1, prompt_length, dim)`` and input
hidden states ``x`` of shape ``(batch, seq, dim)`` (the argument at ``embedding_pos``):

* ``n == 0``: ``x' = cat(p, x)`` (``attach_front``) or ``cat(x, p)``: the
  sequence grows by ``prompt_length``;
* ``n > 0``: the ``prompt_length`` positions the first layer added are replaced
  by this layer's own tokens (deep prompt tuning).

The attention mask at ``attention_mask_pos`` (when given and not ``None``) is
extended on its last dimension with ``attention_mask_value``.  With
``extract_embedding`` the layer's output drops the prompt positions again.
SWIFT treats ``attention_mask_pos=0`` as "no mask" (it tests truthiness); so
does functuner.

Param names = SWIFT's: ``<layer>.prompt_<adapter>.prompt_token`` ``(1, prompt_length, dim)``.
Pure: nothing is written to the model or params.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..errors import ConfigError, ParamsMismatchError
from ._swift_hooks import check_input_position, input_at, seq_or_value, swift_select, with_input_at
from .base import CallContext, KeyNaming, Tuner, TunerConfig

__all__ = ["PromptConfig", "init", "routes", "tuner", "validate"]


@dataclass(frozen=True, eq=False)
class PromptConfig(TunerConfig):
    """SWIFT's ``PromptConfig`` (same field names and defaults).

    ``dim``: hidden size (an int, or a list with one entry per matched layer);
    ``target_modules``: regex (full match) or list of name endings, each
    matched name ending in its layer number; ``embedding_pos`` /
    ``attention_mask_pos``: int (positional) or str (keyword) position of the
    hidden states / attention mask in the layer's ``forward`` arguments.
    """

    dim: Any = None
    target_modules: Any = None
    embedding_pos: Any = None
    attention_mask_pos: Any = None
    attention_mask_value: Any = 0.0
    prompt_length: int = 16
    attach_front: bool = True
    extract_embedding: bool = False
    swift_type: str = "PROMPT"
    model_key_mapping: Any = None

    def check(self, *, complete: bool = True) -> None:
        """Field checks (:meth:`TunerConfig.check`); unset required fields only when ``complete``."""
        dims = self.dim if isinstance(self.dim, tuple) else (self.dim,)
        bad_dims = not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims)
        if (complete or self.dim is not None) and bad_dims:
            raise ConfigError(f"PromptConfig.dim must be a positive int or a list of them, got {self.dim!r}")
        if isinstance(self.prompt_length, bool) or not isinstance(self.prompt_length, int) or self.prompt_length <= 0:
            raise ConfigError(f"PromptConfig.prompt_length must be a positive int, got {self.prompt_length!r}")
        if (complete or self.embedding_pos is not None) and (
            self.embedding_pos is None
            or isinstance(self.embedding_pos, bool)
            or not isinstance(self.embedding_pos, (int, str))
        ):
            raise ConfigError(f"PromptConfig.embedding_pos must be an int or a str, got {self.embedding_pos!r}")
        if self.attention_mask_pos is not None and (
            isinstance(self.attention_mask_pos, bool) or not isinstance(self.attention_mask_pos, (int, str))
        ):
            raise ConfigError(
                f"PromptConfig.attention_mask_pos must be None, an int or a str, got {self.attention_mask_pos!r}"
            )
        if not isinstance(self.attention_mask_value, (int, float, bool)):
            raise ConfigError(f"PromptConfig.attention_mask_value must be a number, got {self.attention_mask_value!r}")


def _key(layer: str, adapter: str) -> str:
    return f"{layer}.prompt_{adapter}.prompt_token"


def _layer_number(name: str) -> int:
    last = name.rsplit(".")[-1]
    if not last.isdigit():
        raise ConfigError(
            f"PromptConfig.target_modules matched {name!r}, whose name does not end in a layer number;"
            " target the numbered layers (e.g. r'.*layer\\.\\d+$')"
        )
    return int(last)


def _check_layer(module: nn.Module, name: str, cfg: PromptConfig) -> int:
    where = f"{name}.forward ({type(module).__name__})"
    check_input_position(module.forward, cfg.embedding_pos, "PromptConfig.embedding_pos", where)
    if cfg.attention_mask_pos:
        check_input_position(module.forward, cfg.attention_mask_pos, "PromptConfig.attention_mask_pos", where)
    return _layer_number(name)


def init(
    model: nn.Module, config: PromptConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh prompt tokens (Xavier-uniform, float32, as SWIFT) for each targeted layer. Pure.

    Positions and layer names are checked against each layer's ``forward``
    signature first, so a bad config raises :class:`ConfigError` before anything is built.
    """
    if not isinstance(config, PromptConfig):
        raise ConfigError(f"prompt.init needs a PromptConfig, got {type(config).__name__}")
    config.check()
    selected = swift_select(model, config.target_modules)
    for name, module in selected:
        _check_layer(module, name, config)
    dims = [seq_or_value(config.dim, i, "PromptConfig.dim") for i in range(len(selected))]
    tensors: dict[str, torch.Tensor] = {}
    for (name, module), d in zip(selected, dims, strict=True):
        device = next(iter(module.parameters()), torch.empty(0)).device
        token = torch.zeros(1, config.prompt_length, d)
        nn.init.xavier_uniform_(token, generator=generator)
        tensors[_key(name, adapter_name)] = token.to(device)
    return TunerParams(tensors, config, adapter_name)


class _Site(NamedTuple):
    name: str
    module: nn.Module
    layer_num: int
    key: str


def _sites(model: nn.Module, params: TunerParams) -> list[_Site]:
    cfg: PromptConfig = params.config
    suffix = f".prompt_{params.adapter_name}.prompt_token"
    sites = []
    for key in params:
        if not key.endswith(suffix):
            raise ParamsMismatchError(f"params key {key!r} is not a prompt token of adapter {params.adapter_name!r}")
        name = key[: -len(suffix)]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ParamsMismatchError(f"params key {key!r} refers to module {name!r}, which the model lacks") from None
        t = params[key]
        if t.dim() != 3 or t.shape[0] != 1 or t.shape[1] != cfg.prompt_length:
            raise ParamsMismatchError(
                f"params[{key!r}] has shape {tuple(t.shape)}; expected (1, prompt_length={cfg.prompt_length}, dim)"
            )
        sites.append(_Site(name, module, _check_layer(module, name, cfg), key))
    return sites


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` / :class:`ConfigError` if ``params`` does not fit ``model``. Pure."""
    _sites(model, params)


def _with_prompt(x: torch.Tensor, token: torch.Tensor, layer_num: int, cfg: PromptConfig, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ConfigError(
            f"PromptConfig.embedding_pos={cfg.embedding_pos!r}: {where} got"
            f" {type(x).__name__} {tuple(getattr(x, 'shape', ()))}, not (batch, seq, dim) hidden states"
        )
    if x.shape[-1] != token.shape[-1]:
        raise ConfigError(f"PromptConfig.dim={token.shape[-1]} does not match {where}'s hidden states {tuple(x.shape)}")
    p = token.expand(x.shape[0], -1, -1).to(x.device, x.dtype)
    n = cfg.prompt_length
    if layer_num == 0:
        return torch.cat((p, x), dim=1) if cfg.attach_front else torch.cat((x, p), dim=1)
    if x.shape[1] < n:
        raise ConfigError(
            f"{where}: hidden states of length {x.shape[1]} hold no {n} prompt positions to replace;"
            " the layer numbered 0 must be targeted too"
        )
    return torch.cat((p, x[:, n:, :]), dim=1) if cfg.attach_front else torch.cat((x[:, :-n, :], p), dim=1)


def _pre_slot(
    site: _Site,
    cfg: PromptConfig,
    token: torch.Tensor,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    where = f"{site.name}.forward"
    x = input_at(args, kwargs, cfg.embedding_pos, "PromptConfig.embedding_pos", where)
    args, kwargs = with_input_at(args, kwargs, cfg.embedding_pos, _with_prompt(x, token, site.layer_num, cfg, where))
    if cfg.attention_mask_pos:
        mask = input_at(args, kwargs, cfg.attention_mask_pos, "PromptConfig.attention_mask_pos", where)
        if mask is not None:
            extra = torch.full((*mask.shape[:-1], cfg.prompt_length), cfg.attention_mask_value, device=mask.device)
            mask = torch.cat((extra, mask), dim=-1) if cfg.attach_front else torch.cat((mask, extra), dim=-1)
        args, kwargs = with_input_at(args, kwargs, cfg.attention_mask_pos, mask)
    return args, kwargs


def _extract_slot(
    site: _Site, cfg: PromptConfig, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> Any:
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"PromptConfig.extract_embedding=True needs {site.name}.forward to return a tensor,"
            f" it returned a {type(out).__name__}"
        )
    n = cfg.prompt_length
    return out[:, n:, :] if cfg.attach_front else out[:, :-n, :]


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """Pre slots attaching the prompt tokens (and extending the mask); forward slots extracting them."""
    cfg: PromptConfig = params.config
    pre: dict[nn.Module, list[Any]] = {}
    fwd: dict[nn.Module, list[Any]] = {}
    for site in _sites(model, params):
        pre.setdefault(site.module, []).append(functools.partial(_pre_slot, site, cfg, params[site.key]))
        if cfg.extract_embedding:
            fwd.setdefault(site.module, []).append(functools.partial(_extract_slot, site, cfg))
        ensure_slots([site.module], pre=True)
    return Routes(forward=fwd, pre=pre)


tuner = Tuner(
    swift_type="PROMPT",
    config_cls=PromptConfig,
    init=init,
    routes=routes,
    validate=validate,
    key_naming=KeyNaming(glued=(("prompt_", ("prompt_token",)),)),
)
