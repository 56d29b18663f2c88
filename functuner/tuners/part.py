"""Part tuning with SWIFT's ``PartConfig``: train a copy of the targeted modules' weights.

Per targeted module, the call runs the module with its parameters replaced by
the params' copies (on a per-call clone of the module, via
:func:`~functuner.tuners.base.override_slot`; the model is never written to).
Switching parts is switching params.  The merged form is the weight
replacement itself (:func:`merge`); the original weights cannot be recovered
from the params, so there is no ``unmerge`` (keep the originals: ``merge``
never overwrites them).

Param names = SWIFT's in-memory names: ``<module>._part_<adapter>.<param>``, one
per parameter of the module (``named_parameters``); SWIFT's checkpoint files
use the original keys ``<module>.<param>`` (see
:func:`to_swift_keys` / :func:`from_swift_keys`, the disk layer's hooks).

Differences from SWIFT, on purpose: when the regex matches a module and some
of its submodules, only the outermost match is copied (SWIFT copies both but
only the outer copy is ever run, and both write the same checkpoint keys);
buffers are not copied (SWIFT's copies hold them but never train them).
A Part and another tuner on the same module: put the Part params first in
``apply``'s list (Part recomputes the module's output).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..core.targets import own_named_modules, own_named_parameters
from ..errors import CheckpointError, ConfigError, ParamsMismatchError, TargetError
from .base import CallContext, KeyNaming, Tuner, TunerConfig, override_slot

__all__ = [
    "PartConfig",
    "from_swift_keys",
    "init",
    "merge",
    "part_from_swift_state_dict",
    "part_to_swift_state_dict",
    "routes",
    "target_names",
    "to_swift_keys",
    "tuner",
    "validate",
]


@dataclass(frozen=True, eq=False)
class PartConfig(TunerConfig):
    """SWIFT's ``PartConfig``: ``target_modules`` is a regex matching whole module names."""

    target_modules: Any = None
    swift_type: str = "part"
    model_key_mapping: Any = None

    def check(self, *, complete: bool = True) -> None:
        """Field checks (:meth:`TunerConfig.check`); unset required fields only when ``complete``."""
        if self.target_modules is None and not complete:
            return
        if not isinstance(self.target_modules, str):
            raise ConfigError(
                f"PartConfig.target_modules must be a regex string (as in SWIFT), got {self.target_modules!r}"
            )
        try:
            re.compile(self.target_modules)
        except re.error as e:
            raise ConfigError(f"PartConfig.target_modules={self.target_modules!r} is not a valid regex: {e}") from None


def target_names(model: nn.Module, config: PartConfig) -> list[str]:
    """Names of the outermost modules ``config.target_modules`` fully matches (with parameters). Pure."""
    names = [n for n, _ in own_named_modules(model) if n and re.fullmatch(config.target_modules, n)]
    outer = [n for n in names if not any(n != o and (o == "" or n.startswith(o + ".")) for o in names)]
    outer = [n for n in outer if any(True for _ in own_named_parameters(model.get_submodule(n)))]
    if not outer:
        sample = [n for n, _ in own_named_modules(model) if n][:8]
        raise TargetError(
            f"PartConfig.target_modules={config.target_modules!r} matched no module with parameters"
            f" in {type(model).__name__}; some module names: {sample}"
        )
    return outer


def init(
    model: nn.Module, config: PartConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Copies (``clone``, detached, same dtype/device) of every parameter of each targeted module. Pure.

    Parameters functuner placed inside the module (the stateful shim's holders of other
    adapters' tensors: another Part's ``_part_<other>``, LoRA's ``lora_A``...) are skipped.

    ``generator`` is unused (a Part starts equal to the base model).
    """
    if not isinstance(config, PartConfig):
        raise ConfigError(f"part.init needs a PartConfig, got {type(config).__name__}")
    config.check()
    tensors: dict[str, torch.Tensor] = {}
    for name in target_names(model, config):
        for pname, p in own_named_parameters(model.get_submodule(name)):
            if any(part.startswith("_part_") for part in pname.split(".")):
                continue  # another Part's copy registered inside the module (the stateful shim does that)
            tensors[f"{name}._part_{adapter_name}.{pname}"] = p.detach().clone()
    return TunerParams(tensors, config, adapter_name)


def _layout(model: nn.Module, params: TunerParams) -> dict[str, dict[str, str]]:
    """``{module name: {param name relative to it: params key}}``, checked against the model."""
    marker = f"._part_{params.adapter_name}."
    layout: dict[str, dict[str, str]] = {}
    for key in params:
        name, sep, pname = key.partition(marker)
        if not sep:
            raise ParamsMismatchError(f"params key {key!r} is not a part tensor of adapter {params.adapter_name!r}")
        layout.setdefault(name, {})[pname] = key
    for name, pairs in layout.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ParamsMismatchError(f"params refer to module {name!r}, which the model lacks") from None
        own = dict(module.named_parameters())
        for pname, key in pairs.items():
            if pname not in own:
                raise ParamsMismatchError(f"params key {key!r}: module {name!r} has no parameter {pname!r}")
            if tuple(own[pname].shape) != tuple(params[key].shape):
                raise ParamsMismatchError(
                    f"params[{key!r}] has shape {tuple(params[key].shape)}; {name}.{pname} has"
                    f" {tuple(own[pname].shape)}"
                )
    return layout


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    _layout(model, params)


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """An override slot per targeted module: it is re-run with the part's parameters."""
    fwd: dict[nn.Module, list[Any]] = {}
    for name, pairs in _layout(model, params).items():
        module = model.get_submodule(name)
        fwd[module] = [override_slot({pname: params[key] for pname, key in pairs.items()})]
    ensure_slots(list(fwd))
    return Routes(forward=fwd)


def merge(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Base weights with each targeted parameter replaced by the part's copy (tied aliases too). Pure.

    ``base`` defaults to the model's parameters and buffers.  Returns a new
    dict; untouched entries are the same tensor objects as in ``base``.
    """
    if base is None:
        base = dict(model.named_parameters(remove_duplicate=False))
        base.update(dict(model.named_buffers(remove_duplicate=False)))
    out = dict(base)
    for name, pairs in _layout(model, params).items():
        for pname, key in pairs.items():
            full = f"{name}.{pname}" if name else pname
            if full not in base:
                raise ParamsMismatchError(f"merge: base state has no {full!r}")
            old = base[full]
            for k, t in base.items():
                if k == full or t is old:
                    out[k] = params[key].to(dtype=old.dtype)
    return out


# -- on disk: SWIFT saves Part copies at the original keys --------------------------------------------
def to_swift_keys(state: Mapping[str, torch.Tensor], config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """Part params -> SWIFT's on-disk keys: ``<module>._part_<adapter>.<param>`` -> ``<module>.<param>``. Pure.

    Keys without the marker pass through unchanged (``config`` is not needed).
    """
    marker = f"._part_{adapter_name}."
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if marker in key:
            mod, _, rest = key.partition(marker)
            key = f"{mod}.{rest}"
        out[key] = value
    return out


def from_swift_keys(state: Mapping[str, torch.Tensor], config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """SWIFT's Part keys (original ``<module>.<param>``) -> ``<module>._part_<adapter>.<param>`` for ``config``. Pure."""
    return part_from_swift_state_dict(state, config.target_modules, adapter_name)


def part_to_swift_state_dict(
    state: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """Part params -> SWIFT's on-disk keys (:func:`to_swift_keys` without a config)."""
    return to_swift_keys(state, None, adapter_name)


def part_from_swift_state_dict(
    state: Mapping[str, torch.Tensor],
    target: str | Sequence[str],
    adapter_name: str = "default",
) -> dict[str, torch.Tensor]:
    """SWIFT's Part keys (original ``<module>.<param>``) -> ``<module>._part_<adapter>.<param>``.

    ``target`` is either ``PartConfig.target_modules`` (a regex: the module of a
    key is its *shortest* dotted prefix the regex fully matches, i.e. the
    outermost targeted module, no model needed) or the targeted module names.
    Keys already named ``<module>._part_<adapter>.<param>`` pass through.  A key
    under no targeted module is an error naming the key.
    """
    if isinstance(target, str):
        pattern = re.compile(target)

        def owner_of(key: str) -> str | None:
            parts = key.split(".")
            return next(
                (".".join(parts[:i]) for i in range(1, len(parts)) if pattern.fullmatch(".".join(parts[:i]))), None
            )
    else:
        mods = sorted(target, key=len, reverse=True)

        def owner_of(key: str) -> str | None:
            return next((m for m in mods if key.startswith(m + ".")), None)

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if f"._part_{adapter_name}." in key:  # already in memory naming (SWIFT loads these too)
            out[key] = value
            continue
        owner = owner_of(key)
        if owner is None:
            raise CheckpointError(f"key {key!r} lies under no module targeted by the Part adapter ({target!r})")
        out[f"{owner}._part_{adapter_name}.{key[len(owner) + 1 :]}"] = value
    return out


tuner = Tuner(
    swift_type="part",
    config_cls=PartConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    to_swift_keys=to_swift_keys,
    from_swift_keys=from_swift_keys,
    key_naming=KeyNaming(glued=(("_part_", None),)),
)
