"""The shim's mutable state: which adapters a wrapped model holds, which are active, what is merged.

Design note: everything the SWIFT interface mutates lives in one :class:`ShimState`
per wrapped model (shared by every ``SwiftModel`` re-wrapping it), so the other
shim modules are functions of that state and :mod:`.undo` can snapshot and
restore it in one place.  This module owns activation (global, or per thread
with ``USE_UNIQUE_THREAD=0``) and the *default routes* the adapted modules use
when no call has set routes (:func:`functuner.core.routing.set_default_routes`):
they are rebuilt with :func:`functuner.functional.bind_routes` whenever the
adapters, the active set or the merge state change.  No tensor math, no disk I/O.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes
from ..errors import AdapterNameError
from ..functional import bind_routes
from ..tuners import tuner_for
from ..tuners.base import Tuner

__all__ = [
    "DEFAULT_ADAPTER",
    "USE_UNIQUE_THREAD",
    "AdapterEntry",
    "ShimState",
    "ThreadState",
    "active_sets_restored_on_error",
]

USE_UNIQUE_THREAD = "USE_UNIQUE_THREAD"
DEFAULT_ADAPTER = "default"


@dataclass
class AdapterEntry:
    """One adapter held by the shim: its config, its parameters and where they live.

    ``tensors`` maps functuner names to the live ``nn.Parameter`` objects;
    ``shared`` are names that are the base model's own parameters (trainable
    biases); ``modules`` the slot keys its routes reach; ``offload`` is ``None``,
    ``'cpu'`` or ``'meta'`` (``offload_file`` then holds the tensors on disk).
    """

    name: str
    config: Any
    tensors: dict[str, nn.Parameter]
    shared: frozenset[str]
    modules: tuple[Any, ...]
    devices: dict[str, torch.device] = field(default_factory=dict)
    offload: str | None = None
    offload_file: str | None = None

    @property
    def params(self) -> TunerParams:
        """The adapter as functuner params (the live parameters, not copies)."""
        return TunerParams(self.tensors, self.config, self.name)

    @property
    def tuner(self) -> Tuner:
        """The tuner of this adapter's config (its pure functions and optional hooks)."""
        return tuner_for(self.config)

    @property
    def swift_type(self) -> str:
        return self.tuner.swift_type


class ThreadState:
    """One thread's own active set (``USE_UNIQUE_THREAD=0``) and the routes built for it."""

    __slots__ = ("active", "routes", "version", "__weakref__")

    def __init__(self, active: set[str]) -> None:
        self.active = set(active)
        self.routes: Routes | None = None
        self.version = -1


class ShimState:
    """Everything the shim mutates, shared by re-wrapped ``SwiftModel``s of one model."""

    def __init__(self, model: nn.Module, per_thread: bool) -> None:
        self.model = model
        self.adapters: dict[str, AdapterEntry] = {}
        self.active: set[str] = set()
        self.per_thread = per_thread
        self.tls = threading.local()
        self.thread_states: weakref.WeakSet[ThreadState] = weakref.WeakSet()
        self.merged: list[str] = []
        self.originals: dict[tuple[int, str], tuple[nn.Module, str, Any, bool]] = {}
        self.untied = False
        self.version = 0
        self.routes: Routes | None = None
        self.lock = threading.RLock()
        self.extra_state_keys: list[str] = []
        self.offload_dir: tempfile.TemporaryDirectory[str] | None = None
        self.mixed: Any = None  # the per-sample stack cache (see .per_sample); None when empty

    def require(self, name: str) -> AdapterEntry:
        """The adapter called ``name``; :class:`AdapterNameError` naming the known ones if there is none."""
        adapter = self.adapters.get(name)
        if adapter is None:
            raise AdapterNameError(f"unknown adapter {name!r}; have {sorted(self.adapters)}")
        return adapter

    # -- activation ---------------------------------------------------------
    def thread_state(self, create: bool) -> ThreadState | None:
        ts = getattr(self.tls, "state", None)
        if ts is None and create:
            ts = ThreadState(self.active)
            self.tls.state = ts
            self.thread_states.add(ts)
        return cast("ThreadState | None", ts)

    def active_set(self) -> set[str]:
        if self.per_thread:
            ts = self.thread_state(create=False)
            if ts is not None:
                return set(ts.active)
        return set(self.active)

    def routes_for(self, names: set[str]) -> Routes | None:
        live = [self.adapters[n].params for n in self.adapters if n in names and n not in self.merged]
        if not live:
            return None
        return bind_routes(self.model, live, generator=None)

    def refresh(self) -> None:
        """Rebuild the global routes after any change of adapters, activation or merge state."""
        with self.lock:
            self.version += 1
            self.routes = self.routes_for(self.active)

    def provider(self) -> Routes | None:
        """Default routes of the adapted modules (called from the slot hooks; cheap)."""
        if self.per_thread:
            ts = getattr(self.tls, "state", None)
            if ts is not None:
                if ts.version != self.version:
                    with self.lock:
                        ts.routes = self.routes_for(ts.active)
                        ts.version = self.version
                return cast("Routes | None", ts.routes)
        return self.routes


@contextlib.contextmanager
def active_sets_restored_on_error(state: ShimState) -> Iterator[None]:
    """Undo changes to the active sets (global and per thread) if the block raises (cheap: no tensors move)."""
    active = set(state.active)
    threads = [(ts, set(ts.active)) for ts in list(state.thread_states)]
    mine = getattr(state.tls, "state", None)
    try:
        yield
    except BaseException:
        with state.lock:
            state.active.clear()
            state.active.update(active)
            for ts, names in threads:
                ts.active.clear()
                ts.active.update(names)
            if mine is None:
                state.tls.__dict__.pop("state", None)
            state.refresh()
        raise
