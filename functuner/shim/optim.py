"""Optimizer param groups for the shim (SWIFT's ``create_optimizer_param_groups``).

Design note: a tuner that wants its own learning-rate groups (LoRA+) declares
them with its optional ``Tuner.optimizer_groups`` hook; this module only
dispatches to it per adapter and puts every other trainable parameter into a
weight-decay group or a no-decay group exactly as ``transformers.Trainer``
decides (``Trainer.get_decay_parameter_names``, called as ms-swift does).  No
tuner type is named here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .state import ShimState

__all__ = ["decay_parameter_names", "param_groups"]


def decay_parameter_names(model: nn.Module) -> set[str]:
    """The parameter names ``transformers.Trainer`` applies weight decay to (not biases, not norms)."""
    from transformers import Trainer

    # an unbound call with self=None, exactly as ms-swift does; the method only reads the model
    return set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]


def param_groups(state: ShimState, defaults: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each adapter's own groups (its tuner's ``optimizer_groups`` hook), then decay / no-decay groups of the rest.

    Every trainable parameter is in exactly one group; a parameter two adapters
    share (a trainable bias) goes to the first adapter that claims it.
    """
    wd = defaults.get("weight_decay", 0.0)
    model = state.model
    decay = decay_parameter_names(model)
    names_of = {id(p): n for n, p in model.named_parameters()}

    def decayed(t: torch.Tensor) -> bool:
        return names_of.get(id(t)) in decay

    claimed: set[int] = set()
    groups: list[dict[str, Any]] = []
    for adapter in state.adapters.values():
        hook = adapter.tuner.optimizer_groups
        if hook is None:
            continue
        seen = set(claimed)
        tensors: dict[str, nn.Parameter] = {}
        for k, p in adapter.tensors.items():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                tensors[k] = p
        own = hook(adapter.config, tensors, defaults, decayed)
        if own is None:
            continue
        for g in own:
            claimed.update(id(p) for p in g["params"])
        groups += own
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in claimed]
    groups += [
        {"params": [p for n, p in rest if n in decay], "weight_decay": wd},
        {"params": [p for n, p in rest if n not in decay], "weight_decay": 0.0},
    ]
    return groups
