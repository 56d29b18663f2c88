"""All-or-nothing for the shim's stateful calls: record what a call may change, put it back if it raises.

:func:`undo_on_error` snapshots, *without copying any weight*, everything the
shim's calls change structurally: each module's parameter, buffer, submodule
and hook tables and its ``__dict__``; each tensor's ``.data``,
``requires_grad`` and ``.grad``; the default routes providers (through
routing's public snapshot API); and the shim's
:class:`~functuner.shim.state.ShimState` (adapters, active sets, merge
bookkeeping, offload files).  Values
written *in place* are restored only for the tensors passed as
``overwritten`` (their values are cloned first): callers name what they copy
into.  On an exception the snapshot is restored and the exception re-raised.
Pure bookkeeping: no tensor math.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..core import routing

__all__ = ["undo_on_error"]

_TABLES = (
    "_parameters",
    "_buffers",
    "_modules",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
_MISSING = object()


class _Snapshot:
    def __init__(self, model: nn.Module, state: Any | None, overwritten: Iterable[torch.Tensor]) -> None:
        self.modules = [
            (m, {t: dict(getattr(m, t)) for t in _TABLES if hasattr(m, t)}, dict(m.__dict__)) for m in model.modules()
        ]
        tensors: dict[int, torch.Tensor] = {}
        for _m, tables, _ in self.modules:
            for t in (*tables["_parameters"].values(), *tables["_buffers"].values()):
                if t is not None:
                    tensors[id(t)] = t
        self.providers = routing.default_routes_snapshot(model)
        self.state = state
        if state is not None:
            self.adapters = dict(state.adapters)
            self.adapter_fields = {n: dict(vars(a)) for n, a in state.adapters.items()}
            for a in state.adapters.values():
                for t in a.tensors.values():
                    tensors[id(t)] = t
            for _, _, orig, _ in state.originals.values():
                tensors[id(orig)] = orig
            self.fields = {k: getattr(state, k) for k in ("untied", "routes")}
            self.active = set(state.active)
            self.merged = list(state.merged)
            self.originals = dict(state.originals)
            self.extra_state_keys = list(state.extra_state_keys)
            self.thread_active = [(ts, set(ts.active)) for ts in list(state.thread_states)]
            self.my_thread_state = getattr(state.tls, "state", _MISSING)
            off = state.offload_dir
            self.offload_files = set(os.listdir(off.name)) if off is not None else set()
            self.offload_dir = off
            cfg = getattr(state.model, "config", None)
            self.tie = getattr(cfg, "tie_word_embeddings", _MISSING) if cfg is not None else _MISSING
        self.tensors = [(t, t.data, t.requires_grad, t.grad) for t in tensors.values()]
        self.values = [(t, t.detach().clone()) for t in dict.fromkeys(overwritten)]

    def restore(self) -> None:
        for m, tables, attrs in self.modules:
            for name, saved in tables.items():
                live = getattr(m, name)
                live.clear()
                live.update(saved)
            for key in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[key]
            m.__dict__.update(attrs)
        routing.restore_default_routes(self.providers)
        with torch.no_grad():
            for t, data, grad_flag, grad in self.tensors:
                if t.data is not data:
                    t.data = data
                if t.requires_grad != grad_flag and t.is_leaf:
                    t.requires_grad_(grad_flag)
                t.grad = grad
            for t, value in self.values:
                t.copy_(value)
        state = self.state
        if state is None:
            return
        state.adapters.clear()
        state.adapters.update(self.adapters)
        for n, fields in self.adapter_fields.items():
            vars(state.adapters[n]).update(fields)
        for k, v in self.fields.items():
            setattr(state, k, v)
        state.active.clear()
        state.active.update(self.active)
        state.merged[:] = self.merged
        state.originals.clear()
        state.originals.update(self.originals)
        state.extra_state_keys[:] = self.extra_state_keys
        for ts, active in self.thread_active:
            ts.active.clear()
            ts.active.update(active)
        if self.my_thread_state is _MISSING:
            state.tls.__dict__.pop("state", None)
        else:
            state.tls.state = self.my_thread_state
        off = state.offload_dir
        if off is not None:
            for name in set(os.listdir(off.name)) - self.offload_files:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(off.name, name))
        state.offload_dir = self.offload_dir if self.offload_dir is not None else off
        if self.tie is not _MISSING:
            state.model.config.tie_word_embeddings = self.tie
        state.version += 1  # every thread rebuilds its routes from the restored state


@contextlib.contextmanager
def undo_on_error(
    model: nn.Module, state: Any | None = None, overwritten: Iterable[torch.Tensor] = ()
) -> Iterator[None]:
    """Run the block; if it raises, put ``model`` (and the shim ``state``) back as they were, then re-raise."""
    snap = _Snapshot(model, state, overwritten)
    try:
        yield
    except BaseException:
        snap.restore()
        raise
