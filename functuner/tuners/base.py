"""The shape every tuner has: a config dataclass plus pure functions.

A tuner is a :class:`Tuner` value (like optax's ``GradientTransformation``):

* ``init(model, config, generator, adapter_name) -> TunerParams``: fresh params;
  reads the model, never changes it.
* ``routes(model, params, ctx) -> Routes``: the slot functions one call runs at
  each adapted module (how ``apply`` injects the tuner without touching the model).
* ``merge(model, params, base) -> dict`` / ``unmerge``: weight arithmetic on a
  state mapping, ``None`` where the tuner's math has no merged form; with
  ``merges_weights=True`` the model may be replaced by its ``{name: tensor}`` weights.
* ``validate(model, params)``: raise :class:`~functuner.errors.ParamsMismatchError`
  if ``params`` does not fit ``model``.

Adding a tuner means adding one module with these functions and one line in
:mod:`functuner.tuners`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.patterns import check_config_patterns
from ..core.routing import MethodSlot
from ..errors import ConfigError, ParamsMismatchError
from .spec import CallContext, KeyNaming, PeftFormat, PerSample, ShardMergePlan, Tuner, module_local

__all__ = [
    "CallContext",
    "KeyNaming",
    "PeftFormat",
    "PerSample",
    "ShardMergePlan",
    "check_exact_tensors",
    "check_numbers",
    "clone_module_tree",
    "module_local",
    "Tuner",
    "TunerConfig",
    "override_slot",
    "resolve_dtype",
]


@dataclass(frozen=True, eq=False)
class TunerConfig:
    """Base of every tuner config: frozen, hashable by value, JSON round-trippable.

    Subclasses are declared ``@dataclass(frozen=True, eq=False)`` so they keep
    this class's value-based ``__eq__``/``__hash__``.

    Lists given for sequence fields are stored as tuples so a config can be
    static pytree aux data.  Use ``dataclasses.replace(cfg, r=16)`` to derive a
    changed config.

    As in SWIFT, every config can be built with its defaults (``AdapterConfig()``):
    construction checks only the values that are set (``check(complete=False)``);
    fields a tuner needs (``dim``, ``target_modules``...) are checked by
    ``check()``, which the tuner's ``init`` (so ``functuner.init`` and
    ``Swift.prepare_model``) and :meth:`from_dict` (configs read from disk) run.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
            elif isinstance(v, set):
                object.__setattr__(self, f.name, tuple(sorted(v)))
        check_numbers(self)
        check_config_patterns(self)  # regexes from a file are checked before anything matches with them
        self.check(complete=False)

    def check(self, *, complete: bool = True) -> None:
        """Raise :class:`ConfigError` naming the field for a bad value.

        ``complete=False`` (at construction) leaves unset (``None``) required fields
        alone; ``complete=True`` (before params are built) also demands them.
        """

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else copy.deepcopy(v)
        return out

    def _canonical(self) -> str:
        """Canonical JSON text of the config, computed once (configs are frozen; nested dicts must not be mutated)."""
        cached = self.__dict__.get("_canonical_cache")
        if cached is None:
            cached = type(self).__name__ + json.dumps(self.to_dict(), sort_keys=True, default=repr)
            object.__setattr__(self, "_canonical_cache", cached)
        return cached

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash_cache")
        if cached is None:
            cached = hash(self._canonical())
            object.__setattr__(self, "_hash_cache", cached)
        return cached

    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        if type(other) is not type(self):
            return NotImplemented
        return self._canonical() == other._canonical()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> Any:
        """Build a config from a dict; unknown keys raise :class:`ConfigError` when ``strict``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and strict:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}")
        config = cls(**{k: v for k, v in data.items() if k in names})
        config.check()
        return config

    # SWIFT's SwiftConfig interface (functuner.SwiftConfig is this class); disk I/O lives in functuner.io.checkpoint.
    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``save_directory/adapter_config.json`` (fields plus ``swift_type``), atomically, as SWIFT does."""
        from .config_json import write_adapter_config

        write_adapter_config(save_directory, self, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> Any:
        """Read ``adapter_config.json`` from a directory or ModelScope hub id; the class comes from ``swift_type``."""
        from .config_json import read_adapter_config

        config = read_adapter_config(pretrained_model_name_or_path, **kwargs)
        if cls is not TunerConfig and not isinstance(config, cls):
            raise ConfigError(f"{pretrained_model_name_or_path}: holds a {type(config).__name__}, not a {cls.__name__}")
        return config


_FLOAT32_MAX = 3.4028234663852886e38
_INT64_MAX = 2**63 - 1


def _bad_number(value: Any, where: str) -> str | None:
    """Where inside a config value a number is non-finite or out of range (``None`` if every number is fine)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
        return f"{where}={value!r}: expected a finite number with |x| <= 3.4e38 (float32's range)"
    if isinstance(value, int) and abs(value) > _INT64_MAX:
        return f"{where}={value!r}: expected an integer with |x| < 2**63"
    if isinstance(value, dict):
        for k, v in value.items():
            why = _bad_number(v, f"{where}[{k!r}]")
            if why:
                return why
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            why = _bad_number(v, f"{where}[{i}]")
            if why:
                return why
    return None


def check_numbers(config: Any) -> None:
    """Refuse a NaN, an infinity, a float beyond float32's range or an integer beyond int64's in any config field.

    Every numeric field of every tuner (``lora_alpha``, ``alpha_pattern``
    values, ``lora_dropout``, learning-rate ratios...) ends up in float32 or
    int64 tensor arithmetic; JSON from a file may hold ``NaN``, ``Infinity``
    or ``1e300``.  Raises :class:`ConfigError` naming the field.
    """
    for f in dataclasses.fields(config):
        why = _bad_number(getattr(config, f.name), f.name)
        if why:
            raise ConfigError(why)


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def resolve_dtype(value: str | torch.dtype | None, field: str) -> torch.dtype | None:
    """Map SWIFT's dtype names (``'fp32'``, ``'bf16'``...) or a ``torch.dtype`` to a dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).replace("torch.", "")
    if key not in _DTYPES:
        raise ConfigError(f"{field}={value!r} is not a dtype; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def clone_module_tree(module: nn.Module) -> nn.Module:
    """A per-call shallow clone of ``module``'s tree with fresh parameter/module dicts.

    Tensors are shared; only the dicts are new, so overriding parameters on the
    clone is invisible to the original and to other threads.
    """
    clone = copy.copy(module)
    if isinstance(clone.__dict__.get("forward"), MethodSlot):  # routes the original module: the clone runs its class's
        del clone.__dict__["forward"]
    clone.__dict__["_parameters"] = dict(module._parameters)
    clone.__dict__["_buffers"] = dict(module._buffers)
    clone.__dict__["_modules"] = {
        k: (clone_module_tree(v) if v is not None else None) for k, v in module._modules.items()
    }
    return clone


def override_slot(overrides: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    """A forward slot that recomputes the module with some parameters replaced.

    ``overrides`` maps names relative to the module (``"weight"``,
    ``"0.bias"``...) to tensors.  The base output is discarded and the module is
    re-run on a per-call clone, so the original module is never written to.
    """

    def slot(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        clone = clone_module_tree(module)
        for name, tensor in overrides.items():
            owner_path, _, leaf = name.rpartition(".")
            owner = clone.get_submodule(owner_path) if owner_path else clone
            owner.__dict__["_parameters"][leaf] = tensor
        # hooks are shared with the original; our own slot on the clone finds no route and returns None
        return clone(*args, **kwargs)

    return slot


def check_exact_tensors(params: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise :class:`ParamsMismatchError` unless ``params`` has exactly the names of ``expected``, each of that shape.

    ``what`` starts the message (e.g. ``"ReFT params do not fit the model"``); the
    message then lists up to four missing and four unexpected names, or the first
    tensor whose shape is wrong.  Pure.
    """
    missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or extra:
        raise ParamsMismatchError(f"{what}: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, shape in expected.items():
        if tuple(params[k].shape) != shape:
            raise ParamsMismatchError(f"params[{k!r}] has shape {tuple(params[k].shape)}, expected {shape}")
