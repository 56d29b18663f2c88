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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes
from ..errors import ConfigError, ParamsMismatchError

__all__ = [
    "CallContext",
    "KeyNaming",
    "PeftFormat",
    "check_exact_tensors",
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


@dataclass(frozen=True)
class CallContext:
    """Per-call options every tuner's ``routes`` sees.

    ``generator`` drives random ops (dropout, noise); ``None`` means torch's
    global RNG (the stateful shim's behaviour, like PEFT).
    """

    generator: torch.Generator | None = None


def _same_keys(state: Mapping[str, torch.Tensor], config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """Default key hook: SWIFT's on-disk names are functuner's names."""
    return dict(state)


def _no_model_check(model: nn.Module, config: Any, source: str) -> None:
    """Default model check: nothing to check before params are built."""


class KeyNaming(NamedTuple):
    """Where the adapter name sits inside a tuner's param keys, so io can rename it component-wise.

    ``after``: key components followed by the adapter name as its own component
    (LoRA's ``q_proj.lora_A.<adapter>.weight``: ``"lora_A"``).  ``glued``:
    ``(prefix, following)`` pairs for components that are ``<prefix><adapter>``
    (Adapter's ``adapter_<adapter>.linear1``: ``("adapter_", ("linear1", "linear2"))``);
    ``following`` lists the components allowed next (``None``: any), so a module
    that merely looks alike is never renamed.
    """

    after: tuple[str, ...] = ()
    glued: tuple[tuple[str, tuple[str, ...] | None], ...] = ()


class PeftFormat(NamedTuple):
    """How a tuner's adapters look in PEFT's format (``PeftModel.save_pretrained``).

    ``peft_type``: PEFT's name (``adapter_config.json``'s ``peft_type``).
    ``config_to_json(config)``: PEFT's ``adapter_config.json`` dict; raises
    :class:`~functuner.errors.CheckpointError` naming the field PEFT cannot express.
    ``to_keys(state, adapter_name)``: functuner names -> PEFT's on-disk names
    *without* the ``base_model.model.`` prefix (io adds it and handles
    ``modules_to_save``); ``CheckpointError`` naming a key that is not this tuner's.
    ``from_keys(state, adapter_name)``: the inverse (prefix already removed).
    ``check_json(data, source)``: refuse a raw SWIFT ``adapter_config.json`` dict
    (read from ``source``) whose fields PEFT's format cannot hold, before a config
    is built from it (so a conversion says why PEFT cannot take it).
    """

    peft_type: str
    config_to_json: Callable[[Any], dict[str, Any]]
    to_keys: Callable[[Mapping[str, torch.Tensor], str], dict[str, torch.Tensor]]
    from_keys: Callable[[Mapping[str, torch.Tensor], str], dict[str, torch.Tensor]]
    check_json: Callable[[Mapping[str, Any], str], None] = lambda data, source: None


class PerSample(NamedTuple):
    """How a tuner runs a different adapter for each sample of one batch (PEFT's ``adapter_names=``).

    ``kind``: the name messages use (``"LoRA"``).  ``unsupported(model, params)``:
    why these params cannot run per sample, completing "it ..." (``None``: they can).
    ``stack(model, {name: params})``: the adapters prepared for per-sample use, an
    immutable value; pure and differentiable w.r.t. the params.  ``routes(model,
    stack, names)``: one call's routes, sample ``b`` running ``names[b]``
    (``"__base__"``: no adapter).  ``depends_on(model, params)``: tensors besides the
    params' own whose values a stack reads (DoRA's base weights), so a cached stack
    is rebuilt when they change.
    """

    kind: str
    unsupported: Callable[[nn.Module, TunerParams], str | None]
    stack: Callable[[nn.Module, Mapping[str, TunerParams]], Any]
    routes: Callable[[nn.Module, Any, Sequence[str]], Routes]
    depends_on: Callable[[nn.Module, TunerParams], Sequence[torch.Tensor]] = lambda model, params: ()


class ShardMergePlan(NamedTuple):
    """How a streaming merge changes a base checkpoint, key by key (see the ``plan_shard_merge`` hook).

    ``merges`` maps a base key to a pure function of its current tensor returning the merged tensor (float32;
    the caller rounds once to the output dtype); ``replacements`` maps a base key to a tensor stored with the
    adapter that replaces the base's (applied before a merge function of the same key).
    """

    merges: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
    replacements: Mapping[str, torch.Tensor]


class Tuner(NamedTuple):
    """A tuner: its SWIFT type name, config class and pure functions."""

    swift_type: str
    config_cls: type
    init: Callable[[nn.Module, Any, torch.Generator, str], TunerParams]
    routes: Callable[[nn.Module, TunerParams, CallContext], Routes]
    validate: Callable[[nn.Module, TunerParams], None]
    # merge(model_or_weights, params, base) / unmerge(model_or_weights, params, merged): the first argument is the
    # nn.Module, or (only where merges_weights) a {name: tensor} weights mapping: merging is weight arithmetic
    merge: Callable[[Any, TunerParams, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    unmerge: Callable[[Any, TunerParams, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    # whether merge/unmerge accept a weights mapping in place of the model (False: functuner.merge asks for the model)
    merges_weights: bool = False
    needs_generator: Callable[[nn.Module, TunerParams], bool] = lambda model, params: False
    # -- optional hooks the disk layer (functuner.io) calls; defaults mean "nothing special" --
    # functuner names -> SWIFT's on-disk names (beyond modules_to_save, which io handles); config may be None
    to_swift_keys: Callable[[Mapping[str, torch.Tensor], Any, str], dict[str, torch.Tensor]] = _same_keys
    # SWIFT's on-disk names -> functuner names (inverse of to_swift_keys; CheckpointError for a foreign key)
    from_swift_keys: Callable[[Mapping[str, torch.Tensor], Any, str], dict[str, torch.Tensor]] = _same_keys
    # where the adapter name sits in this tuner's keys (adapter renaming, SWIFT's shared-file quirk)
    key_naming: KeyNaming = KeyNaming()
    # PEFT's format for this tuner; None means "no PEFT format" (writing one is refused before any file is written)
    peft: PeftFormat | None = None
    # check a config read from ``source`` against a model before any tensor is allocated (CheckpointError/TargetError)
    check_model: Callable[[nn.Module, Any, str], None] = _no_model_check
    # check tensors read from ``source`` (functuner names) against their own config, no model needed
    check_state: Callable[[Any, Mapping[str, torch.Tensor], str], None] = lambda config, state, source: None
    # streaming merge into a checkpoint read shard by shard: (tensors, config, adapter_name, {base key: shape},
    # fan_in_fan_out, source) -> ShardMergePlan; None means "no streaming merge" (functuner merge refuses it)
    plan_shard_merge: (
        Callable[
            [Mapping[str, torch.Tensor], Any, str, Mapping[str, tuple[int, ...]], bool, str],
            ShardMergePlan,
        ]
        | None
    ) = None
    # -- optional hooks the shim (functuner.shim) calls; defaults mean "nothing special" --
    # per-sample adapters (adapter_names=); None means "not supported per sample"
    per_sample: PerSample | None = None
    # optimizer param groups of one adapter: (config, {key: trainable param}, defaults, is_decayed) -> groups, or None
    # for "no groups of its own" (its params then join the shim's decay / no-decay groups); LoRA+ uses it
    optimizer_groups: (
        Callable[
            [Any, Mapping[str, nn.Parameter], Mapping[str, Any], Callable[[torch.Tensor], bool]],
            list[dict[str, Any]] | None,
        ]
        | None
    ) = None
    # a new adapter combining adapters of this tuner (PEFT's add_weighted_adapter); None means "cannot be combined"
    combine: Callable[..., TunerParams] | None = None
    # whether adding an adapter of this tuner freezes the base model's parameters (SWIFT's has_additional_modules);
    # False for a tuner that adds no tensors and leaves the model fully trainable (NEFTune)
    freezes_base: bool = True


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


def _clone_module_tree(module: nn.Module) -> nn.Module:
    """A per-call shallow clone of ``module``'s tree with fresh parameter/module dicts.

    Tensors are shared; only the dicts are new, so overriding parameters on the
    clone is invisible to the original and to other threads.
    """
    clone = copy.copy(module)
    clone.__dict__["_parameters"] = dict(module._parameters)
    clone.__dict__["_buffers"] = dict(module._buffers)
    clone.__dict__["_modules"] = {
        k: (_clone_module_tree(v) if v is not None else None) for k, v in module._modules.items()
    }
    return clone


def override_slot(overrides: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    """A forward slot that recomputes the module with some parameters replaced.

    ``overrides`` maps names relative to the module (``"weight"``,
    ``"0.bias"``...) to tensors.  The base output is discarded and the module is
    re-run on a per-call clone, so the original module is never written to.
    """

    def slot(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        clone = _clone_module_tree(module)
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
