"""Regular expressions that come from configs and checkpoints: checked once, compiled safely, matched in bounded time.

A config read from a stranger's ``adapter_config.json`` carries regular
expressions (``target_modules`` / ``exclude_modules`` as a string, the keys of
``rank_pattern`` / ``alpha_pattern``, ``layers_pattern``, SWIFT's
``extra_state_keys``).  Python's ``re`` backtracks: ``"(.*.*)*X"`` takes
seconds on a 14-character name and hours on a real module name, so a config
could hang a load.  Every such pattern goes through :func:`check_pattern`
(configs call it from ``TunerConfig.__post_init__``, the extra-states reader and
the shim from their own entry points), which raises
:class:`~functuner.errors.ConfigError` naming the field and the pattern for:

* a value that is not a string, a pattern longer than :data:`MAX_PATTERN_CHARS`,
  or one ``re`` cannot compile;
* a repeat nested in a repeat where one of them is unbounded (``(a+)+``,
  ``(a*)*``, ``(.*.*)*X``, ``(a{1,3})*``): exponential backtracking;
* an unbounded repeat over an alternation (``(a|a)*``, ``(a|ab)+``): exponential too;
* a backreference (``(a)\\1``): matching with one is NP-hard in general;
* more than :data:`MAX_UNBOUNDED` unbounded repeats in one pattern
  (``.*.*.*.*X``): polynomial backtracking of degree that many.

What passes backtracks at most polynomially with degree
:data:`MAX_UNBOUNDED` (3): about 1 ms for ``".*.*.*X"`` against a 100-character
name, measured in docs/reliability.md.  The rules are a superset of what real
configs use (``.*\\.layers\\.\\d+\\.self_attn\\.(q_proj|v_proj)`` has two
unbounded repeats and no nesting).  :func:`check_patterns` checks a whole
config field (a string, a list of strings, or a dict keyed by patterns) and
:func:`compiled` returns the cached compiled form.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError

try:  # the parser ``re`` itself uses (stdlib; ``sre_parse`` before Python 3.11)
    _sre: Any = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover - Python < 3.11
    _sre = importlib.import_module("sre_parse")

__all__ = [
    "MAX_PATTERN_CHARS",
    "MAX_UNBOUNDED",
    "PATTERN_FIELDS",
    "check_config_patterns",
    "check_pattern",
    "check_patterns",
    "compiled",
]

#: the longest pattern accepted from a config (real ones are well under 200 characters)
MAX_PATTERN_CHARS = 2000
#: the most unbounded repeats (``*``, ``+``, ``{n,}``) one pattern may hold
MAX_UNBOUNDED = 3

_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}
_MAXREPEAT = _sre.MAXREPEAT


def _children(op: Any, av: Any) -> list[Any]:
    """The sub-patterns (lists of ``(op, av)``) directly under one parsed node."""
    if op in _REPEATS:
        return [av[2]]
    if op is _sre.SUBPATTERN:
        return [av[3]]
    if op is _sre.BRANCH:
        return list(av[1])
    if op in (_sre.ASSERT, _sre.ASSERT_NOT):
        return [av[1]]
    if op is getattr(_sre, "ATOMIC_GROUP", None):
        return [av]
    if op is _sre.GROUPREF_EXISTS:
        return [p for p in av[1:] if p is not None]
    return []


def _problem(items: Iterable[Any], under_repeat: tuple[int, int] | None, counts: list[int]) -> str | None:
    """Why a parsed pattern may backtrack exponentially (``None`` if it cannot); counts unbounded repeats."""
    for op, av in items:
        if op in (_sre.GROUPREF, getattr(_sre, "GROUPREF_EXISTS", None)):
            return "it uses a backreference"
        if op in _REPEATS:
            lo, hi, body = av
            unbounded = hi == _MAXREPEAT
            counts[0] += unbounded
            if hi > 1 and under_repeat is not None and (unbounded or under_repeat[1] == _MAXREPEAT):
                return "it nests a repeat inside a repeat (exponential backtracking, e.g. '(a+)+')"
            if unbounded and any(o is _sre.BRANCH for o, _ in _walk(body)):
                return "it repeats an alternation without bound (exponential backtracking, e.g. '(a|a)*')"
            why = _problem(body, (lo, hi) if hi > 1 else under_repeat, counts)
        else:
            why = None
            for child in _children(op, av):
                why = why or _problem(child, under_repeat, counts)
        if why:
            return why
    return None


def _walk(items: Iterable[Any]) -> Iterable[tuple[Any, Any]]:
    for op, av in items:
        yield op, av
        for child in _children(op, av):
            yield from _walk(child)


@functools.lru_cache(maxsize=4096)
def _checked(pattern: str) -> tuple[re.Pattern[str] | None, str | None]:
    """``(compiled, None)`` for a safe pattern, ``(None, why)`` otherwise; cached per pattern text."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return None, f"it is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})"
    try:
        parsed = _sre.parse(pattern)
        regex = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return None, f"it is not a valid regex (not a valid regular expression for Python's re: {getattr(e, 'msg', e)})"
    counts = [0]
    why = _problem(parsed, None, counts)
    if why is None and counts[0] > MAX_UNBOUNDED:
        why = f"it has {counts[0]} unbounded repeats (at most {MAX_UNBOUNDED}: more backtrack polynomially long)"
    return (None, why) if why else (regex, None)


def check_pattern(pattern: Any, field: str) -> re.Pattern[str]:
    """The compiled ``pattern`` (from config field ``field``); :class:`ConfigError` naming both if unsafe or invalid."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{field}: expected a regular expression string, got {type(pattern).__name__} {pattern!r}")
    regex, why = _checked(pattern)
    if regex is None:
        shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
        raise ConfigError(f"{field}={shown!r} is refused: {why}")
    return regex


def compiled(pattern: str) -> re.Pattern[str]:
    """The compiled form of a pattern already accepted by :func:`check_pattern` (cached)."""
    return check_pattern(pattern, "pattern")


def check_patterns(value: Any, field: str, *, list_is_regex: bool = False) -> None:
    """Check a config field that holds patterns: a string, a list/tuple of strings, or a dict keyed by patterns.

    A string is one regular expression.  A list holds plain names (PEFT's
    suffix match) unless ``list_is_regex`` (SWIFT's ``extra_state_keys``,
    ``layers_pattern``); each entry must be a string either way.  A dict's keys
    are regular expressions.  ``None`` passes.  Raises :class:`ConfigError`
    naming ``field`` (and the entry).
    """
    if value is None:
        return
    if isinstance(value, str):
        check_pattern(value, field)
    elif isinstance(value, dict):
        for key in value:
            check_pattern(key, f"{field}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{field}[{i}]: expected a string, got {type(item).__name__} {item!r}")
            if list_is_regex:
                check_pattern(item, f"{field}[{i}]")
    else:
        raise ConfigError(
            f"{field}: expected a string, a list of strings or None, got {type(value).__name__} {value!r}"
        )


#: config fields holding module-name patterns, and whether a list there holds regular expressions
PATTERN_FIELDS: dict[str, bool] = {
    "target_modules": False,  # a string is a regex (full match), a list holds name endings (PEFT's rule)
    "exclude_modules": False,
    "modules_to_save": False,
    "layers_pattern": True,  # interpolated into a regex: '.*\\.{layers_pattern}\\.(\\d+)'
    "rank_pattern": True,  # dict keyed by regexes
    "alpha_pattern": True,
}


def check_config_patterns(config: Any) -> None:
    """Check every pattern field of a tuner config (:data:`PATTERN_FIELDS` that it has); :class:`ConfigError` naming it.

    ``modules_to_save`` holds names only (a list of strings, or ``None``); a
    bare string there is one name.  Called from ``TunerConfig.__post_init__``,
    so every config, built in code or read from a file, passes through here.
    """
    for name, list_is_regex in PATTERN_FIELDS.items():
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        if name == "modules_to_save":
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"modules_to_save: expected a list of module names or None, got {value!r}")
            continue
        if name in ("rank_pattern", "alpha_pattern") and value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a dict {{module-name regex: value}}, got {type(value).__name__}")
        check_patterns(value, name, list_is_regex=list_is_regex)
