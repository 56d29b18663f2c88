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

The record costs as much as what it walks, so a call that knows what it may
change names it (``modules=``, ``adapters=``) and only that is recorded: a
merge names the modules whose weights it swaps, a load the model's own modules
(:func:`own_modules`, which stops at the shim's holders) plus the holders on
the paths it writes, and the adapters it adds.  Its cost then does not grow
with the number of adapters loaded.  Without them everything is recorded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..core import routing
from ..core.targets import is_internal

__all__ = ["own_modules", "undo_on_error"]

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


def own_modules(model: nn.Module) -> list[nn.Module]:
    """``model``'s modules without what lies below the shim's holders (the first holder of each chain included).

    A holder below a holder belongs to one adapter (``q_proj.lora_A.<adapter>``): a call that names the adapters
    it changes leaves the others' holders alone, so they need no record.
    """
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        if not is_internal(m):
            stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return out


class _Snapshot:
    def __init__(
        self,
        model: nn.Module,
        state: Any | None,
        overwritten: Iterable[torch.Tensor],
        modules: Iterable[nn.Module] | None = None,
        adapters: Iterable[str] | None = None,
    ) -> None:
        scope = model.modules() if modules is None else dict.fromkeys(modules)
        self.modules = [
            (m, {t: dict(getattr(m, t)) for t in _TABLES if hasattr(m, t)}, dict(m.__dict__)) for m in scope
        ]
        tensors: dict[int, torch.Tensor] = {}
        for _m, tables, _ in self.modules:
            for t in (*tables["_parameters"].values(), *tables["_buffers"].values()):
                if t is not None:
                    tensors[id(t)] = t
        self.providers = routing.default_routes_snapshot(
            model, None if modules is None else [m for m, *_ in self.modules]
        )
        self.state = state
        if state is not None:
            self.adapters = dict(state.adapters)
            names = state.adapters if adapters is None else [n for n in adapters if n in state.adapters]
            self.adapter_fields = {n: dict(vars(state.adapters[n])) for n in names}
            for n in names:
                for t in state.adapters[n].tensors.values():
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
    model: nn.Module,
    state: Any | None = None,
    overwritten: Iterable[torch.Tensor] = (),
    *,
    modules: Iterable[nn.Module] | None = None,
    adapters: Iterable[str] | None = None,
) -> Iterator[None]:
    """Run the block; if it raises, put ``model`` (and the shim ``state``) back as they were, then re-raise.

    ``modules``: the only modules the block may change (tables, attributes, their tensors' ``.data``, flags and
    grads, default routes); ``adapters``: the only adapters whose entries and tensors it may change (new ones
    included).  ``None`` (default): any, so every module and adapter is recorded.
    """
    snap = _Snapshot(model, state, overwritten, modules, adapters)
    try:
        yield
    except BaseException:
        snap.restore()
        raise
