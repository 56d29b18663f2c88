"""Shared machinery of the PEFT-style per-module tuners (LoHa, LoKr and (IA)³).

These tuners store, per adapted module ``m``, a few named tensors under PEFT's
in-memory names ``<m>.<tensor name>.<adapter>`` (``hada_w1_a``, ``lokr_w1``,
``ia3_l``...), and optionally full copies of other modules
(``modules_to_save``: ``<m>.modules_to_save.<adapter>.<param>``).  This module
holds what they share:

* :func:`build_layout`: group params keys by module, check them against the
  shapes the tuner expects for that module and config (the tuner passes a
  function), and cache the result per model and params structure;
* ``modules_to_save`` copies: :func:`init_modules_to_save`,
  :func:`override_routes`, :func:`merge_overrides`;
* the disk-layer hooks (:func:`peft_format`, :func:`model_check`,
  :func:`state_check`): PEFT stores these tensors at ``<m>.<tensor name>``
  (adapter name dropped) under ``base_model.model.``, and its
  ``adapter_config.json`` is the config's fields plus ``peft_type``;
* LyCORIS config validation (:func:`check_lycoris_fields`) and the training-time
  randomness of LoHa/LoKr (module dropout, rank dropout) drawn from an explicit
  generator.

Everything here is pure: it reads the model and the params and returns new objects.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..core.targets import match_name, own_named_modules, own_named_parameters, select_modules
from ..errors import CheckpointError, ConfigError, ParamsMismatchError, TargetError, UnsupportedModuleError
from ..quant.registry import check_supported
from .spec import CallContext

__all__ = [
    "Layout",
    "Site",
    "base_state",
    "build_layout",
    "check_lycoris_fields",
    "conv_or_linear",
    "DeltaFunctions",
    "delta_functions",
    "delta_routes",
    "first_arg",
    "init_modules_to_save",
    "keep_module",
    "model_check",
    "peft_format",
    "state_check",
    "merge_deltas",
    "merge_overrides",
    "override_routes",
    "rank_drop_mask",
    "replace_first_arg",
    "selected_modules",
    "set_with_aliases",
]


class Site(NamedTuple):
    """One adapted module: its name, the module, and ``{tensor name: params key}`` for its tensors."""

    name: str
    module: nn.Module
    keys: Mapping[str, str]


class Layout(NamedTuple):
    """Adapted modules plus ``modules_to_save`` overrides: ``(module, ((param name, params key), ...))``."""

    sites: tuple[Site, ...]
    overrides: tuple[tuple[str, nn.Module, tuple[tuple[str, str], ...]], ...]


# delta(module name, {tensor name: tensor}, base weight shape) -> full-size weight change in the tensors' dtype
DeltaFn = Callable[[str, Mapping[str, torch.Tensor], tuple[int, ...]], torch.Tensor]
# expected(module name, module, config) -> {tensor name: shape}; raises UnsupportedModuleError for a bad module
ExpectedFn = Callable[[str, nn.Module, Any], dict[str, tuple[int, ...]]]

# the PEFT release whose math and checkpoint layout these tuners follow (written as ``peft_version`` when unset)
PEFT_LAYOUT_VERSION = "0.21.2"

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, Layout]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _find_module(model: nn.Module, name: str, key: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ParamsMismatchError(
            f"params key {key!r} refers to module {name!r}, which the model does not have"
        ) from None


def _build(model: nn.Module, params: TunerParams, names: Sequence[str], expected: ExpectedFn, what: str) -> Layout:
    ad = params.adapter_name
    groups: dict[str, dict[str, str]] = {}
    overrides: dict[str, list[tuple[str, str]]] = {}
    for key in params:
        if ".modules_to_save." in key:
            mname, _, rest = key.partition(".modules_to_save.")
            if not rest.startswith(ad + "."):
                raise ParamsMismatchError(f"params key {key!r} does not carry adapter name {ad!r}")
            overrides.setdefault(mname, []).append((rest[len(ad) + 1 :], key))
            continue
        for tname in names:
            marker = f".{tname}.{ad}"
            if key.endswith(marker):
                groups.setdefault(key[: -len(marker)], {})[tname] = key
                break
        else:
            raise ParamsMismatchError(
                f"params key {key!r} is not a {what} tensor of adapter {ad!r}; expected '<module>.<name>.{ad}' with"
                f" <name> one of {list(names)}, or '<module>.modules_to_save.{ad}.<param>'"
            )
    sites: list[Site] = []
    for mname, keys in groups.items():
        module = _find_module(model, mname, next(iter(keys.values())))
        want = expected(mname, module, params.config)
        have = {t: tuple(params[k].shape) for t, k in keys.items()}
        if set(have) != set(want):
            raise ParamsMismatchError(
                f"{what} params for module {mname!r} ({type(module).__name__}) have tensors {sorted(have)}, but the"
                f" config and module need {sorted(want)} (check r / rank_pattern / use_effective_conv2d /"
                " decompose_both / feedforward_modules)"
            )
        for t, shape in want.items():
            if have[t] != shape:
                raise ParamsMismatchError(
                    f"params[{keys[t]!r}] has shape {have[t]}, but module {mname!r} ({type(module).__name__},"
                    f" weight {tuple(cast(torch.Tensor, module.weight).shape)}) with this config needs {shape}"
                )
        sites.append(Site(mname, module, dict(keys)))
    outs: list[tuple[str, nn.Module, tuple[tuple[str, str], ...]]] = []
    for mname, pairs in overrides.items():
        module = _find_module(model, mname, pairs[0][1])
        own = dict(module.named_parameters())
        for pname, key in pairs:
            if pname not in own or tuple(own[pname].shape) != tuple(params[key].shape):
                found = tuple(own[pname].shape) if pname in own else "no such parameter"
                raise ParamsMismatchError(
                    f"params[{key!r}] (shape {tuple(params[key].shape)}) does not fit {mname}.{pname} ({found})"
                )
        outs.append((mname, module, tuple(pairs)))
    return Layout(tuple(sites), tuple(outs))


def build_layout(
    model: nn.Module, params: TunerParams, names: Sequence[str], expected: ExpectedFn, what: str
) -> Layout:
    """The checked layout of ``params`` on ``model``, cached per model and params structure (names, config, shapes).

    ``names`` are the tuner's tensor names (``hada_w1_a``...); ``expected`` gives,
    per module, the exact ``{tensor name: shape}`` the config needs there.
    Raises :class:`ParamsMismatchError` naming the key, the module and the fix.
    """
    sig = (tuple(params), params.config, params.adapter_name, tuple(tuple(t.shape) for t in params.values()))
    with _LOCK:
        per_model = _CACHE.get(model)
        layout = per_model.get(sig) if per_model is not None else None
    if layout is None:
        layout = _build(model, params, names, expected, what)
        with _LOCK:
            _CACHE.setdefault(model, {})[sig] = layout
    return layout


# ---------------------------------------------------------------------------
# target selection and modules_to_save
# ---------------------------------------------------------------------------
def selected_modules(model: nn.Module, config: Any) -> list[tuple[str, nn.Module]]:
    """Modules ``config`` targets (PEFT's rules), without those ``modules_to_save`` claims."""
    selected = select_modules(
        model,
        config.target_modules,
        exclude_modules=getattr(config, "exclude_modules", None),
        layers_to_transform=getattr(config, "layers_to_transform", None),
        layers_pattern=getattr(config, "layers_pattern", None),
    )
    if config.modules_to_save:
        selected = [(n, m) for n, m in selected if not match_name(n, config.modules_to_save)]
        if not selected:
            raise TargetError(f"every module target_modules={config.target_modules!r} selects is in modules_to_save")
    for name, module in selected:  # before any tensor is read: a packed weight would give wrong shapes or raw errors
        if check_supported(module, name) is not None:
            raise UnsupportedModuleError(
                f"module {name!r} is a quantized layer ({type(module).__module__}.{type(module).__name__});"
                f" {type(config).__name__} adapts float layers only: use LoRA / DoRA on a quantized base"
                " (see docs/quantization.md), exclude the module (exclude_modules), or dequantize the model first"
            )
    return selected


def init_modules_to_save(model: nn.Module, config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter of each ``modules_to_save`` module (PEFT's in-memory names)."""
    out: dict[str, torch.Tensor] = {}
    if not config.modules_to_save:
        return out
    for mname, module in own_named_modules(model):
        if mname and match_name(mname, config.modules_to_save):
            for pname, p in own_named_parameters(module):
                out[f"{mname}.modules_to_save.{adapter_name}.{pname}"] = p.detach().clone()
    if not out:
        raise ConfigError(f"modules_to_save={list(config.modules_to_save)!r} matched no module with parameters")
    return out


def override_routes(layout: Layout, params: TunerParams, fwd: dict[nn.Module, list[Any]]) -> None:
    """Put an override slot (the module re-run with the copies) first at each ``modules_to_save`` module."""
    from .base import override_slot

    for _, module, pairs in layout.overrides:
        fwd.setdefault(module, []).insert(0, override_slot({pname: params[key] for pname, key in pairs}))


def base_state(model: nn.Module, base: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor]:
    """``base``, or the model's parameters and buffers (tied weights under every name)."""
    if base is not None:
        return base
    state: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    return state


def set_with_aliases(
    out: dict[str, torch.Tensor], base: Mapping[str, torch.Tensor], key: str, value: torch.Tensor
) -> None:
    """Write ``value`` at ``key`` and at every other key that shares the base tensor (tied weights)."""
    if key not in base:
        raise ParamsMismatchError(f"merge: the base state has no {key!r}")
    old = base[key]
    out[key] = value
    for k, t in base.items():
        if t is old and k != key:
            out[k] = value


def merge_overrides(
    layout: Layout, params: TunerParams, base: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor]
) -> None:
    """Replace each ``modules_to_save`` parameter in ``out`` by the params' copy (the merged form of the override)."""
    for mname, _, pairs in layout.overrides:
        for pname, key in pairs:
            set_with_aliases(out, base, f"{mname}.{pname}" if mname else pname, params[key])


# ---------------------------------------------------------------------------
# configs and forward helpers
# ---------------------------------------------------------------------------
def check_lycoris_fields(cfg: Any) -> None:
    """PEFT's ``LycorisConfig`` checks, raised as :class:`ConfigError` naming the field."""
    name = type(cfg).__name__
    if isinstance(cfg.r, bool) or not isinstance(cfg.r, int) or cfg.r <= 0:
        raise ConfigError(f"{name}.r must be a positive integer, got r={cfg.r!r}")
    if isinstance(cfg.alpha, bool) or not isinstance(cfg.alpha, (int, float)):
        raise ConfigError(f"{name}.alpha must be a number, got {cfg.alpha!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(getattr(cfg, field), dict):
            raise ConfigError(
                f"{name}.{field} must be a dict {{module-name regex: value}}, got {getattr(cfg, field)!r}"
            )
    for key, val in cfg.rank_pattern.items():
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ConfigError(f"{name}.rank_pattern[{key!r}] must be a positive integer, got {val!r}")
    for field in ("rank_dropout", "module_dropout"):
        if not 0.0 <= float(getattr(cfg, field)) < 1.0:
            raise ConfigError(f"{name}.{field} must be in [0, 1), got {getattr(cfg, field)!r}")
    if cfg.layers_pattern and cfg.layers_to_transform is None:
        raise ConfigError(
            f"{name}: layers_pattern={cfg.layers_pattern!r} needs layers_to_transform as well (as in PEFT)"
        )


def keep_module(p: float, generator: torch.Generator | None) -> bool:
    """LyCORIS module dropout in training: keep the adapter with probability ``1 - p`` (PEFT: ``rand(1) > p``)."""
    if p <= 0.0:
        return True
    draw = torch.rand(1) if generator is None else torch.rand(1, generator=generator)
    return bool(draw.item() > p)


def rank_drop_mask(rows: int, p: float, rescale: bool, generator: torch.Generator | None) -> torch.Tensor:
    """LyCORIS rank dropout: a float32 ``(rows,)`` keep-mask of the delta weight's rows, divided by its mean if ``rescale``."""
    draw = torch.rand(rows) if generator is None else torch.rand(rows, generator=generator)
    mask = (draw > p).float()
    return mask / mask.mean() if rescale else mask


def first_arg(args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> torch.Tensor:
    """The module's input tensor (first positional argument, or ``input``/``x``/``hidden_states``)."""
    if args:
        return cast(torch.Tensor, args[0])
    for k in ("input", "x", "hidden_states"):
        if k in kwargs:
            return cast(torch.Tensor, kwargs[k])
    raise TypeError(f"{what} slot: could not find the module's input tensor (no positional argument)")


def replace_first_arg(
    args: tuple[Any, ...], kwargs: dict[str, Any], value: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` with the module's input tensor replaced by ``value`` (new containers)."""
    if args:
        return (value, *args[1:]), kwargs
    for k in ("input", "x", "hidden_states"):
        if k in kwargs:
            return args, {**kwargs, k: value}
    raise TypeError("slot: could not find the module's input tensor (no positional argument)")


# ---------------------------------------------------------------------------
# additive weight-delta tuners (LoHa, LoKr): forward slot, routes, merge
# ---------------------------------------------------------------------------
def conv_or_linear(module: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``module``'s op (linear, or conv with its stride/padding/dilation/groups) with ``weight`` and no bias."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.Conv1d):
        return F.conv1d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight)


def _delta_slot(
    delta_fn: DeltaFn,
    name: str,
    tensors: dict[str, torch.Tensor],
    dropouts: tuple[float, float, bool],
    generator: torch.Generator | None,
    module: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    """``base(x) + op(x, dW)`` in PEFT's dtype order: ``x`` cast to the adapter dtype, the sum cast back to ``x``'s."""
    module_dropout, rank_dropout, rescale = dropouts
    x = first_arg(args, kwargs, "LyCORIS")
    if module.training and not keep_module(module_dropout, generator):
        return out.to(x.dtype)
    delta = delta_fn(name, tensors, tuple(module.weight.shape))
    if module.training and rank_dropout > 0:
        mask = rank_drop_mask(delta.shape[0], rank_dropout, rescale, generator)
        delta = delta * mask.to(device=delta.device, dtype=delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
    return (out + conv_or_linear(module, x.to(delta.dtype), delta)).to(x.dtype)


def delta_routes(
    layout: Layout,
    params: TunerParams,
    delta_fn: DeltaFn,
    dropouts: tuple[float, float, bool],
    generator: torch.Generator | None,
) -> Routes:
    """A slot per adapted module adding ``op(x, dW)``; ``modules_to_save`` overrides run first.

    ``dropouts`` is ``(module_dropout, rank_dropout, rescale rank dropout)``,
    applied only while the module is in training mode.
    """
    fwd: dict[nn.Module, list[Any]] = {}
    for site in layout.sites:
        tensors = {t: params[k] for t, k in site.keys.items()}
        fwd.setdefault(site.module, []).append(
            functools.partial(_delta_slot, delta_fn, site.name, tensors, dropouts, generator)
        )
    override_routes(layout, params, fwd)
    ensure_slots(list(fwd))
    return Routes(forward=fwd)


def merge_deltas(
    model: nn.Module,
    layout: Layout,
    params: TunerParams,
    base: Mapping[str, torch.Tensor] | None,
    sign: float,
    delta_fn: DeltaFn,
) -> dict[str, torch.Tensor]:
    """``W + sign * dW`` per adapted module (fp32, rounded once to ``W``'s dtype, tied aliases too).

    ``sign > 0`` (merge) also replaces ``modules_to_save`` parameters by their
    copies; ``sign < 0`` (unmerge) leaves them as they are.  Pure.
    """
    state = base_state(model, base)
    out = dict(state)
    for site in layout.sites:
        wkey = f"{site.name}.weight"
        if wkey not in state:
            raise ParamsMismatchError(f"merge: the base state has no {wkey!r} (the adapter targets {site.name!r})")
        W = state[wkey]
        f32 = {t: params[k].float() for t, k in site.keys.items()}
        delta = delta_fn(site.name, f32, tuple(W.shape))
        set_with_aliases(out, state, wkey, (W.float() + sign * delta).to(W.dtype))
    if sign > 0:
        merge_overrides(layout, params, state, out)
    return out


# ---------------------------------------------------------------------------
# disk-layer hooks (functuner.io calls them through the Tuner fields)
# ---------------------------------------------------------------------------
def peft_format(peft_type: str, names: Sequence[str], what: str) -> Any:
    """The :class:`~functuner.tuners.base.PeftFormat` of a tuner whose tensors are ``<m>.<name>.<adapter>``.

    PEFT's files name them ``<m>.<name>`` (``get_peft_model_state_dict`` drops
    the adapter name); its ``adapter_config.json`` holds the config's fields and
    ``peft_type`` (not ``swift_type``).  ``shim_reads=False``: ``Swift.from_pretrained``
    hands such PEFT directories to ``peft`` (a ``PeftModel``, SWIFT's contract);
    ``functuner.load`` reads them as ``TunerParams``.
    """
    from .base import PeftFormat

    def config_to_json(config: Any) -> dict[str, Any]:
        data = cast(dict[str, Any], config.to_dict())
        data.pop("swift_type", None)
        data["peft_type"] = peft_type
        if data.get("peft_version") is None:  # PEFT always writes it; OFT's loader refuses a file without it
            data["peft_version"] = PEFT_LAYOUT_VERSION
        return data

    def to_keys(state: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            tname = next((t for t in names if key.endswith(f".{t}.{adapter_name}")), None)
            if tname is None:
                raise CheckpointError(
                    f"key {key!r} is not a tensor of {what} adapter {adapter_name!r}; cannot name it for PEFT"
                )
            out[key[: -len(adapter_name) - 1]] = value
        return out

    def from_keys(state: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if not any(key.endswith(f".{t}") for t in names):
                raise CheckpointError(
                    f"PEFT key 'base_model.model.{key}' is not a {what} tensor (expected '<module>.<name>' with <name>"
                    f" one of {list(names)}, or a modules_to_save copy)"
                )
            out[f"{key}.{adapter_name}"] = value
        return out

    return PeftFormat(
        peft_type=peft_type, config_to_json=config_to_json, to_keys=to_keys, from_keys=from_keys, shim_reads=False
    )


def model_check(expected: ExpectedFn) -> Callable[[nn.Module, Any, str], None]:
    """A ``check_model`` hook: the config read from ``source`` selects modules this tuner can adapt, before any tensor."""

    def check(model: nn.Module, config: Any, source: str) -> None:
        try:
            for name, module in selected_modules(model, config):
                expected(name, module, config)
        except TargetError as e:
            raise TargetError(f"{source}: {e}") from None
        except (ConfigError, UnsupportedModuleError) as e:
            raise CheckpointError(f"{source}: {e}") from None

    return check


def state_check(names: Sequence[str], what: str) -> Callable[[Any, Mapping[str, torch.Tensor], str], None]:
    """A ``check_state`` hook: the tuner's tensors read from ``source`` must be floating point."""

    def check(config: Any, state: Mapping[str, torch.Tensor], source: str) -> None:
        for key, t in state.items():
            if ".modules_to_save." in key or not any(f".{n}." in key + "." for n in names):
                continue
            if not t.is_floating_point():
                raise ParamsMismatchError(
                    f"{source}: tensor {key!r} has dtype {str(t.dtype).replace('torch.', '')}; {what} tensors must be"
                    " floating point (the weights file is corrupt)"
                )

    return check


DeltaOf = Callable[[Any, str, Mapping[str, torch.Tensor], tuple[int, ...]], torch.Tensor]


class DeltaFunctions(NamedTuple):
    """A weight-delta tuner's ``routes``, ``needs_generator``, ``merge`` and ``unmerge`` (see :func:`delta_functions`)."""

    routes: Callable[[nn.Module, TunerParams, CallContext], Routes]
    needs_generator: Callable[[nn.Module, TunerParams], bool]
    merge: Callable[..., dict[str, torch.Tensor]]
    unmerge: Callable[[nn.Module, TunerParams, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


def delta_functions(
    layout_of: Callable[[nn.Module, TunerParams], Layout],
    delta_of: DeltaOf,
    dropouts_of: Callable[[Any], tuple[float, float, bool]],
) -> DeltaFunctions:
    """The pure functions every tuner that adds a weight delta ``dW`` has in common (LoHa, LoKr).

    ``layout_of(model, params)`` finds the adapted modules, ``delta_of(config, module name,
    tensors, weight shape)`` computes one module's ``dW`` and ``dropouts_of(config)`` gives
    ``(module_dropout, rank_dropout, rank_dropout_scale)``.  The results:

    * ``routes``: a slot per adapted module adding ``op(x, dW)``; ``modules_to_save`` overrides run first;
    * ``needs_generator``: whether a call in the model's current mode draws random numbers (dropout in training);
    * ``merge(model, params, base=None)``: new base weights ``W + dW`` (fp32, rounded once to ``W``'s dtype),
      ``modules_to_save`` copies replacing theirs; untouched entries are the same tensor objects;
    * ``unmerge(model, params, merged)``: ``W' - dW`` (fp32, rounded once).
    """

    def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
        cfg = params.config
        delta = functools.partial(delta_of, cfg)
        return delta_routes(layout_of(model, params), params, delta, dropouts_of(cfg), ctx.generator)

    def needs_generator(model: nn.Module, params: TunerParams) -> bool:
        module_dropout, rank_dropout, _ = dropouts_of(params.config)
        if rank_dropout <= 0 and module_dropout <= 0:
            return False
        return any(s.module.training for s in layout_of(model, params).sites)

    def merge(
        model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        delta = functools.partial(delta_of, params.config)
        return merge_deltas(model, layout_of(model, params), params, base, 1.0, delta)

    def unmerge(model: nn.Module, params: TunerParams, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        delta = functools.partial(delta_of, params.config)
        return merge_deltas(model, layout_of(model, params), params, merged, -1.0, delta)

    return DeltaFunctions(routes, needs_generator, merge, unmerge)
