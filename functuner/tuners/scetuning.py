"""SCEdit (skip-connection tuning) for UNet-like models, as SWIFT's ``SCETuning`` computes it.

Jiang et al. 2023 (arXiv:2312.11392).  Each target module gets an
``SCEAdapter`` with ``dim`` channels and ``L = int(dim * down_ratio)`` hidden
units: ``sce(x) = x + ln2(gelu(ln1(x)))`` over the channel axis (a 4-D
``(b, c, h, w)`` tensor is treated as ``h * w`` tokens of ``c`` channels).

* ``tuner_mode='decoder'``: the target's first positional input is
  ``cat([hidden, skip], dim=1)`` with ``skip`` the last ``dim`` channels; the
  skip part is replaced by ``sce(skip)`` before the module runs (a pre slot).
* ``'encoder'`` / ``'identity'``: the target's output (its first element if a
  tuple) is replaced by ``sce(output)``; a tuple output becomes a one-element
  tuple, as in SWIFT.

A target that is an ``nn.ModuleList`` means its last element (recursively).
``hint_modules`` are matched and counted like SWIFT (one per target), but
SWIFT's ``SCETunerModule`` never passes the hint on to the adapter, so it has
no effect on outputs here either.  ``ln2`` starts at zero, so the tuned model
starts equal to the base model.

Param names (SWIFT's): ``<target>.scetuner_<adapter>.tuner_op.ln1.weight`` ``(L, dim)``,
``...ln1.bias`` ``(L,)``, ``...ln2.weight`` ``(dim, L)``, ``...ln2.bias`` ``(dim,)``.
No merged form (the adapter is non-linear).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..core.targets import own_named_modules
from ..errors import ConfigError, TargetError
from .base import CallContext, KeyNaming, Tuner, TunerConfig, check_exact_tensors

__all__ = ["SCETuningConfig", "init", "routes", "sce_adapter", "tuner", "validate"]

_MODES = ("decoder", "encoder", "identity")
_PARTS = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")


@dataclass(frozen=True, eq=False)
class SCETuningConfig(TunerConfig):
    """SWIFT's ``SCETuningConfig``: ``dims`` (int or one per target), ``target_modules`` / ``hint_modules``
    (a regex full-matched against module names, or a list of exact names), ``tuner_mode``, ``tuner_op``
    (only ``'SCEAdapter'``), ``down_ratio``."""

    dims: Any = None
    target_modules: Any = None
    hint_modules: Any = None
    tuner_mode: str = "decoder"
    tuner_op: str = "SCEAdapter"
    down_ratio: float = 1.0
    model_key_mapping: Any = None  # a SwiftConfig field SWIFT writes; unused by SCEdit
    swift_type: str = "SCETuning"

    def check(self, *, complete: bool = True) -> None:
        """Field checks (:meth:`TunerConfig.check`); unset required fields only when ``complete``."""
        if self.tuner_mode not in _MODES:
            raise ConfigError(f"tuner_mode={self.tuner_mode!r}; use one of {_MODES}")
        if self.tuner_op != "SCEAdapter":
            raise ConfigError(f"tuner_op={self.tuner_op!r}; SWIFT (and functuner) only have 'SCEAdapter'")
        if complete and self.target_modules is None:
            raise ConfigError("target_modules is required")
        dims = (self.dims,) if isinstance(self.dims, int) else self.dims
        bad_dims = not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
        if (complete or self.dims is not None) and bad_dims:
            raise ConfigError(f"dims must be a positive int or a list of them, got {self.dims!r}")
        if not float(self.down_ratio) > 0:
            raise ConfigError(f"down_ratio must be positive, got {self.down_ratio!r}")


def sce_adapter(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """``x + ln2(gelu(ln1(x)))`` over channels; ``x`` is ``(b, c, h, w)`` or ``(..., c)``. Pure."""
    if x.dim() == 4:
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        out = F.linear(F.gelu(F.linear(tokens, t["ln1.weight"], t["ln1.bias"])), t["ln2.weight"], t["ln2.bias"])
        return x + out.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    return x + F.linear(F.gelu(F.linear(x, t["ln1.weight"], t["ln1.bias"])), t["ln2.weight"], t["ln2.bias"])


def _match(model: nn.Module, spec: Any, field: str) -> list[tuple[str, nn.Module]]:
    names = dict(own_named_modules(model))
    if isinstance(spec, str):
        found = [(n, m) for n, m in names.items() if re.fullmatch(spec, n)]
    else:
        missing = [n for n in spec if n not in names]
        if missing:
            raise TargetError(f"{field}: {missing} are not modules of {type(model).__name__}")
        found = [(n, names[n]) for n in spec]
    return found


def _last(name: str, module: nn.Module) -> tuple[str, nn.Module]:
    while isinstance(module, nn.ModuleList):
        name, module = f"{name}.{len(module) - 1}", module[-1]
    return name, module


class _Site(NamedTuple):
    name: str
    module: nn.Module
    dim: int
    prefix: str


def _sites(model: nn.Module, cfg: SCETuningConfig, adapter: str) -> list[_Site]:
    targets = [_last(n, m) for n, m in _match(model, cfg.target_modules, "target_modules")]
    if not targets:
        raise TargetError(f"target_modules={cfg.target_modules!r} matched no module of {type(model).__name__}")
    if cfg.hint_modules:
        hints = _match(model, cfg.hint_modules, "hint_modules")
        if len(hints) != len(targets):
            raise TargetError(
                f"hint_modules matched {len(hints)} modules but target_modules {len(targets)}; they pair up"
            )
    dims = [cfg.dims] * len(targets) if isinstance(cfg.dims, int) else list(cfg.dims)
    if len(dims) != len(targets):
        raise ConfigError(
            f"dims has {len(dims)} entries but target_modules matched {len(targets)}: {[n for n, _ in targets]}"
        )
    return [_Site(n, m, d, f"{n}.scetuner_{adapter}.tuner_op.") for (n, m), d in zip(targets, dims, strict=True)]


def _shapes(dim: int, ratio: float) -> dict[str, tuple[int, ...]]:
    hidden = int(dim * ratio)
    if hidden < 1:
        raise ConfigError(f"int(dim={dim} * down_ratio={ratio}) is 0; the adapter needs at least one hidden unit")
    return {"ln1.weight": (hidden, dim), "ln1.bias": (hidden,), "ln2.weight": (dim, hidden), "ln2.bias": (dim,)}


def init(
    model: nn.Module, config: SCETuningConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh adapters: ``ln1`` like ``nn.Linear`` (Kaiming-uniform weight, uniform bias), ``ln2`` zero. Pure."""
    if not isinstance(config, SCETuningConfig):
        raise ConfigError(f"scetuning.init needs a SCETuningConfig, got {type(config).__name__}")
    config.check()
    sites = _sites(model, config, adapter_name)
    ref = next(model.parameters())
    tensors: dict[str, torch.Tensor] = {}
    for s in sites:
        shapes = _shapes(s.dim, float(config.down_ratio))
        w1 = torch.empty(shapes["ln1.weight"])
        torch.nn.init.kaiming_uniform_(w1, a=math.sqrt(5), generator=generator)
        b1 = torch.empty(shapes["ln1.bias"]).uniform_(-1 / math.sqrt(s.dim), 1 / math.sqrt(s.dim), generator=generator)
        for part, t in (
            ("ln1.weight", w1),
            ("ln1.bias", b1),
            ("ln2.weight", torch.zeros(shapes["ln2.weight"])),
            ("ln2.bias", torch.zeros(shapes["ln2.bias"])),
        ):
            tensors[s.prefix + part] = t.to(device=ref.device, dtype=ref.dtype)
    return TunerParams(tensors, config, adapter_name)


def _check(model: nn.Module, params: TunerParams) -> list[_Site]:
    cfg: SCETuningConfig = params.config
    sites = _sites(model, cfg, params.adapter_name)
    expected = {s.prefix + p: shape for s in sites for p, shape in _shapes(s.dim, float(cfg.down_ratio)).items()}
    check_exact_tensors(params, expected, "SCEdit params do not fit the model")
    return sites


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` / :class:`TargetError` if ``params`` do not fit ``model``. Pure."""
    _check(model, params)


def _decoder_slot(
    site: _Site, t: dict[str, torch.Tensor], module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if not args:
        raise ConfigError(f"SCEdit decoder mode: {site.name!r} was called without a positional input")
    x = args[0]
    if x.dim() < 2 or x.shape[1] <= site.dim:
        raise ConfigError(
            f"SCEdit decoder mode: input of {site.name!r} has shape {tuple(x.shape)}; it needs more than dim="
            f"{site.dim} channels (hidden + skip)"
        )
    hidden, skip = torch.split(x, [x.shape[1] - site.dim, site.dim], dim=1)
    return (torch.cat([hidden, sce_adapter(skip, t)], dim=1), *args[1:]), kwargs


def _encoder_slot(
    site: _Site,
    t: dict[str, torch.Tensor],
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
) -> Any:
    out = output[0] if isinstance(output, tuple) else output
    channels = out.shape[1] if out.dim() == 4 else out.shape[-1]
    if channels != site.dim:
        raise ConfigError(f"SCEdit encoder mode: output of {site.name!r} has {channels} channels, dims says {site.dim}")
    new = sce_adapter(out, t)
    return (new,) if isinstance(output, tuple) else new


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """Decoder mode: pre slots rewriting the skip channels; encoder/identity: forward slots on outputs."""
    cfg: SCETuningConfig = params.config
    sites = _check(model, params)
    fwd: dict[nn.Module, list[Any]] = {}
    pre: dict[nn.Module, list[Any]] = {}
    for s in sites:
        t = {p: params[s.prefix + p] for p in _PARTS}
        if cfg.tuner_mode == "decoder":
            pre.setdefault(s.module, []).append(lambda m, a, k, _s=s, _t=t: _decoder_slot(_s, _t, m, a, k))
        else:
            fwd.setdefault(s.module, []).append(lambda m, a, k, o, _s=s, _t=t: _encoder_slot(_s, _t, m, a, k, o))
    ensure_slots(list(pre), pre=True)
    ensure_slots(list(fwd))
    return Routes(forward=fwd, pre=pre)


tuner = Tuner(
    swift_type="SCETuning",
    config_cls=SCETuningConfig,
    init=init,
    routes=routes,
    validate=validate,
    key_naming=KeyNaming(glued=(("scetuner_", ("tuner_op",)),)),
)
