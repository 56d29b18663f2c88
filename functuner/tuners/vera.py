"""VeRA (vector-based random matrix adaptation) as a config plus pure functions, with PEFT's math and names.

VeRA freezes two random projections shared by every adapted module,
``A: (r, in_max)`` and ``B: (out_max, r)`` (``in_max`` / ``out_max``: the largest
input / output size among the targeted layers), and learns two vectors per module,
``lambda_d: (r,)`` and ``lambda_b: (out,)``::

    y = base(x) + lambda_b * ((lambda_d * (dropout(x) @ A[:, :in].T)) @ B[:out].T)
    dW = (lambda_b[:, None] * B[:out]) @ (lambda_d[:, None] * A[:, :in])

The projections are drawn from ``projection_prng_key`` alone (PEFT's Kaiming-uniform
draw on a CPU generator), never from ``init``'s generator, so two adapters with the
same key share them as in PEFT.  They travel in the params (``vera_A.<adapter>``,
``vera_B.<adapter>``), so a checkpoint is self-contained (PEFT's ``save_projection``),
but they are constants: :func:`routes` and :func:`merge` detach them, so their
gradients are exactly zero, and the shim leaves them out of the optimizer
(:func:`optimizer_groups`).  With ``torch.func.grad``, update only
:func:`trainable_keys`.

Layers (as in PEFT): ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (PEFT's
``fan_in_fan_out`` follows the layer type, so the field is accepted and the layer
decides).  ``bias`` other than ``"none"`` is refused (functuner keeps base biases
frozen).  Param names are PEFT's in-memory names relative to the original model:
``<module>.vera_lambda_b.<adapter>``, ``<module>.vera_lambda_d.<adapter>``; PEFT's
files hold ``base_model.model.<module>.vera_lambda_*`` and ``base_model.vera_A`` /
``base_model.vera_B``.  Every function is pure.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..core.targets import is_conv1d_gpt2
from ..errors import CheckpointError, ConfigError, ParamsMismatchError, UnsupportedModuleError
from . import _lycoris as ly
from .base import CallContext, KeyNaming, PeftFormat, Tuner, TunerConfig, module_local

__all__ = [
    "PEFT_FORMAT",
    "VeraConfig",
    "init",
    "merge",
    "projections",
    "routes",
    "trainable_keys",
    "tuner",
    "unmerge",
    "validate",
]

NAMES = ("vera_lambda_b", "vera_lambda_d")
SHARED = ("vera_A", "vera_B")


@dataclass(frozen=True, eq=False)
class VeraConfig(TunerConfig):
    """PEFT's ``VeraConfig`` fields and defaults (peft 0.21).

    ``target_modules`` is required (PEFT's per-architecture defaults are not
    applied).  ``init_weights=True``: ``lambda_b`` zero (the adapted model equals
    the base) and ``lambda_d`` filled with ``d_initial``; ``False``: ``lambda_b``
    ones and ``lambda_d`` standard normal (PEFT's draw).
    """

    r: int = 256
    target_modules: Any = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Any = None
    init_weights: bool = True
    layers_to_transform: Any = None
    layers_pattern: Any = None
    # bookkeeping fields PEFT writes into adapter_config.json
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    auto_mapping: Any = None
    peft_version: Any = None
    swift_type: str = "VERA"
    peft_type: str = "VERA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"VeraConfig.r must be a positive integer, got r={self.r!r}")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ConfigError(f"VeraConfig.projection_prng_key must be an int, got {self.projection_prng_key!r}")
        if not 0.0 <= float(self.vera_dropout) < 1.0:
            raise ConfigError(f"VeraConfig.vera_dropout must be in [0, 1), got {self.vera_dropout!r}")
        if self.bias != "none":
            raise ConfigError(
                f"VeraConfig.bias={self.bias!r} is not supported natively (functuner keeps base biases frozen);"
                " use bias='none', or give peft.VeraConfig to Swift.prepare_model for PEFT's own VeRA"
            )
        for name in ("save_projection", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"VeraConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("VeraConfig: layers_pattern needs layers_to_transform as well (as in PEFT)")


def _in_out(name: str, module: nn.Module) -> tuple[int, int]:
    w = cast(torch.Tensor, getattr(module, "weight", None))
    if is_conv1d_gpt2(module):
        return int(w.shape[0]), int(w.shape[1])
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise UnsupportedModuleError(
        f"VeRA cannot adapt module {name!r} of type {type(module).__name__}; supported: nn.Linear and transformers"
        " Conv1D (as in PEFT)"
    )


def expected_shapes(name: str, module: nn.Module, config: VeraConfig) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of VeRA's per-module vectors on ``module``; raises for unsupported layers."""
    _, out = _in_out(name, module)
    return {"vera_lambda_b": (out,), "vera_lambda_d": (config.r,)}


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: uniform in ``±sqrt(3) * sqrt(2) / sqrt(fan_in)`` with ``fan_in = shape[1]``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(config: VeraConfig, in_max: int, out_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen ``(A, B)`` PEFT draws for ``config`` and the largest layer sizes (fp32, CPU). Pure."""
    gen = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    a = _kaiming((config.r, in_max), gen)
    b = _kaiming((out_max, config.r), gen)
    return a, b


class _Site(NamedTuple):
    name: str
    module: nn.Module
    keys: Mapping[str, str]
    fan_in: int
    out: int
    conv1d: bool


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[_Site, ...]]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _build(model: nn.Module, params: TunerParams) -> tuple[_Site, ...]:
    ad, cfg = params.adapter_name, params.config
    groups: dict[str, dict[str, str]] = {}
    for key in params:
        if ".modules_to_save." in key or key in (f"{s}.{ad}" for s in SHARED):
            continue
        tname = next((t for t in NAMES if key.endswith(f".{t}.{ad}")), None)
        if tname is None:
            raise ParamsMismatchError(
                f"params key {key!r} is not a VeRA tensor of adapter {ad!r}; expected '<module>.<name>.{ad}' with"
                f" <name> one of {list(NAMES)}, 'vera_A.{ad}', 'vera_B.{ad}' or '<module>.modules_to_save.{ad}.<p>'"
            )
        groups.setdefault(key[: -len(f".{tname}.{ad}")], {})[tname] = key
    for s in SHARED:
        if f"{s}.{ad}" not in params:
            raise ParamsMismatchError(f"VeRA params lack the shared projection {s}.{ad!r} (PEFT's base_model.{s})")
    a, b = params[f"vera_A.{ad}"], params[f"vera_B.{ad}"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != cfg.r or b.shape[1] != cfg.r:
        raise ParamsMismatchError(
            f"VeRA projections have shapes vera_A {tuple(a.shape)}, vera_B {tuple(b.shape)}; r={cfg.r} needs"
            f" (r={cfg.r}, in) and (out, r={cfg.r})"
        )
    sites: list[_Site] = []
    for mname, keys in groups.items():
        try:
            module = model.get_submodule(mname)
        except AttributeError:
            raise ParamsMismatchError(f"params key {next(iter(keys.values()))!r}: the model has no {mname!r}") from None
        want = expected_shapes(mname, module, cfg)
        have = {t: tuple(params[k].shape) for t, k in keys.items()}
        if have != want:
            raise ParamsMismatchError(
                f"VeRA params for module {mname!r} ({type(module).__name__}) have {have}; the module with r={cfg.r}"
                f" needs {want}"
            )
        fan_in, out = _in_out(mname, module)
        if a.shape[1] < fan_in or b.shape[0] < out:
            raise ParamsMismatchError(
                f"VeRA projections vera_A {tuple(a.shape)} / vera_B {tuple(b.shape)} are too small for module"
                f" {mname!r} (in {fan_in}, out {out})"
            )
        sites.append(_Site(mname, module, keys, fan_in, out, is_conv1d_gpt2(module)))
    return tuple(sites)


def _layout(model: nn.Module, params: TunerParams) -> tuple[_Site, ...]:
    sig = (tuple(params), params.config, params.adapter_name, tuple(tuple(t.shape) for t in params.values()))
    with _LOCK:
        found = _CACHE.get(model, {}).get(sig)
    if found is None:
        found = _build(model, params)
        with _LOCK:
            _CACHE.setdefault(model, {})[sig] = found
    return found


def _overrides(model: nn.Module, params: TunerParams) -> ly.Layout:
    """The ``modules_to_save`` copies (the shared machinery checks them)."""
    own = TunerParams({k: v for k, v in params.items() if ".modules_to_save." in k}, params.config, params.adapter_name)
    return ly.build_layout(model, own, NAMES, expected_shapes, "VeRA")


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`~functuner.errors.ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    _layout(model, params)
    _overrides(model, params)


def trainable_keys(params: TunerParams) -> list[str]:
    """The keys an optimizer should update: everything but the frozen projections ``vera_A`` / ``vera_B``."""
    frozen = {f"{s}.{params.adapter_name}" for s in SHARED}
    return [k for k in params if k not in frozen]


def init(
    model: nn.Module, config: VeraConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh VeRA params: PEFT's projections (from ``projection_prng_key``) and vectors (``lambda_d`` from ``generator``).

    Every targeted module is checked before anything is drawn.  Vectors take the
    base weight's dtype and device; the projections the first adapted weight's.
    """
    if not isinstance(config, VeraConfig):
        raise ConfigError(f"vera.init needs a VeraConfig, got {type(config).__name__}")
    selected = ly.selected_modules(model, config)
    dims = [(n, m, *_in_out(n, m)) for n, m in selected]
    in_max, out_max = max(d[2] for d in dims), max(d[3] for d in dims)
    a, b = projections(config, in_max, out_max)
    first = cast(torch.Tensor, dims[0][1].weight)
    tensors: dict[str, torch.Tensor] = {
        f"vera_A.{adapter_name}": a.to(device=first.device, dtype=first.dtype),
        f"vera_B.{adapter_name}": b.to(device=first.device, dtype=first.dtype),
    }
    for name, module, _, out in dims:
        w = cast(torch.Tensor, module.weight)
        lam_b = torch.ones(out)
        lam_d = torch.randn(config.r, generator=generator)
        if config.init_weights:
            lam_b.zero_()
            lam_d.fill_(config.d_initial)
        tensors[f"{name}.vera_lambda_b.{adapter_name}"] = lam_b.to(device=w.device, dtype=w.dtype)
        tensors[f"{name}.vera_lambda_d.{adapter_name}"] = lam_d.to(device=w.device, dtype=w.dtype)
    tensors.update(ly.init_modules_to_save(model, config, adapter_name))
    return TunerParams(tensors, config, adapter_name)


def _dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return F.dropout(x, p, training=True)
    keep = torch.empty(x.shape, dtype=x.dtype, device="cpu").bernoulli_(1.0 - p, generator=generator).to(x.device)
    return x * keep / (1.0 - p)


def _slot(
    a: torch.Tensor,
    b: torch.Tensor,
    lam_b: torch.Tensor,
    lam_d: torch.Tensor,
    p: float,
    generator: torch.Generator | None,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    """PEFT's ``vera.Linear.forward``: ``x`` cast to the vectors' dtype, the sum cast back to the base output's."""
    x = ly.first_arg(args, kwargs, "VeRA").to(lam_d.dtype)
    if p > 0 and module.training:
        x = _dropout(x, p, generator)
    h = lam_d * F.linear(x, a)
    return (out + lam_b * F.linear(h, b)).to(out.dtype)


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """A slot per adapted module adding VeRA's term; ``modules_to_save`` overrides run first."""
    cfg: VeraConfig = params.config
    ad = params.adapter_name
    a_all, b_all = params[f"vera_A.{ad}"].detach(), params[f"vera_B.{ad}"].detach()
    fwd: dict[nn.Module, list[Any]] = {}
    for site in _layout(model, params):
        a, b = a_all[:, : site.fan_in], b_all[: site.out, :]
        lam_b, lam_d = params[site.keys["vera_lambda_b"]], params[site.keys["vera_lambda_d"]]
        fwd.setdefault(site.module, []).append(
            functools.partial(_slot, a, b, lam_b, lam_d, float(cfg.vera_dropout), ctx.generator)
        )
    ly.override_routes(_overrides(model, params), params, fwd)
    ensure_slots(list(fwd))
    return Routes(forward=fwd)


def needs_generator(model: nn.Module, params: TunerParams) -> bool:
    """Whether a call in the model's current mode draws random numbers (dropout in training)."""
    return float(params.config.vera_dropout) > 0 and any(s.module.training for s in _layout(model, params))


def delta_weight(site_in: int, site_out: int, tensors: Mapping[str, torch.Tensor], conv1d: bool) -> torch.Tensor:
    """PEFT's ``get_delta_weight`` in ``(out, in)`` layout (``(in, out)`` for GPT-2 ``Conv1D``)."""
    a, b = tensors["vera_A"][:, :site_in], tensors["vera_B"][:site_out, :]
    dw = (tensors["vera_lambda_b"].unsqueeze(-1) * b) @ (tensors["vera_lambda_d"].unsqueeze(-1) * a)
    return dw.T if conv1d else dw


def _merge_impl(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None, sign: float
) -> dict[str, torch.Tensor]:
    ad = params.adapter_name
    state = ly.base_state(model, base)
    out = dict(state)
    shared = {"vera_A": params[f"vera_A.{ad}"].detach().float(), "vera_B": params[f"vera_B.{ad}"].detach().float()}
    for site in _layout(model, params):
        wkey = f"{site.name}.weight"
        if wkey not in state:
            raise ParamsMismatchError(f"merge: the base state has no {wkey!r} (VeRA adapts module {site.name!r})")
        W = state[wkey]
        tensors = {**shared, **{t: params[k].float() for t, k in site.keys.items()}}
        dw = delta_weight(site.fan_in, site.out, tensors, site.conv1d)
        ly.set_with_aliases(out, state, wkey, (W.float() + sign * dw).to(W.dtype))
    if sign > 0:
        ly.merge_overrides(_overrides(model, params), params, state, out)
    return out


def merge(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """New base weights ``W + dW`` (fp32, rounded once to ``W``'s dtype); ``modules_to_save`` copies replace theirs."""
    return _merge_impl(model, params, base, 1.0)


def unmerge(model: nn.Module, params: TunerParams, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``W' - dW`` (fp32, rounded once); ``modules_to_save`` parameters stay as they are."""
    return _merge_impl(model, params, merged, -1.0)


def optimizer_groups(
    config: Any, params: Mapping[str, nn.Parameter], defaults: Mapping[str, Any], is_decayed: Any
) -> list[dict[str, Any]]:
    """The shim's optimizer groups: the vectors as usual, the frozen projections in a group with ``lr=0``.

    The projections never get a gradient (the routes detach them), so no optimizer
    changes them; the explicit group keeps weight decay and schedules off them too.
    """
    frozen = [p for k, p in params.items() if k.rsplit(".", 1)[0] in SHARED]
    trainable = [p for k, p in params.items() if k.rsplit(".", 1)[0] not in SHARED]
    decayed = [p for p in trainable if is_decayed(p)]
    plain = [p for p in trainable if not is_decayed(p)]
    groups: list[dict[str, Any]] = [{"params": decayed}] if decayed else []
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    if frozen:
        groups.append({"params": frozen, "lr": 0.0, "weight_decay": 0.0})
    return groups


def _peft_format() -> PeftFormat:
    base: PeftFormat = ly.peft_format("VERA", NAMES, "VeRA")

    def to_keys(state: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        shared = {f"{s}.{adapter_name}": s for s in SHARED}
        out = base.to_keys({k: v for k, v in state.items() if k not in shared}, adapter_name)
        for key, s in shared.items():
            if key in state:
                out[s] = state[key]
        return out

    def from_keys(state: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        missing = [s for s in SHARED if s not in state]
        if missing:
            raise CheckpointError(
                f"PEFT VeRA checkpoint lacks base_model.{missing[0]} (saved with save_projection=False); functuner"
                " needs the stored projections (PEFT itself warns that redrawing them is not reproducible)"
            )
        out = base.from_keys({k: v for k, v in state.items() if k not in SHARED}, adapter_name)
        out.update({f"{s}.{adapter_name}": state[s] for s in SHARED})
        return out

    return PeftFormat(
        peft_type="VERA",
        config_to_json=base.config_to_json,
        to_keys=to_keys,
        from_keys=from_keys,
        shim_reads=False,
        outside_model=SHARED,
    )


# PEFT's checkpoint layout (``base_model.model.<module>.vera_lambda_*`` plus ``base_model.vera_A`` / ``vera_B``)
PEFT_FORMAT = _peft_format()


def _check_state(config: Any, state: Mapping[str, torch.Tensor], source: str) -> None:
    """VeRA tensors read from ``source`` must be floating point."""
    for key, t in state.items():
        if ".modules_to_save." not in key and not t.is_floating_point():
            raise ParamsMismatchError(
                f"{source}: tensor {key!r} has dtype {str(t.dtype).replace('torch.', '')}; VeRA tensors must be"
                " floating point (the weights file is corrupt)"
            )


tuner = Tuner(
    swift_type="VERA",
    config_cls=VeraConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    needs_generator=needs_generator,
    key_naming=KeyNaming(after=(*NAMES, *SHARED)),
    peft=PEFT_FORMAT,
    check_model=ly.model_check(expected_shapes),
    check_state=_check_state,
    optimizer_groups=optimizer_groups,
    sub_batch=module_local,
)
