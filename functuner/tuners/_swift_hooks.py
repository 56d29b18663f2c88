"""Small helpers shared by the SWIFT-native tuners (Adapter, Prompt, Side, Part, NEFTune).

* :func:`swift_select`: SWIFT's own target rule for these tuners (a string is a
  regex that must match the whole module name; a list matches a module whose
  name *ends with* an entry, as plain text, exactly like SWIFT).
* :func:`input_at` / :func:`with_input_at`: read / replace a call argument given
  as an int (positional) or a str (keyword) position.
* :func:`output_at` / :func:`with_output_at`: the same for a module's output
  (a tensor, a tuple/list, or a dict / ``ModelOutput``); replacing returns a
  new container and never writes into the one the module returned.
* :func:`check_input_position`: static check of an input position against a
  module method's signature, so a bad config fails at ``init``.
* :class:`MethodSlot`: a dormant wrapper for a module *method* other than
  ``forward`` (SWIFT's Adapter ``method_name``), the method analogue of
  :func:`functuner.routing.ensure_slots`.

Everything here is pure except :func:`ensure_method_slot`, which (like
``ensure_slots``) installs a dormant wrapper once per module and method.
"""

from __future__ import annotations

import inspect
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.routing import _fallback_routes, current_routes
from ..errors import ConfigError, TargetError

__all__ = [
    "MethodSlot",
    "check_input_position",
    "ensure_method_slot",
    "input_at",
    "remove_method_slots",
    "output_at",
    "swift_select",
    "with_input_at",
    "with_output_at",
]


def swift_select(
    model: nn.Module, target_modules: Any, field: str = "target_modules", *, regex_only: bool = False
) -> list[tuple[str, nn.Module]]:
    """Modules selected by SWIFT's rule, in ``named_modules`` order (root included, as in SWIFT).

    Raises :class:`ConfigError` for a missing/ill-typed spec and
    :class:`TargetError` when nothing matches.  Pure.
    """
    if target_modules is None:
        raise ConfigError(f"{field} is None: give a regex (full match) or a list of name endings")
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ConfigError(f"{field}={target_modules!r} is not a valid regular expression: {e}") from None

        def hit(name: str) -> bool:
            return pattern.fullmatch(name) is not None
    else:
        if regex_only:
            raise ConfigError(f"{field} must be a regex string for this tuner (as in SWIFT), got {target_modules!r}")
        ends = tuple(str(t) for t in target_modules)

        def hit(name: str) -> bool:
            return any(name.endswith(t) for t in ends)

    chosen = [(n, m) for n, m in model.named_modules() if hit(n)]
    if not chosen:
        sample = [n for n, _ in model.named_modules() if n][:8]
        raise TargetError(
            f"{field}={target_modules!r} matched no module of {type(model).__name__}; some module names: {sample}"
        )
    return chosen


def _check_position(pos: Any, field: str) -> None:
    if isinstance(pos, bool) or not isinstance(pos, (int, str)):
        raise ConfigError(f"{field} must be an int (positional) or a str (keyword), got {pos!r}")


def check_input_position(fn: Callable[..., Any], pos: Any, field: str, where: str) -> None:
    """Raise :class:`ConfigError` if ``fn`` cannot receive an argument at ``pos``. Pure.

    ``fn`` is a bound method (``self`` already excluded).  Signatures with
    ``*args`` / ``**kwargs`` accept any int / str position respectively.
    """
    _check_position(pos, field)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    params = list(sig.parameters.values())
    if isinstance(pos, int):
        if pos < 0:
            raise ConfigError(f"{field}={pos} must be >= 0 ({where})")
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            return
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if pos >= len(positional):
            raise ConfigError(
                f"{field}={pos} is out of range: {where} takes {len(positional)} positional"
                f" argument(s) {[p.name for p in positional]}"
            )
    else:
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return
        if pos not in sig.parameters:
            raise ConfigError(f"{field}={pos!r}: {where} has no argument of that name; it takes {list(sig.parameters)}")


def input_at(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int | str, field: str, where: str) -> Any:
    """The call argument at ``pos`` (raises :class:`ConfigError` naming ``field`` if it was not passed)."""
    if isinstance(pos, int):
        if pos >= len(args):
            raise ConfigError(
                f"{field}={pos}: {where} was called with only {len(args)} positional argument(s)"
                f" (keywords {sorted(kwargs)}); pass the tensor positionally or use its keyword name"
            )
        return args[pos]
    if pos not in kwargs:
        raise ConfigError(
            f"{field}={pos!r}: {where} was called without that keyword (keywords {sorted(kwargs)},"
            f" {len(args)} positional)"
        )
    return kwargs[pos]


def with_input_at(
    args: tuple[Any, ...], kwargs: dict[str, Any], pos: int | str, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """New ``(args, kwargs)`` with the argument at ``pos`` replaced (inputs untouched)."""
    if isinstance(pos, int):
        return args[:pos] + (value,) + args[pos + 1 :], kwargs
    new = dict(kwargs)
    new[pos] = value
    return args, new


def output_at(out: Any, pos: Any, field: str, where: str) -> Any:
    """SWIFT's rule: a tuple/list/dict output is indexed by ``pos``; a tensor output is used whole."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        if isinstance(pos, bool) or not isinstance(pos, int):
            raise ConfigError(f"{field}={pos!r}: {where} returned a {type(out).__name__}; give an int position")
        if not -len(out) <= pos < len(out):
            raise ConfigError(f"{field}={pos} is out of range: {where} returned {len(out)} values")
        return out[pos]
    if isinstance(out, dict):
        if not isinstance(pos, str):
            raise ConfigError(
                f"{field}={pos!r}: {where} returned a {type(out).__name__}; give a key (str), one of {list(out)}"
            )
        if out.get(pos) is None:
            raise ConfigError(
                f"{field}={pos!r}: {where} returned a {type(out).__name__} without that entry (keys: {list(out)})"
            )
        return out[pos]
    raise ConfigError(
        f"{where} returned a {type(out).__name__}; {field} can only address a tensor, tuple, list or dict"
    )


def with_output_at(out: Any, pos: Any, value: Any) -> Any:
    """A new output with the entry at ``pos`` replaced (the module's own output object is not written to)."""
    if isinstance(out, torch.Tensor):
        return value
    if isinstance(out, tuple):
        items = list(out)
        items[pos] = value
        return type(out)(items) if type(out) is tuple else type(out)(*items)
    if isinstance(out, list):
        items = list(out)
        items[pos] = value
        return items
    fields = {k: v for k, v in out.items()}
    fields[pos] = value
    return type(out)(**fields)


# ---------------------------------------------------------------------------
# dormant method slots (for SWIFT Adapter's method_name other than 'forward')
# ---------------------------------------------------------------------------
class MethodSlot:
    """Replaces ``module.<method_name>`` by a wrapper that is a no-op outside a routed call.

    The slot object itself is the key in ``Routes.forward``: inside a call whose
    routes hold it, the functions listed there run on the method's result, like a
    forward slot: ``fn(module, args, kwargs, output) -> output``.  Like module
    slots it also consults a default routes provider registered for it
    (:func:`functuner.routing.set_default_routes`).  ``copy.deepcopy`` of the
    module re-binds the wrapper to the copy (both attributes are deep-copied).
    """

    def __init__(self, module: nn.Module, method_name: str, original: Callable[..., Any]) -> None:
        self.module = module
        self.method_name = method_name
        self.original = original

    @property
    def __signature__(self) -> inspect.Signature:  # transformers' apply_chunking_to_forward inspects it
        return inspect.signature(self.original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.original(*args, **kwargs)
        routes = current_routes()
        if routes is None:
            routes = _fallback_routes(self)  # type: ignore[arg-type]
            if routes is None:
                return out
        fns = routes.forward.get(self)  # type: ignore[call-overload]
        if not fns:
            return out
        for fn in fns:
            out = fn(self.module, args, kwargs, out)
        return out


_LOCK = threading.Lock()


def ensure_method_slot(module: nn.Module, method_name: str) -> MethodSlot:
    """The dormant :class:`MethodSlot` of ``module.<method_name>``, installed once (thread-safe, idempotent)."""
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


def remove_method_slots(model: nn.Module) -> int:
    """Remove every :class:`MethodSlot` from ``model``'s modules; returns how many were removed."""
    n = 0
    with _LOCK:
        for m in model.modules():
            for name in [k for k, v in m.__dict__.items() if isinstance(v, MethodSlot)]:
                del m.__dict__[name]
                n += 1
    return n


def seq_or_value(value: Any, index: int, field: str) -> Any:
    """``value[index]`` for a per-module sequence field (SWIFT's list ``dim``), else ``value``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if index >= len(value):
            raise ConfigError(f"{field}={list(value)} has {len(value)} entries but more modules matched")
        return value[index]
    return value
