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
* :class:`MethodSlot` / :func:`ensure_method_slot`: re-exported from
  :mod:`functuner.core.routing`, which owns every slot kind (so
  :func:`functuner.core.routing.remove_slots` removes these too): a dormant
  wrapper for a module *method* other than ``forward`` (SWIFT's Adapter ``method_name``).

Everything here is pure except :func:`ensure_method_slot`, which (like
``ensure_slots``) installs a dormant wrapper once per module and method.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.routing import MethodSlot, ensure_method_slot
from ..core.targets import own_named_modules
from ..errors import ConfigError, TargetError

__all__ = [
    "MethodSlot",
    "check_input_position",
    "ensure_method_slot",
    "input_at",
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

    chosen = [(n, m) for n, m in own_named_modules(model) if hit(n)]
    if not chosen:
        sample = [n for n, _ in own_named_modules(model) if n][:8]
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


def seq_or_value(value: Any, index: int, field: str) -> Any:
    """``value[index]`` for a per-module sequence field (SWIFT's list ``dim``), else ``value``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if index >= len(value):
            raise ConfigError(f"{field}={list(value)} has {len(value)} entries but more modules matched")
        return value[index]
    return value
