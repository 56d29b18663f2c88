"""(IA)³ as a config plus pure functions, with PEFT's math and names.

(IA)³ learns one vector ``l`` per adapted module and rescales activations by it:

* a module named by ``feedforward_modules`` has its *input* scaled,
  ``y = base(x * l)`` (``l: (1, in)``; conv: ``(1, in, 1, ...)``);
* any other targeted module has its *output* scaled, ``y = base(x) * l``
  (``l: (out, 1)``; conv: ``(1, out, 1, ...)``), bias included.

Layers (as in PEFT): ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight
``(in, out)``; PEFT's ``fan_in_fan_out`` is derived from the layer type, so the
field is accepted and ignored), ``nn.Conv2d`` and ``nn.Conv3d``.  The merged
form rescales the weight's input columns (feed-forward) or output rows and the
bias (others); :func:`unmerge` divides again, with PEFT's ``1e-8`` guard, so it
is only approximate where ``l`` is near zero.

Param names are PEFT's in-memory names relative to the original model:
``<module>.ia3_l.<adapter>``; ``modules_to_save`` copies at
``<module>.modules_to_save.<adapter>.<param>``.  Every function is pure.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..core.naming import check_adapter_name
from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..core.targets import is_conv1d_gpt2
from ..errors import ConfigError, ParamsMismatchError, UnsupportedModuleError
from . import _lycoris as ly
from .base import CallContext, KeyNaming, Tuner, TunerConfig, module_local

__all__ = [
    "PEFT_FORMAT",
    "IA3Config",
    "add_weighted_adapter",
    "init",
    "is_feedforward",
    "merge",
    "routes",
    "tuner",
    "unmerge",
    "validate",
]

NAMES = ("ia3_l",)
_EPS = 1e-8  # PEFT's guard against division by zero in unmerge


@dataclass(frozen=True, eq=False)
class IA3Config(TunerConfig):
    """PEFT's ``IA3Config`` fields and defaults (peft 0.21).

    ``target_modules`` and ``feedforward_modules`` are required at ``init``
    (PEFT's per-architecture defaults are not applied; pass ``[]`` for no
    feed-forward module).  As in PEFT, a list of ``feedforward_modules`` must
    be a subset of a list of ``target_modules``.
    """

    target_modules: Any = None
    exclude_modules: Any = None
    feedforward_modules: Any = None
    fan_in_fan_out: bool = False
    modules_to_save: Any = None
    init_ia3_weights: bool = True
    # bookkeeping fields PEFT writes into adapter_config.json
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    auto_mapping: Any = None
    peft_version: Any = None
    swift_type: str = "IA3"
    peft_type: str = "IA3"

    def __post_init__(self) -> None:
        super().__post_init__()
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as e:
                raise ConfigError(f"IA3Config.feedforward_modules={ff!r} is not a valid regex: {e}") from None
        if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
            raise ConfigError(
                f"IA3Config.feedforward_modules {sorted(set(ff) - set(targets))} are not in target_modules"
                f" {list(targets)}; feedforward_modules must be a subset of target_modules (as in PEFT)"
            )
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")


def is_feedforward(config: IA3Config, module_name: str) -> bool:
    """PEFT's rule: a regex ``feedforward_modules`` must match the whole name; a list entry must end it."""
    ff = config.feedforward_modules
    if ff is None:
        raise ConfigError(
            "IA3Config.feedforward_modules is None: name the modules whose input (IA)³ scales (e.g."
            " ['down_proj'] for Llama, as PEFT's default), or [] for none"
        )
    if isinstance(ff, str):
        return re.fullmatch(ff, module_name) is not None
    return any(module_name.endswith(t) for t in ff)


def _kind(name: str, module: nn.Module) -> str:
    if is_conv1d_gpt2(module):
        return "conv1d_gpt2"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        return "conv"
    raise UnsupportedModuleError(
        f"(IA)³ cannot adapt module {name!r} of type {type(module).__name__}; supported: nn.Linear, nn.Conv2d,"
        " nn.Conv3d, transformers Conv1D (as in PEFT)"
    )


def expected_shapes(name: str, module: nn.Module, config: IA3Config) -> dict[str, tuple[int, ...]]:
    """``{"ia3_l": shape}`` for ``module`` (PEFT's layout); raises for unsupported layers."""
    kind, ff = _kind(name, module), is_feedforward(config, name)
    w = cast(torch.Tensor, module.weight)
    if kind == "conv":
        channels = cast(int, module.in_channels) if ff else int(w.shape[0])
        return {"ia3_l": (1, channels, *([1] * (w.dim() - 2)))}
    fan_in, out = (int(w.shape[0]), int(w.shape[1])) if kind == "conv1d_gpt2" else (int(w.shape[1]), int(w.shape[0]))
    return {"ia3_l": (1, fan_in) if ff else (out, 1)}


def _layout(model: nn.Module, params: TunerParams) -> ly.Layout:
    return ly.build_layout(model, params, NAMES, expected_shapes, "(IA)³")


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`~functuner.errors.ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    _layout(model, params)


def init(model: nn.Module, config: IA3Config, generator: torch.Generator, adapter_name: str = "default") -> TunerParams:
    """Fresh (IA)³ vectors: ones (``init_ia3_weights=True``, the adapted model equals the base) or standard normal.

    Every module is checked before anything is drawn, so an unsupported layer
    raises :class:`UnsupportedModuleError` naming it.  Vectors take the base
    weight's dtype and device; draws use only ``generator`` (on CPU).
    """
    if not isinstance(config, IA3Config):
        raise ConfigError(f"ia3.init needs an IA3Config, got {type(config).__name__}")
    plans = [(n, m, expected_shapes(n, m, config)["ia3_l"]) for n, m in ly.selected_modules(model, config)]
    tensors: dict[str, torch.Tensor] = {}
    for name, module, shape in plans:
        w = cast(torch.Tensor, module.weight)
        if config.init_ia3_weights:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=generator)
        tensors[f"{name}.ia3_l.{adapter_name}"] = t.to(device=w.device, dtype=w.dtype)
    tensors.update(ly.init_modules_to_save(model, config, adapter_name))
    return TunerParams(tensors, config, adapter_name)


def _scale_output(
    vec: torch.Tensor, conv: bool, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor
) -> torch.Tensor:
    if conv:
        x = ly.first_arg(args, kwargs, "(IA)³")
        return (out.to(vec.dtype) * vec).to(x.dtype)
    return (out * vec.flatten()).to(out.dtype)


def _scale_input(
    vec: torch.Tensor, conv: bool, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    x = ly.first_arg(args, kwargs, "(IA)³")
    if conv:
        scaled = (x.to(vec.dtype) * vec).to(module.weight.dtype)
    else:
        scaled = (x.to(vec.dtype) * vec.flatten()).to(x.dtype)
    return ly.replace_first_arg(args, kwargs, scaled)


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """An input-scaling pre slot per feed-forward module, an output-scaling slot per other module."""
    layout = _layout(model, params)
    cfg: IA3Config = params.config
    fwd: dict[nn.Module, list[Any]] = {}
    pre: dict[nn.Module, list[Any]] = {}
    for site in layout.sites:
        vec, conv = params[site.keys["ia3_l"]], isinstance(site.module, (nn.Conv2d, nn.Conv3d))
        if is_feedforward(cfg, site.name):
            pre.setdefault(site.module, []).append(functools.partial(_scale_input, vec, conv))
        else:
            fwd.setdefault(site.module, []).append(functools.partial(_scale_output, vec, conv))
    ly.override_routes(layout, params, fwd)
    ensure_slots(list(fwd))
    ensure_slots(list(pre), pre=True)
    return Routes(forward=fwd, pre=pre)


def _weight_factor(module: nn.Module, kind: str, ff: bool, vec: torch.Tensor) -> torch.Tensor:
    """``l`` shaped to multiply the base weight (PEFT's ``transpose`` / ``_get_ia3_scaling_for_weight``)."""
    if kind == "conv1d_gpt2":
        return vec.T
    if kind == "linear":
        return vec
    if not ff:
        return vec.transpose(0, 1)
    groups = cast(int, module.groups)
    if groups == 1:
        return vec
    w = cast(torch.Tensor, module.weight)
    out, in_per = int(w.shape[0]), int(w.shape[1])
    rest = tuple(vec.shape[2:])
    grouped = vec.reshape(groups, 1, in_per, *rest).expand(groups, out // groups, in_per, *rest)
    return grouped.reshape(out, in_per, *rest)


def _merge_impl(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None, invert: bool
) -> dict[str, torch.Tensor]:
    layout = _layout(model, params)
    cfg: IA3Config = params.config
    state = ly.base_state(model, base)
    out = dict(state)
    for site in layout.sites:
        ff, kind = is_feedforward(cfg, site.name), _kind(site.name, site.module)
        vec = params[site.keys["ia3_l"]].float()
        wkey, bkey = f"{site.name}.weight", f"{site.name}.bias"
        if wkey not in state:
            raise ParamsMismatchError(f"merge: the base state has no {wkey!r} ((IA)³ adapts module {site.name!r})")
        W = state[wkey]
        factor = _weight_factor(site.module, kind, ff, vec)
        new_w = W.float() / (factor + _EPS) if invert else W.float() * factor
        ly.set_with_aliases(out, state, wkey, new_w.to(W.dtype))
        if not ff and bkey in state and getattr(site.module, "bias", None) is not None:
            b = state[bkey]
            scale = vec.reshape(b.shape)
            new_b = b.float() / (scale + _EPS) if invert else b.float() * scale
            ly.set_with_aliases(out, state, bkey, new_b.to(b.dtype))
    if not invert:
        ly.merge_overrides(layout, params, state, out)
    return out


def merge(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """New base weights with ``l`` folded in (fp32, rounded once); ``modules_to_save`` copies replace theirs.

    Feed-forward modules: weight columns times ``l``; others: weight rows and
    bias times ``l``.  ``base`` defaults to the model's parameters and buffers;
    untouched entries are the same tensor objects.  Pure.
    """
    return _merge_impl(model, params, base, invert=False)


def unmerge(model: nn.Module, params: TunerParams, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide ``l`` out again (``/ (l + 1e-8)`` as PEFT, so approximate near zero); ``modules_to_save`` stay."""
    return _merge_impl(model, params, merged, invert=True)


def _union(values: list[Any], field: str) -> Any:
    """PEFT's union of ``target_modules`` / ``feedforward_modules``: regexes OR-ed, lists joined (same kind)."""
    if len({isinstance(v, str) for v in values}) > 1:
        raise ConfigError(
            f"add_weighted_adapter: the adapters' {field} mix a regex and a list ({values}); PEFT refuses the same"
        )
    if isinstance(values[0], str):
        return "|".join(f"({v})" for v in values)
    return tuple(sorted({m for v in values for m in v}))


def add_weighted_adapter(
    adapters: Any,
    weights: Any,
    adapter_name: str = "combined",
    combination_type: str = "linear",
    *,
    model: nn.Module | None = None,
    names: Any = None,
    **options: Any,
) -> TunerParams:
    """PEFT's ``IA3Model.add_weighted_adapter``, pure: each module's ``l = sum_i w_i l_i`` (adapters that adapt it).

    ``adapters``: a sequence of (IA)³ params or a ``{name: params}`` mapping (``names`` picks some, in order).
    The new config is the first adapter's with the union of ``target_modules`` and ``feedforward_modules``.
    PEFT has one combination (no types): ``combination_type`` may be ``"linear"`` or the shim's default
    ``"svd"`` (both mean it); LoRA's options (``density``, ``svd_rank``...) are refused unless left at their
    defaults.  Refused (:class:`ConfigError`): ``modules_to_save`` (PEFT gives the combined adapter a fresh copy
    of the base module, not a combination of the trained copies, and refuses two adapters saving one module),
    a module that is feed-forward in one adapter and not in another (its vectors scale different sides).
    """
    check_adapter_name(adapter_name)
    chosen = list(adapters.values()) if isinstance(adapters, Mapping) and names is None else None
    if chosen is None:
        chosen = [adapters[n] for n in names] if names is not None else list(adapters)
    defaults: dict[str, Any] = {
        "svd_rank": None,
        "svd_clamp": None,
        "svd_full_matrices": True,
        "svd_driver": None,
        "density": None,
    }
    defaults |= {"majority_sign_method": "total", "generator": None}
    odd = sorted(k for k, v in options.items() if k not in defaults or v != defaults[k])
    if combination_type not in ("linear", "svd") or odd:
        raise ConfigError(
            f"add_weighted_adapter: (IA)³ adapters combine one way (the weighted sum of their vectors, as PEFT's"
            f" IA3Model); got combination_type={combination_type!r}{f' and {odd}' if odd else ''}"
        )
    if not chosen or len(chosen) != len(list(weights)):
        raise ConfigError(f"add_weighted_adapter: got {len(chosen)} adapter(s) and {len(list(weights))} weight(s)")
    for p in chosen:
        if not isinstance(p.config, IA3Config):
            raise ConfigError(f"add_weighted_adapter: adapter {p.adapter_name!r} is not an (IA)³ adapter")
        if p.config.modules_to_save:
            raise ConfigError(
                f"add_weighted_adapter cannot combine adapter {p.adapter_name!r}: it has modules_to_save="
                f"{list(p.config.modules_to_save)} (PEFT gives the combined adapter a fresh copy of the base module,"
                " not a combination of the trained copies); combine adapters without it"
            )
    sums: dict[str, torch.Tensor] = {}
    ff: dict[str, bool] = {}
    for p, w in zip(chosen, weights, strict=True):
        for key in p:
            module = key.rsplit(".ia3_l.", 1)[0]
            side = is_feedforward(p.config, module)
            if ff.setdefault(module, side) != side:
                raise ConfigError(
                    f"add_weighted_adapter: module {module!r} is feed-forward (input-scaled) in one adapter and"
                    " output-scaled in another; their vectors cannot be added"
                )
            sums[module] = sums[module] + p[key] * float(w) if module in sums else p[key] * float(w)
    configs = [p.config for p in chosen]
    config = dataclasses.replace(
        configs[0],
        target_modules=_union([c.target_modules for c in configs], "target_modules"),
        feedforward_modules=_union([c.feedforward_modules for c in configs], "feedforward_modules"),
    )
    params = TunerParams({f"{m}.ia3_l.{adapter_name}": t for m, t in sums.items()}, config, adapter_name)
    if model is not None:
        validate(model, params)
    return params


# PEFT's checkpoint layout for these params (``<module>.<name>`` under ``base_model.model.``): functuner.load /
# functuner.save read and write it; Swift.from_pretrained still hands PEFT directories to peft (shim_reads=False).
PEFT_FORMAT = ly.peft_format("IA3", NAMES, "(IA)³")


tuner = Tuner(
    swift_type="IA3",
    config_cls=IA3Config,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    key_naming=KeyNaming(after=NAMES),
    peft=PEFT_FORMAT,
    check_model=ly.model_check(expected_shapes),
    check_state=ly.state_check(NAMES, "(IA)³"),
    sub_batch=module_local,
    combine=add_weighted_adapter,
)
