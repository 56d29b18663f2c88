"""Merged state for the shim: fold adapters into the base weights by swapping weight objects, and swap back.

Design note: ``Swift.merge`` must be exactly undoable and all-or-nothing, so the
new weights are computed by the functional core (:func:`functuner.functional.merge`,
pure, per tuner's ``merge`` hook) *before* anything changes, then swapped in as
new ``Parameter`` / buffer objects while the originals are kept in
``ShimState.originals``; unmerge puts the original objects back (nothing is
subtracted, so it is bit-exact).  Tied weights that only one side of changes are
untied.  This module owns that bookkeeping and ``merge_and_unload``; which
tuners have a merged form is each tuner's business (``Tuner.merge is None``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import ConfigError
from ..functional import merge as core_merge
from ..quant.weights import merged_storage
from .placement import delete_adapter, reload
from .state import ShimState
from .undo import undo_on_error

__all__ = ["merge", "merge_and_unload", "mergeable_active", "unmerge"]


def mergeable_active(state: ShimState) -> list[str]:
    """The active, not yet merged adapters whose tuner has a merged form, in adapter order."""
    active = state.active_set()
    return [n for n, a in state.adapters.items() if n in active and n not in state.merged and a.tuner.merge is not None]


def _unmergeable_active(state: ShimState) -> list[str]:
    active = state.active_set()
    return [n for n, a in state.adapters.items() if n in active and n not in state.merged and a.tuner.merge is None]


class _Merged(NamedTuple):
    """The functional merge of some adapters (pure) and what swapping it in changes."""

    merged: dict[str, torch.Tensor]
    changes: list[tuple[str, torch.Tensor]]  # (key, new value) where the model's tensor changes
    unknown: list[str]  # merged keys the model has no tensor for (HQQ's packed W_q): refused by _swap_in
    shared: dict[int, int]  # id of a model tensor -> how many names it has (tied weights)


def merge(state: ShimState, names: Sequence[str]) -> None:
    """Fold ``names`` into the base weights: all new weights computed first, then swapped in (atomic).

    The undo record covers only the modules whose weights are swapped (the new weights are fresh tensors and the
    originals are kept by reference, so nothing is copied); an offloaded adapter moves its tensors back first,
    and then everything is recorded.
    """
    if not names:
        return
    model = state.model
    if any(state.adapters[n].offload is not None for n in names):
        with undo_on_error(model, state):
            for n in names:
                reload(state, state.adapters[n])
            _swap_in(state, names, _merged_weights(state, names))
        return
    m = _merged_weights(state, names)  # pure: nothing has changed yet
    owners = [_owner(model, k)[0] for k, _ in m.changes]
    with undo_on_error(model, state, modules=owners, adapters=()):
        _swap_in(state, names, m)


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    owner_path, _, leaf = key.rpartition(".")
    return (model.get_submodule(owner_path) if owner_path else model), leaf


def _merged_weights(state: ShimState, names: Sequence[str]) -> _Merged:
    model = state.model
    live: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    live.update(dict(model.named_buffers(remove_duplicate=False)))
    base = {k: v.detach() for k, v in live.items()}  # distinct objects: tied weights are merged per name
    with torch.no_grad():
        merged = core_merge(model, [state.adapters[n].params for n in names], base)
    changes = [(k, v) for k, v in merged.items() if k in base and v is not base[k] and v is not live[k]]
    shared: dict[int, int] = {}
    for t in live.values():
        shared[id(t)] = shared.get(id(t), 0) + 1
    return _Merged(merged, changes, sorted(merged.keys() - base.keys()), shared)


def _swap_in(state: ShimState, names: Sequence[str], m: _Merged) -> None:
    """Make every new weight object, then swap them in and record the originals (inside the caller's undo)."""
    model = state.model
    for k in m.unknown:
        owner, leaf = _owner(model, k)
        merged_storage(owner, leaf, m.merged[k], k)  # raises, naming the layer
    ready: list[tuple[nn.Module, str, Any, bool, Any]] = []  # every new tensor made before the first swap
    for key, value in m.changes:
        owner, leaf = _owner(model, key)
        is_param = leaf in owner._parameters
        orig: Any = owner._parameters[leaf] if is_param else owner._buffers[leaf]
        requantized = merged_storage(owner, leaf, value, key) if is_param else None  # a quantized layer's storage
        if requantized is not None:
            ready.append((owner, leaf, orig, is_param, requantized))
            continue
        new = value.detach().to(orig.dtype)
        ready.append((owner, leaf, orig, is_param, nn.Parameter(new, requires_grad=False) if is_param else new))
    with state.lock:
        for owner, leaf, orig, is_param, new in ready:
            if is_param:
                if m.shared.get(id(orig), 0) > 1:
                    state.untied = True
                state.originals.setdefault((id(owner), leaf), (owner, leaf, orig, True))
                owner._parameters[leaf] = new
            else:
                state.originals.setdefault((id(owner), leaf), (owner, leaf, orig, False))
                owner._buffers[leaf] = new
        state.merged.extend(names)
        state.refresh()


def unmerge(state: ShimState) -> None:
    """Put the original weight objects back (exact: nothing is subtracted)."""
    owners = [owner for owner, *_ in state.originals.values()]  # the only modules it changes
    with state.lock, undo_on_error(state.model, state, modules=owners, adapters=()):
        for owner, leaf, orig, is_param in state.originals.values():
            (owner._parameters if is_param else owner._buffers)[leaf] = orig
        state.originals.clear()
        state.merged.clear()
        state.untied = False
        state.refresh()


def merge_and_unload(state: ShimState, adapter_name: str | Sequence[str] | None, stacklevel: int = 3) -> None:
    """Merge adapters into the base weights permanently and delete them (all or nothing).

    ``adapter_name`` ``None``: every active adapter with a merged form; active
    adapters without one stay (a ``UserWarning`` names them and their tuners).
    Named adapters must all have a merged form (:class:`ConfigError` otherwise).
    """
    if adapter_name is None:
        names = mergeable_active(state)
        left = _unmergeable_active(state)
        if left:
            kinds = {n: state.adapters[n].swift_type for n in left}
            warnings.warn(
                f"merge_and_unload: active adapter(s) {kinds} (name: tuner) have no merged form and stay"
                f" unmerged (still applied by the forward); merged {names}. Deactivate or delete them,"
                " or keep the SwiftModel, to run the merged weights alone",
                UserWarning,
                stacklevel=stacklevel,
            )
    else:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            adapter = state.require(n)
            if adapter.tuner.merge is None:
                raise ConfigError(f"adapter {n!r} ({adapter.swift_type}) has no merged form")
    with undo_on_error(state.model, state):  # all or nothing
        if state.merged:
            unmerge(state)
        merge(state, names)
        with state.lock:
            untied = state.untied
            state.originals.clear()
            state.merged.clear()
            state.untied = False
            for n in names:
                delete_adapter(state, n)
        config: Any = getattr(state.model, "config", None)
        if untied and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
