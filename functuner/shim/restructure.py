"""Adapters whose tuner changes the model's structure before they are created (the ``restructure`` hook).

SWIFT's LLaMA-Pro inserts real decoder layers into the model and trains them; the shim does the same
through the tuner's :attr:`~functuner.tuners.spec.Tuner.restructure` hook (no tuner is named here):
the hook changes the model in place and returns the config the adapter is created with (whose params
are then parameters of the model, so the placement makes them trainable under their own names) and an
undo.  :func:`add_adapters` is :func:`functuner.shim.placement.add_adapters` with those hooks run
first and undone if anything fails, so a failed ``prepare_model`` or ``from_pretrained`` changes
nothing.  Tensors loaded from disk are renamed from the original config's names to the new config's
through their on-disk names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import AdapterNameError
from ..io import keys
from ..tuners import tuner_for
from . import placement
from .state import AdapterEntry, ShimState

__all__ = ["add_adapters", "keeps_trainable"]


def add_adapters(
    state: ShimState, configs: Mapping[str, Any], loaded: Mapping[str, Mapping[str, torch.Tensor]], trainable: bool
) -> None:
    """:func:`~functuner.shim.placement.add_adapters` after each tuner's ``restructure`` hook, all undone on error."""
    if all(tuner_for(c).restructure is None for c in configs.values()):
        placement.add_adapters(state, configs, loaded, trainable)
        return
    for name in configs:  # before the model changes
        if name in state.adapters:
            raise AdapterNameError(f"adapter {name!r} already exists; pass {{new_name: config}} to add another")
    undos: list[Callable[[], None]] = []
    new_configs = dict(configs)
    new_loaded = dict(loaded)
    try:
        for name, cfg in configs.items():
            hook = tuner_for(cfg).restructure
            if hook is None:
                continue
            new_cfg, undo = hook(state.model, cfg, name)
            undos.append(undo)
            new_configs[name] = new_cfg
            if name in loaded:  # the original config's names -> disk names -> the new config's names
                on_disk = keys.to_disk(loaded[name], cfg, name, "swift")
                new_loaded[name] = keys.from_disk(on_disk, new_cfg, name, "swift")
        placement.add_adapters(state, new_configs, new_loaded, trainable)
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise


def keeps_trainable(adapter: AdapterEntry) -> bool:
    """Whether an adapter's tensors that are the model's own parameters are its own (a restructured adapter's
    layers), so ``inference_mode`` leaves them trainable like any adapter's own tensors."""
    return adapter.tuner.restructure is not None
