"""How one call's tuner params reach the modules they adapt: per call, never module state.

The design (see ``shared/design-notes.md``): ``torch.func.functional_call``
swaps module attributes in place and is therefore not safe when two threads use
one model.  functuner instead gives each adapted module a *slot* once: a forward
hook (and, for tuners that change inputs, a forward pre-hook) that does nothing
unless a call is under way.  The call's routes (``module -> slot functions``)
travel in a :class:`contextvars.ContextVar` that :func:`routed` sets and resets,
so concurrent threads and asyncio tasks each see only their own params.

Slots are *dormant*: with no routes set, a slotted module computes exactly what
it computed before (the hook returns ``None``); ``state_dict``, parameter names
and module structure are unchanged.  A module *method* other than ``forward``
(SWIFT Adapter's ``method_name``) gets a :class:`MethodSlot` instead
(:func:`ensure_method_slot`), the same idea for a bound method.  A method slot's
first function may be a :class:`Replace`, which computes the method's result
*instead of* the original: LoRA on raw parameters puts one on ``forward``, so the
module runs once with ``W + s B A`` rather than once with ``W`` and again after.
:func:`remove_slots` takes every kind away.

Under ``torch.compile`` (Dynamo cannot trace ``ContextVar.set``) the same routes
travel in a ``threading.local``, which Dynamo traces; a compiled graph runs as
one unit on one thread, so this keeps the same isolation.

Fallback for stateful wrappers (the SWIFT shim): a module may have a *default
routes provider* (:func:`set_default_routes`), a zero-argument callable that
returns the :class:`Routes` to use when no call has set any (``None`` = none).
It is consulted only when :func:`current_routes` is ``None``: e.g. when
``model.generate()`` or gradient-checkpoint recomputation reaches the inner
model directly.  Routes set by :func:`routed` always win.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "ForwardSlot",
    "call_routed",
    "MethodSlot",
    "PreSlot",
    "Provider",
    "Replace",
    "Routes",
    "current_routes",
    "default_routes_snapshot",
    "ensure_method_slot",
    "ensure_slots",
    "clear_default_routes",
    "remove_slots",
    "restore_default_routes",
    "routed",
    "set_default_routes",
    "slot_epoch",
]

# A forward slot function: (module, args, kwargs, output) -> new output.
ForwardSlot = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]
# A pre slot function: (module, args, kwargs) -> (args, kwargs).
PreSlot = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]


class Routes:
    """What one call does at each slotted module.

    ``forward[module]`` is a sequence of :data:`ForwardSlot` run in order on the
    module's output; ``pre[module]`` a sequence of :data:`PreSlot` run on its
    inputs.  Immutable by convention: built once per call, read by the hooks.
    """

    __slots__ = ("forward", "pre")

    def __init__(
        self,
        forward: Mapping[nn.Module, Sequence[ForwardSlot]] | None = None,
        pre: Mapping[nn.Module, Sequence[PreSlot]] | None = None,
    ) -> None:
        self.forward = forward or {}
        self.pre = pre or {}


_ROUTES: contextvars.ContextVar[Routes | None] = contextvars.ContextVar("functuner_routes", default=None)


class _CompiledRoutes(threading.local):
    """Per-thread routes under ``torch.compile``.  ``__init__`` runs once in each thread, so ``routes``
    always exists and Dynamo's guard on it holds from the first call on (no recompilation)."""

    def __init__(self) -> None:
        self.routes: Routes | None = None


_COMPILED = _CompiledRoutes()


def current_routes() -> Routes | None:
    """The routes of the call under way in this thread/task, or ``None``."""
    if torch.compiler.is_compiling():
        return _COMPILED.routes
    return _ROUTES.get()


@contextmanager
def routed(routes: Routes | None) -> Iterator[None]:
    """Make ``routes`` the current routes inside the ``with`` block (this thread/task only)."""
    if torch.compiler.is_compiling():
        prev = _COMPILED.routes
        _COMPILED.routes = routes
        try:
            yield
        finally:
            _COMPILED.routes = prev
    else:
        token = _ROUTES.set(routes)
        try:
            yield
        finally:
            _ROUTES.reset(token)


def call_routed(routes: Routes | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with ``routes`` current: :func:`routed` without a generator-based context manager.

    The per-call path of :func:`functuner.apply` (a context variable set and reset, nothing else).
    """
    if torch.compiler.is_compiling():
        with routed(routes):
            return fn(*args, **kwargs)
    token = _ROUTES.set(routes)
    try:
        return fn(*args, **kwargs)
    finally:
        _ROUTES.reset(token)


def checkpoint_context_fn() -> tuple[Any, Any]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: recompute with the forward's routes.

    Activation checkpointing re-runs a block's forward during ``backward``, after
    :func:`routed` has exited, so the slots would see no routes and recompute the
    base model's activations.  Passing this as ``context_fn`` captures the
    routes current at forward time and sets them again around the
    recomputation (per checkpointed call, so several ``apply`` calls in one
    backward each get their own).  :func:`gradient_checkpointing_enable` wires it
    into a transformers model.
    """
    captured = current_routes()
    return contextlib.nullcontext(), routed(captured)


def gradient_checkpointing_enable(model: nn.Module, **checkpoint_kwargs: Any) -> None:
    """Turn on a transformers model's activation checkpointing in a form that works with ``apply``.

    Equivalent to ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=
    {"use_reentrant": False, "context_fn": checkpoint_context_fn, **checkpoint_kwargs})``.
    This is a deliberate, explicit change of the model's configuration (like
    calling transformers' own method); ``apply`` itself never makes it.
    """
    new_api = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 (the old name is deprecated)
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable) and not callable(new_api):
        raise TypeError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); wrap its blocks with"
            " torch.utils.checkpoint.checkpoint(..., use_reentrant=False, context_fn=functuner.routing."
            "checkpoint_context_fn) yourself"
        )
    kwargs = {"use_reentrant": False, "context_fn": checkpoint_context_fn, **checkpoint_kwargs}
    if kwargs["use_reentrant"]:
        raise ValueError("use_reentrant=True cannot carry functuner's per-call routes into the recomputation")
    if callable(new_api):
        new_api(activation_checkpointing_kwargs=kwargs)
    else:
        enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[misc]


# A default routes provider: a zero-argument callable returning the Routes to use when none are set.
Provider = Callable[[], "Routes | None"]

# slot key (a module or a MethodSlot) -> its default routes provider (see module docstring)
_DEFAULT_PROVIDERS: weakref.WeakKeyDictionary[Any, Provider] = weakref.WeakKeyDictionary()


def set_default_routes(modules: Sequence[Any], provider: Provider) -> None:
    """Make ``provider()`` the routes of ``modules`` whenever no call has set routes.

    ``provider`` is called once per slotted module call while no routes are set;
    keep it cheap (return a prebuilt :class:`Routes`).  The modules need slots
    (:func:`ensure_slots`; building routes with ``functuner.functional.bind_routes`` installs them).
    """
    with _LOCK:
        for m in modules:
            _DEFAULT_PROVIDERS[m] = provider


def clear_default_routes(modules: Sequence[Any]) -> None:
    """Remove the default routes provider of each module (no-op where there is none)."""
    with _LOCK:
        for m in modules:
            _DEFAULT_PROVIDERS.pop(m, None)


def default_routes_snapshot(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> dict[Any, Provider | None]:
    """The default routes provider (``None``: none) of every slot key in ``model``: its modules and method slots.

    Pass the result to :func:`restore_default_routes` to put the providers back
    exactly (an all-or-nothing caller's undo record; holds strong references).
    ``modules``: only these modules (and their method slots), for a caller that knows what it may change.
    """
    keys: list[Any] = []
    for m in model.modules() if modules is None else modules:
        keys.append(m)
        keys += [v for v in m.__dict__.values() if isinstance(v, MethodSlot)]
    with _LOCK:
        return {k: _DEFAULT_PROVIDERS.get(k) for k in keys}


def restore_default_routes(snapshot: Mapping[Any, Provider | None]) -> None:
    """Make each key's default routes provider what :func:`default_routes_snapshot` recorded (``None``: none)."""
    with _LOCK:
        for key, provider in snapshot.items():
            if provider is None:
                _DEFAULT_PROVIDERS.pop(key, None)
            else:
                _DEFAULT_PROVIDERS[key] = provider


def _fallback_routes(module: Any) -> Routes | None:
    provider = _DEFAULT_PROVIDERS.get(module)
    return None if provider is None else provider()


def _forward_slot_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    routes = current_routes()
    if routes is None:
        routes = _fallback_routes(module)
        if routes is None:
            return None
    fns = routes.forward.get(module)
    if fns is None:
        return None
    for fn in fns:
        output = fn(module, args, kwargs, output)
    return output


def _pre_slot_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    routes = current_routes()
    if routes is None:
        routes = _fallback_routes(module)
        if routes is None:
            return None
    fns = routes.pre.get(module)
    if fns is None:
        return None
    for fn in fns:
        args, kwargs = fn(module, args, kwargs)
    return args, kwargs


_LOCK = threading.Lock()


def _has_hook(hooks: Mapping[int, Any], fn: Any) -> bool:
    return any(h is fn for h in hooks.values())


def _check_slots_while_compiling(modules: Sequence[nn.Module], pre: bool) -> None:
    for m in modules:
        if not _has_hook(m._forward_hooks, _forward_slot_hook) or (
            pre and not _has_hook(m._forward_pre_hooks, _pre_slot_hook)
        ):
            raise RuntimeError(
                "functuner: a module has no slot yet; call functuner.apply (or functuner.functional.bind_routes) once"
                " outside torch.compile so the slots exist before tracing"
            )


def ensure_slots(modules: Sequence[nn.Module], *, pre: bool = False) -> None:
    """Give each module a dormant slot (idempotent, thread-safe).

    Detection looks at the module's own hook tables, so a ``copy.deepcopy`` of a
    slotted model (which copies the hooks) is not slotted twice.  The hook is
    registered ``prepend=True`` so the slot sees the module's own output before
    any user hook, exactly where a wrapping layer would add its delta.
    """
    if torch.compiler.is_compiling():  # Dynamo traces neither the lock nor hook registration
        _check_slots_while_compiling(modules, pre)
        return
    with _LOCK:
        for m in modules:
            if not _has_hook(m._forward_hooks, _forward_slot_hook):
                m.register_forward_hook(_forward_slot_hook, with_kwargs=True, prepend=True)
            if pre and not _has_hook(m._forward_pre_hooks, _pre_slot_hook):
                m.register_forward_pre_hook(_pre_slot_hook, with_kwargs=True, prepend=True)


_SLOT_EPOCH = [0]


def slot_epoch() -> int:
    """A counter that :func:`remove_slots` moves on: routes built under another epoch may reach removed slots."""
    return _SLOT_EPOCH[0]


def remove_slots(model: nn.Module) -> int:
    """Remove every functuner slot (forward, pre and method slots) from ``model`` and its submodules.

    Returns how many modules had one.  Default routes providers of the removed
    slots are cleared too; a removed slot never routes again.
    """
    n = 0
    with _LOCK:
        _SLOT_EPOCH[0] += 1
        for m in model.modules():
            found = False
            for table, kw_table, fn in (
                (m._forward_hooks, m._forward_hooks_with_kwargs, _forward_slot_hook),
                (m._forward_pre_hooks, m._forward_pre_hooks_with_kwargs, _pre_slot_hook),
            ):
                for hid in [k for k, h in table.items() if h is fn]:
                    del table[hid]
                    kw_table.pop(hid, None)
                    found = True
            for name in [k for k, v in m.__dict__.items() if isinstance(v, MethodSlot)]:
                _DEFAULT_PROVIDERS.pop(m.__dict__.pop(name), None)
                found = True
            if found:
                _DEFAULT_PROVIDERS.pop(m, None)
            n += found
    return n


def has_slot(module: nn.Module) -> bool:
    """Whether ``module`` carries a functuner forward slot."""
    return _has_hook(module._forward_hooks, _forward_slot_hook)


# ---------------------------------------------------------------------------
# dormant method slots (a module method other than ``forward``, e.g. SWIFT Adapter's method_name)
# ---------------------------------------------------------------------------
class MethodSlot:
    """Replaces ``module.<method_name>`` by a wrapper that is a no-op outside a routed call.

    The slot object itself is the key in ``Routes.forward``: inside a call whose
    routes hold it, the functions listed there run on the method's result, like a
    forward slot: ``fn(module, args, kwargs, output) -> output``.  Like module
    slots it also consults a default routes provider registered for it
    (:func:`set_default_routes`).  ``copy.deepcopy`` of the module re-binds the
    wrapper to the copy (both attributes are deep-copied).
    """

    def __init__(self, module: nn.Module, method_name: str, original: Callable[..., Any]) -> None:
        self.module = module
        self.method_name = method_name
        self.original = original

    @property
    def __signature__(self) -> inspect.Signature:  # transformers' apply_chunking_to_forward inspects it
        return inspect.signature(self.original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        routes = current_routes()
        if routes is None:
            routes = _fallback_routes(self)
        fns = None if routes is None else routes.forward.get(self)  # type: ignore[call-overload]
        if not fns:
            return self.original(*args, **kwargs)
        first = fns[0]
        if isinstance(first, Replace):  # computes the method's result itself: the original never runs
            out = first.fn(self.module, args, kwargs)
            fns = fns[1:]
        else:
            out = self.original(*args, **kwargs)
        for fn in fns:
            out = fn(self.module, args, kwargs, out)
        return out


class Replace:
    """A :class:`MethodSlot` function that computes the method's result *instead of* the original method.

    Only as the first function of a method slot's list in ``Routes.forward``:
    ``fn(module, args, kwargs) -> output``.  Used where running the original
    would be wasted work (LoRA on raw parameters re-runs the module with
    ``W + s B A``; running it with ``W`` first would double its cost).
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        raise TypeError("functuner.routing.Replace runs only as the first function of a MethodSlot's routes")


def ensure_method_slot(module: nn.Module, method_name: str) -> MethodSlot:
    """The dormant :class:`MethodSlot` of ``module.<method_name>``, installed once (thread-safe, idempotent)."""
    if torch.compiler.is_compiling():  # Dynamo traces neither the lock nor the install: the slot must exist
        current = module.__dict__.get(method_name)
        if not isinstance(current, MethodSlot) or current.module is not module:
            raise RuntimeError(
                "functuner: a module has no method slot yet; call functuner.apply (or"
                " functuner.functional.bind_routes) once outside torch.compile so the slots exist before tracing"
            )
        return current
    with _LOCK:
        current = module.__dict__.get(method_name)
        if isinstance(current, MethodSlot) and current.module is module:
            return current
        original = getattr(module, method_name)
        if isinstance(original, MethodSlot):  # a shallow copy's slot still bound to the source module
            original = getattr(type(module), method_name).__get__(module, type(module))
        slot = MethodSlot(module, method_name, original)
        module.__dict__[method_name] = slot
        return slot
