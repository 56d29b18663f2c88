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
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, set_default_routes
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

    # -- copies (copy.deepcopy, pickle, torch.save) ------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Picklable state: per-thread state, locks, built routes and caches are left out (rebuilt by :meth:`rebind`).

        Adapters offloaded to ``'meta'`` carry their tensors (read from the private cache file) so the copy
        gets its own cache; merged weights are recorded by owner module, not by ``id`` (ids differ in a copy).
        """
        d = dict(self.__dict__)
        for k in ("tls", "thread_states", "lock", "routes", "mixed", "offload_dir"):
            d.pop(k)
        d["offloaded_files"] = {
            n: load_file(a.offload_file, device="cpu") for n, a in self.adapters.items() if a.offload_file
        }
        d["originals"] = list(self.originals.values())
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        offloaded: dict[str, dict[str, torch.Tensor]] = d.pop("offloaded_files")
        originals: list[tuple[nn.Module, str, Any, bool]] = d.pop("originals")
        self.__dict__.update(d)
        self.tls = threading.local()
        self.thread_states = weakref.WeakSet()
        self.lock = threading.RLock()
        self.routes = None
        self.mixed = None
        self.offload_dir = None
        self.originals = {}
        self.pending_originals = originals  # keyed by id in rebind(), once the owner modules exist
        for name, values in offloaded.items():
            if self.offload_dir is None:
                self.offload_dir = tempfile.TemporaryDirectory(prefix="functuner-offload-")
            path = os.path.join(self.offload_dir.name, f"{name}.safetensors")
            save_file(values, path)
            self.adapters[name].offload_file = path

    def rebind(self) -> None:
        """After a copy is built: key merged originals by the copy's modules, point its slots at this state, rebuild routes."""
        pending = self.__dict__.pop("pending_originals", None)
        if pending is not None:
            self.originals = {(id(owner), leaf): (owner, leaf, orig, p) for owner, leaf, orig, p in pending}
        for adapter in self.adapters.values():
            set_default_routes(list(adapter.modules), self.provider)
        self.refresh()

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
