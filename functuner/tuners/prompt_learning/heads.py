"""``modules_to_save`` for prompt learning: trained full copies of whole modules (PEFT's classifier heads).

PEFT's ``PeftModelForSequenceClassification`` / ``PeftModelForTokenClassification`` add ``"classifier"`` and
``"score"`` to ``modules_to_save`` and train a copy of those heads beside the virtual tokens.  Here the copies
are params named ``<module>.modules_to_save.<adapter>.<param>`` (float32 as the model's own dtype is kept), and
a forward slot runs the module with them (the model is never written to).  :mod:`functuner.io.keys` stores
them at the original module's keys in both layouts (PEFT: ``base_model.model.<module>.<param>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...core.routing import Routes, ensure_slots
from ...core.targets import match_name
from ...errors import ConfigError, ParamsMismatchError
from ..base import override_slot

__all__ = ["CLASSIFIER_HEADS", "MARK", "copies", "head_routes", "split", "validate_heads"]

CLASSIFIER_HEADS = ("classifier", "score")  # what PEFT 0.21 adds to modules_to_save for SEQ_CLS / TOKEN_CLS
MARK = ".modules_to_save."


def _spec(config: Any) -> tuple[str, ...]:
    spec = config.modules_to_save
    return () if not spec else ((spec,) if isinstance(spec, str) else tuple(spec))


def _modules(model: nn.Module, config: Any) -> list[tuple[str, nn.Module]]:
    """The modules ``modules_to_save`` names (PEFT's exact-or-suffix rule; the outermost of nested matches)."""
    spec = _spec(config)
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and match_name(name, list(spec)) and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    return found


def copies(model: nn.Module, config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """Fresh copies of the ``modules_to_save`` modules' parameters (their current values, as PEFT copies them)."""
    spec = _spec(config)
    found = _modules(model, config)
    # PEFT requires each name to match (task-type heads excepted: a model has "classifier" or "score")
    missing = [m for m in spec if m not in CLASSIFIER_HEADS and not any(match_name(n, [m]) for n, _ in found)]
    if missing:
        raise ConfigError(
            f"{type(config).__name__}.modules_to_save={list(spec)}: no module of the model matches {missing}"
        )
    return {
        f"{name}{MARK}{adapter_name}.{p}": t.detach().clone()
        for name, module in found
        for p, t in module.named_parameters()
    }


def split(params: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(the tuner's own tensors, the modules_to_save copies)``."""
    own = {k: v for k, v in params.items() if MARK not in k}
    return own, {k: v for k, v in params.items() if MARK in k}


def validate_heads(model: nn.Module, heads: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    """Raise :class:`ParamsMismatchError` unless each copy names a parameter of the model with its shape."""
    state = dict(model.named_parameters())
    for key, t in heads.items():
        mod, _, rest = key.partition(MARK)
        name, _, leaf = rest.partition(".")
        base = state.get(f"{mod}.{leaf}")
        if name != adapter_name or base is None or tuple(base.shape) != tuple(t.shape):
            raise ParamsMismatchError(
                f"params[{key!r}]: expected a copy of the model's {mod}.{leaf} for adapter {adapter_name!r}"
                f" (shape {None if base is None else tuple(base.shape)}), got shape {tuple(t.shape)}"
            )


def head_routes(model: nn.Module, heads: Mapping[str, torch.Tensor]) -> Routes:
    """Forward slots running each copied module with its copy (``{}`` routes when there are none)."""
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in heads.items():
        mod, _, rest = key.partition(MARK)
        per_module.setdefault(mod, {})[rest.partition(".")[2]] = t
    modules = {model.get_submodule(m): overrides for m, overrides in per_module.items()}
    if modules:
        ensure_slots(list(modules))
    return Routes(forward={m: [override_slot(o)] for m, o in modules.items()})
