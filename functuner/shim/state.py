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
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, set_default_routes, slot_epoch
from ..errors import AdapterNameError, ConfigError
from ..functional import bind_routes
from ..tuners import tuner_for
from ..tuners.base import Tuner
from . import live

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

    ``tensors`` maps functuner names to the ``nn.Parameter`` objects the module
    tree holds now (read through ``owners``, so FSDP2's sharded/unsharded swaps,
    ``load_state_dict(assign=True)`` and ``to_empty()`` are followed: :mod:`.live`);
    ``shared`` are names that are the base model's own parameters (trainable
    biases); ``modules`` the slot keys its routes reach; ``offload`` is ``None``,
    ``'cpu'`` or ``'meta'`` (``offload_file`` then holds the tensors on disk).
    """

    name: str
    config: Any
    held: dict[str, nn.Parameter]
    shared: frozenset[str]
    modules: tuple[Any, ...]
    devices: dict[str, torch.device] = field(default_factory=dict)
    offload: str | None = None
    offload_file: str | None = None
    owners: tuple[live.Owner, ...] = ()
    seen: int = -1  # the tree epoch ``held`` was last checked at
    generation: int = 0  # bumped whenever the tree replaced one of ``held``'s objects
    train_state: Any = None  # the state of the tuner's training step (AdaLoRA's allocator), see :mod:`.training`

    @property
    def tensors(self) -> dict[str, nn.Parameter]:
        """``{name: nn.Parameter}`` as the module tree holds them now (an offloaded adapter's: as it left them)."""
        if self.offload is None and (self.seen != live.epoch() or self.shared):
            live.follow(self)
        return self.held

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
        self.seen = -1  # the tree epoch the routes were last checked at (.live)
        self.built: tuple[int, ...] = ()  # the adapters' generations the routes were built at
        self.route_cache: dict[Any, tuple[Routes, list[TunerParams]]] = {}  # routes by what they were built from

    # -- copies (copy.deepcopy, pickle, torch.save) ------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Picklable state: per-thread state, locks, built routes and caches are left out (rebuilt by :meth:`rebind`).

        Adapters offloaded to ``'meta'`` carry their tensors (read from the private cache file) so the copy
        gets its own cache; merged weights are recorded by owner module, not by ``id`` (ids differ in a copy).
        """
        d = dict(self.__dict__)
        for k in ("tls", "thread_states", "lock", "routes", "mixed", "offload_dir", "route_cache"):
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
        self.route_cache = {}
        self.seen = -1
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
    def known(self, names: set[str], strict: bool, what: str) -> set[str]:
        """``names`` that are loaded adapters; unknown ones warn and are ignored (SWIFT), or raise with ``strict``."""
        unknown = {n for n in names if n not in self.adapters}  # O(len(names)): switching cost must not grow with n
        if unknown:
            msg = f"{what}: unknown adapter(s) {sorted(unknown)}; have {sorted(self.adapters)}"
            if strict:
                raise AdapterNameError(msg)
            warnings.warn(f"{msg}; ignored (as SWIFT does; pass strict=True to raise)", UserWarning, stacklevel=3)
        return names - unknown

    def seed_routes(self, params: TunerParams, routes: Routes) -> None:
        """Remember the routes just built for one adapter, so the first switch to it is a lookup, not a build."""
        self.route_cache.setdefault(_route_key([params]), (routes, [params]))

    def switch_to(self, names: set[str]) -> None:
        """Make exactly ``names`` active (loaded, none offloaded): the active set and the routes, nothing else.

        The cheap path of ``set_active_adapters``: one routes lookup (:meth:`routes_for`) instead of one per
        loaded adapter.  A merged adapter left out raises :class:`ConfigError` before anything changes.
        """
        with self.lock:
            dropped = [m for m in self.merged if m not in names]
            if dropped:
                raise ConfigError(f"adapter {dropped[0]!r} is merged; call Swift.unmerge(model) first")
            if self.per_thread:
                ts = self.thread_state(create=True)
                assert ts is not None
                ts.active.clear()
                ts.active.update(names)
                self.version += 1
            elif names != self.active:
                routes = self.routes_for(names)  # the only step that can fail: before anything changes
                self.active.clear()
                self.active.update(names)
                self.version += 1
                self.routes = routes

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
        if len(names) == 1:  # the common switch: no pass over every loaded adapter
            (only,) = names
            params = [self.adapters[only].params] if only in self.adapters and only not in self.merged else []
        else:  # in loading order (the order their effects add up in)
            params = [self.adapters[n].params for n in self.adapters if n in names and n not in self.merged]
        if not params:
            return None
        key = _route_key(params)
        entry = self.route_cache.get(key)
        if entry is None:
            if len(self.route_cache) > 8 + 2 * sum(len(a.modules) for a in self.adapters.values()):
                self.route_cache.clear()  # bounded: tensors replaced for good (assign=True, to_empty) are dropped
            entry = self.route_cache[key] = (bind_routes(self.model, params, generator=None), params)
        return entry[0]

    def refresh(self, tree_only: bool = False) -> None:
        """Rebuild the global routes after any change of adapters, activation or merge state.

        ``tree_only``: only the module tree replaced tensor objects (FSDP2's swaps), so routes built before for
        the same objects are reused; any other change drops them.
        """
        with self.lock:
            # routes are cached by the names, configs and tensor objects they were built from (routes_for), so an
            # activation or adapter change needs no invalidation: a changed adapter has another key
            if tree_only:
                self.mixed = None  # the per-sample stack holds the replaced objects
            self.version += 1
            self.routes = self.routes_for(self.active)
            self.built = tuple(a.generation for a in self.adapters.values())

    def follow_tree(self) -> None:
        """Rebuild the routes if the module tree replaced any adapter tensor object since they were built (.live)."""
        with self.lock:
            self.seen = live.epoch()
            for a in self.adapters.values():
                if a.offload is None:
                    live.follow(a)
            if tuple(a.generation for a in self.adapters.values()) != self.built:
                self.refresh(tree_only=True)

    def provider(self) -> Routes | None:
        """Default routes of the adapted modules (called from the slot hooks; cheap)."""
        if self.seen != live._EPOCH[0]:  # one integer compare per hook call: did the module tree replace anything?
            self.follow_tree()
        if self.per_thread:
            ts = getattr(self.tls, "state", None)
            if ts is not None:
                if ts.version != self.version:
                    with self.lock:
                        ts.routes = self.routes_for(ts.active)
                        ts.version = self.version
                return cast("Routes | None", ts.routes)
        return self.routes


def _route_key(params: list[TunerParams]) -> tuple[Any, ...]:
    """What routes are built from: names, configs and tensor objects (equal keys are the same routes; a cache
    entry keeps those objects alive, so no id is reused while it exists); a removed slot (slot_epoch) makes
    every older key stale."""
    return (
        slot_epoch(),
        tuple(p.adapter_name for p in params),
        tuple(id(p.config) for p in params),
        tuple(i for p in params for i in live.identity_key(p)),
    )


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
