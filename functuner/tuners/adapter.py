"""Adapter tuning (Houlsby et al. 2019) with SWIFT's ``AdapterConfig``, as pure functions.

Math, per targeted module, on the hidden state ``h`` (shape ``(..., dim)``) the
module's method returns (the whole output if it is a tensor, else the entry at
``hidden_pos`` of a tuple/list/dict)::

    h' = h + W2 @ act(W1 @ h + b1) + b2        W1: (adapter_length, dim), W2: (dim, adapter_length)

computed in the adapter params' dtype and cast back to ``h``'s dtype, exactly as
SWIFT's ``AdapterModule``.  ``method_name`` (default ``'forward'``) names the
method whose result is adapted: ``'forward'`` uses the module's forward slot;
any other method gets a dormant :class:`~functuner.tuners._swift_hooks.MethodSlot`.

Param names = SWIFT's in-memory and on-disk names:
``<module>.adapter_<adapter>.linear1.weight`` ``(adapter_length, dim)``,
``.linear1.bias`` ``(adapter_length,)``, ``.linear2.weight`` ``(dim, adapter_length)``,
``.linear2.bias`` ``(dim,)``.  Pure: nothing is written to the model or params.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..errors import ConfigError, ParamsMismatchError
from ._swift_hooks import ensure_method_slot, output_at, swift_select, with_output_at
from .base import CallContext, KeyNaming, Tuner, TunerConfig

__all__ = ["AdapterConfig", "activation", "adapter_mlp", "init", "routes", "tuner", "validate"]

_PARTS = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")


def _fallback_activations() -> dict[str, Any]:
    return {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


@functools.cache
def _act_table() -> dict[str, Any]:
    try:  # SWIFT uses transformers' ACT2CLS; use the same classes so the numbers match
        from transformers.activations import ACT2CLS
    except ImportError:  # pragma: no cover - transformers is installed wherever SWIFT is
        return _fallback_activations()
    return dict(ACT2CLS)


@functools.cache
def activation(name: str) -> nn.Module:
    """The activation module SWIFT builds for ``act_layer=name`` (stateless; cached)."""
    table = _act_table()
    if name not in table:
        raise ConfigError(f"act_layer={name!r} is not a known activation; use one of {sorted(table)}")
    cls = table[name]
    return cast(nn.Module, cls[0](**cls[1]) if isinstance(cls, tuple) else cls())


@dataclass(frozen=True, eq=False)
class AdapterConfig(TunerConfig):
    """SWIFT's ``AdapterConfig`` (same field names and defaults).

    ``dim``: size of the hidden state; ``target_modules``: regex (full match) or
    list of name endings; ``hidden_pos``: int / str position of the hidden
    state in a tuple / dict output (ignored for tensor outputs);
    ``method_name``: the method whose result is adapted; ``adapter_length``:
    bottleneck width; ``act_layer``: a transformers activation name.
    """

    dim: Any = None
    target_modules: Any = None
    hidden_pos: Any = None
    method_name: str = "forward"
    adapter_length: int = 128
    act_layer: str = "gelu"
    swift_type: str = "ADAPTER"
    model_key_mapping: Any = None

    def check(self, *, complete: bool = True) -> None:
        """Field checks (:meth:`TunerConfig.check`); unset required fields only when ``complete``."""
        if (complete or self.dim is not None) and (
            isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0
        ):
            raise ConfigError(f"AdapterConfig.dim must be a positive int (the hidden size), got {self.dim!r}")
        if (
            isinstance(self.adapter_length, bool)
            or not isinstance(self.adapter_length, int)
            or self.adapter_length <= 0
        ):
            raise ConfigError(f"AdapterConfig.adapter_length must be a positive int, got {self.adapter_length!r}")
        if self.hidden_pos is not None and (
            isinstance(self.hidden_pos, bool) or not isinstance(self.hidden_pos, (int, str))
        ):
            raise ConfigError(f"AdapterConfig.hidden_pos must be None, an int or a str, got {self.hidden_pos!r}")
        if not isinstance(self.method_name, str) or not self.method_name:
            raise ConfigError(f"AdapterConfig.method_name must be a method name, got {self.method_name!r}")
        activation(self.act_layer)


def _keys(module_name: str, adapter: str) -> tuple[str, ...]:
    return tuple(f"{module_name}.adapter_{adapter}.{part}" for part in _PARTS)


def _check_method(module: nn.Module, name: str, method_name: str) -> None:
    method = getattr(module, method_name, None)
    if method is None or not callable(method) or isinstance(method, nn.Module):
        raise ConfigError(
            f"AdapterConfig.method_name={method_name!r}: module {name!r} ({type(module).__name__}) has no such method"
        )


# ---------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------
def init(
    model: nn.Module, config: AdapterConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh adapter params, drawn like SWIFT (Xavier-uniform weights, biases ~ N(0, 1e-6)). Pure.

    Tensors are float32 on the targeted module's device.  Raises
    :class:`ConfigError` if a targeted module lacks ``method_name`` (before anything is built).
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"adapter.init needs an AdapterConfig, got {type(config).__name__}")
    config.check()
    selected = swift_select(model, config.target_modules)
    for name, module in selected:
        _check_method(module, name, config.method_name)
    tensors: dict[str, torch.Tensor] = {}
    d, L = config.dim, config.adapter_length
    for name, module in selected:
        device = next(iter(module.parameters()), torch.empty(0)).device
        w1, w2 = torch.empty(L, d), torch.empty(d, L)
        b1, b2 = torch.empty(L), torch.empty(d)
        for w, b in ((w1, b1), (w2, b2)):
            nn.init.xavier_uniform_(w, generator=generator)
            nn.init.normal_(b, std=1e-6, generator=generator)
        for key, t in zip(_keys(name, adapter_name), (w1, b1, w2, b2), strict=True):
            tensors[key] = t.to(device)
    return TunerParams(tensors, config, adapter_name)


# ---------------------------------------------------------------------------
# layout and validation
# ---------------------------------------------------------------------------
class _Site(NamedTuple):
    name: str
    module: nn.Module
    keys: tuple[str, ...]


def _sites(model: nn.Module, params: TunerParams) -> list[_Site]:
    cfg: AdapterConfig = params.config
    marker = f".adapter_{params.adapter_name}.linear1.weight"
    sites: list[_Site] = []
    claimed: set[str] = set()
    for key in params:
        if not key.endswith(marker):
            continue
        mname = key[: -len(marker)]
        try:
            module = model.get_submodule(mname)
        except AttributeError:
            raise ParamsMismatchError(f"params key {key!r} refers to module {mname!r}, which the model lacks") from None
        _check_method(module, mname, cfg.method_name)
        keys = _keys(mname, params.adapter_name)
        expect = ((cfg.adapter_length, cfg.dim), (cfg.adapter_length,), (cfg.dim, cfg.adapter_length), (cfg.dim,))
        for k, shape in zip(keys, expect, strict=True):
            if k not in params:
                raise ParamsMismatchError(f"params has {key!r} but not its partner {k!r}")
            if tuple(params[k].shape) != shape:
                raise ParamsMismatchError(
                    f"params[{k!r}] has shape {tuple(params[k].shape)}; AdapterConfig(dim="
                    f"{cfg.dim}, adapter_length={cfg.adapter_length}) needs {shape}"
                )
        claimed.update(keys)
        sites.append(_Site(mname, module, keys))
    extra = sorted(set(params) - claimed)
    if extra:
        raise ParamsMismatchError(f"params keys {extra[:5]} are not tensors of adapter {params.adapter_name!r}")
    return sites


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` / :class:`ConfigError` if ``params`` does not fit ``model``. Pure."""
    _sites(model, params)


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------
def adapter_mlp(
    h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, act: nn.Module
) -> torch.Tensor:
    """``h + linear2(act(linear1(h)))`` in the params' dtype, returned in ``h``'s dtype. Pure.

    ``h``: ``(..., dim)``; ``w1``: ``(L, dim)``; ``w2``: ``(dim, L)``.
    """
    x = h.to(w1.dtype)
    out = F.linear(act(F.linear(x, w1, b1)), w2, b2)
    return (x.to(out.dtype) + out).to(h.dtype)


def _slot(
    site: _Site,
    cfg: AdapterConfig,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: Any,
) -> Any:
    where = f"{site.name}.{cfg.method_name}()"
    h = output_at(out, cfg.hidden_pos, "AdapterConfig.hidden_pos", where)
    if not isinstance(h, torch.Tensor):
        raise ConfigError(
            f"AdapterConfig.hidden_pos={cfg.hidden_pos!r}: {where} gave a {type(h).__name__}, not a tensor"
        )
    if h.shape[-1] != cfg.dim:
        raise ConfigError(
            f"AdapterConfig.dim={cfg.dim} does not match {where}'s hidden state of shape {tuple(h.shape)}"
        )
    w1, b1, w2, b2 = weights
    new = adapter_mlp(h, w1, b1, w2, b2, activation(cfg.act_layer))
    return with_output_at(out, cfg.hidden_pos, new)


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """Slot functions adding the bottleneck MLP to each targeted module's method result."""
    cfg: AdapterConfig = params.config
    fwd: dict[Any, list[Any]] = {}
    for site in _sites(model, params):
        w1, b1, w2, b2 = (params[k] for k in site.keys)
        fn = functools.partial(_slot, site, cfg, (w1, b1, w2, b2))
        if cfg.method_name == "forward":
            ensure_slots([site.module])
            fwd.setdefault(site.module, []).append(fn)
        else:
            fwd.setdefault(ensure_method_slot(site.module, cfg.method_name), []).append(fn)
    return Routes(forward=fwd)


tuner = Tuner(
    swift_type="ADAPTER",
    config_cls=AdapterConfig,
    init=init,
    routes=routes,
    validate=validate,
    key_naming=KeyNaming(glued=(("adapter_", ("linear1", "linear2")),)),
)
