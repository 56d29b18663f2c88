"""Every on-disk key renaming, both directions, in one place; what is special to a tuner comes from its hooks.

Three namings of the same tensors:

* **functuner** (in memory): relative to the original model, with the adapter
  name inside: ``model.layers.0.q_proj.lora_A.default.weight``.
* **SWIFT on disk** (``SwiftModel.save_pretrained``): functuner's names, except
  ``modules_to_save`` copies, which sit at the original module's keys, and what
  a tuner's ``to_swift_keys`` hook renames (Part copies at the original keys,
  LLaMA-Pro blocks at expanded-list indices, LoRA-adapted biases at
  ``<module>.base_layer.bias``).
* **PEFT on disk** (``get_peft_model_state_dict``): ``base_model.model.``
  prefix, ``modules_to_save`` copies at the original module's keys, and the
  tuner's own parts renamed by its ``peft.to_keys`` hook (LoRA drops the
  adapter name).

:func:`to_disk` / :func:`from_disk` are the two entry points (``fmt``
``"swift"`` or ``"peft"``); the rest are the public pieces.  All functions are
pure string/dict transforms: tensors are passed through untouched (same
objects).  Nothing here knows a particular tuner: the ``Tuner`` hooks
(:mod:`functuner.tuners.base`) say what differs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import CheckpointError
from ..tuners import REGISTRY, Tuner, tuner_for

__all__ = [
    "PEFT_PREFIX",
    "adapter_in_key",
    "adapter_name_markers",
    "adapter_modules",
    "from_disk",
    "from_peft_state_dict",
    "from_swift_state_dict",
    "peft_modules_to_save",
    "rename_adapter",
    "split_peft_base_weights",
    "to_disk",
    "to_peft_state_dict",
    "to_swift_state_dict",
]

PEFT_PREFIX = "base_model.model."
_PEFT_ROOT = "base_model."  # PEFT's tuner model: a tuner's ``outside_model`` tensors sit here
_MTS = "modules_to_save"
FORMATS = ("swift", "peft")


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise CheckpointError(f"format={fmt!r} is not a checkpoint format; use one of {list(FORMATS)}")


def _modules_to_save(config: Any) -> tuple[str, ...]:
    spec = getattr(config, _MTS, None)
    if not spec:
        return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)


def _peft_tuner(config: Any) -> Tuner:
    tuner = tuner_for(config)
    if tuner.peft is None:
        have = [t.config_cls.__name__.removesuffix("Config") for t in REGISTRY.values() if t.peft is not None]
        raise CheckpointError(
            f"{tuner.swift_type} adapters have no PEFT format (only {', '.join(have)} in both SWIFT and PEFT"
            f" format); save {type(config).__name__} in SWIFT's format instead"
        )
    return tuner


_AFTER_CACHE: tuple[tuple[int, ...], frozenset[str]] = ((), frozenset())


def _after_names() -> frozenset[str]:
    """Every registered tuner's "adapter name follows" components, recomputed only when the registry changes."""
    global _AFTER_CACHE
    ident = tuple(id(t) for t in REGISTRY.values())
    if _AFTER_CACHE[0] != ident:
        _AFTER_CACHE = (ident, frozenset(part for t in REGISTRY.values() for part in t.key_naming.after))
    return _AFTER_CACHE[1]


def _is_tuner_key(key: str, tuner: Tuner) -> bool:
    return bool(set(key.split(".")) & set(tuner.key_naming.after))


# ---------------------------------------------------------------------------
# the two entry points
# ---------------------------------------------------------------------------
def to_disk(state: Mapping[str, torch.Tensor], config: Any, adapter_name: str, fmt: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors, functuner names -> the names ``fmt`` (``"swift"`` or ``"peft"``) stores on disk.

    ``modules_to_save`` copies go to the original module's keys; the tuner's
    hooks rename its own keys.  ``fmt="peft"`` for a tuner without a PEFT
    format, or a key that is not this adapter's, raises :class:`CheckpointError`.
    """
    _check_fmt(fmt)
    if fmt == "peft":
        return _to_peft(state, _peft_tuner(config), adapter_name)
    rest, saved = _pop_saved(state, adapter_name)
    return {**tuner_for(config).to_swift_keys(rest, config, adapter_name), **saved}


def _pop_saved(
    state: Mapping[str, torch.Tensor], adapter_name: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(other keys, modules_to_save copies at the original module's keys)``."""
    marker = f".{_MTS}.{adapter_name}."
    saved: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if marker in key:
            mod, _, leaf = key.partition(marker)
            saved[f"{mod}.{leaf}"] = value
        else:
            rest[key] = value
    return rest, saved


def _to_peft(state: Mapping[str, torch.Tensor], tuner: Tuner, adapter_name: str) -> dict[str, torch.Tensor]:
    assert tuner.peft is not None
    rest, saved = _pop_saved(state, adapter_name)
    own = tuner.peft.to_keys(rest, adapter_name)
    outside, top = tuner.peft.outside_model, tuner.peft.top_level
    root = tuner.peft.model_prefix or PEFT_PREFIX
    return {("" if k in top else _PEFT_ROOT if k in outside else root) + k: v for k, v in {**own, **saved}.items()}


def from_disk(state: Mapping[str, torch.Tensor], config: Any, adapter_name: str, fmt: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors as ``fmt`` (``"swift"`` or ``"peft"``) stores them -> functuner names.

    ``config`` (from the same ``adapter_config.json``) says which modules'
    full copies the file holds (``modules_to_save``) and drives the tuner's
    hooks.  A PEFT key without the ``base_model.model.`` prefix, a SWIFT key
    with it, or a key the tuner does not know raises :class:`CheckpointError`
    naming the key.  PEFT's saved base weights (``...base_layer.weight``) must
    be split off first (:func:`split_peft_base_weights`).
    """
    _check_fmt(fmt)
    tuner = tuner_for(config)
    mts = _modules_to_save(config)
    if fmt == "peft":
        peft = _peft_tuner(config).peft
        assert peft is not None
        bare: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key in peft.top_level:
                bare[key] = value  # stored with no prefix (prompt learning's prompt_embeddings)
                continue
            if key.startswith(_PEFT_ROOT) and key[len(_PEFT_ROOT) :] in peft.outside_model:
                bare[key[len(_PEFT_ROOT) :]] = value  # stored outside the model (VeRA's projections)
                continue
            root = peft.model_prefix or PEFT_PREFIX
            if not key.startswith(root):
                raise CheckpointError(f"key {key!r} lacks PEFT's {root!r} prefix")
            bare[key[len(root) :]] = value
        saved_mods = peft_modules_to_save(bare, mts)
        return _split_saved(bare, saved_mods, adapter_name, tuner, lambda own: peft.from_keys(own, adapter_name))
    for key in state:
        if key.startswith(PEFT_PREFIX):
            raise CheckpointError(
                f"key {key!r} has PEFT's {PEFT_PREFIX!r} prefix; this file is in PEFT layout, not SWIFT's"
            )
    saved_mods = {m for k in state if not _is_tuner_key(k, tuner) and (m := _saved_module_of(k, mts)) is not None}
    return _split_saved(
        state, saved_mods, adapter_name, tuner, lambda own: tuner.from_swift_keys(own, config, adapter_name)
    )


def _split_saved(
    state: Mapping[str, torch.Tensor], saved_mods: Iterable[str], adapter_name: str, tuner: Tuner, rename: Any
) -> dict[str, torch.Tensor]:
    """``modules_to_save`` copies -> ``<module>.modules_to_save.<adapter>.<param>``; the rest through ``rename``."""
    mods = sorted(saved_mods, key=len, reverse=True)
    saved: dict[str, torch.Tensor] = {}
    own: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        mod = None if _is_tuner_key(key, tuner) else next((m for m in mods if key.startswith(m + ".")), None)
        if mod is not None:
            saved[f"{mod}.{_MTS}.{adapter_name}.{key[len(mod) + 1 :]}"] = value
        else:
            own[key] = value
    return {**rename(own), **saved}


def _saved_module_of(key: str, modules_to_save: Iterable[str]) -> str | None:
    """The module path inside ``key`` that a ``modules_to_save`` entry names (PEFT's exact-or-suffix rule).

    ``None`` for a key already in functuner's naming (``<module>.modules_to_save.<adapter>.<param>``), so
    renaming such a key again cannot nest the component twice.
    """
    parts = key.split(".")
    if _MTS in parts:
        return None
    for end in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:end])
        if any(path == m or path.endswith("." + m) for m in modules_to_save):
            return path
    return None


def peft_modules_to_save(bare: Iterable[str], modules_to_save: Iterable[str]) -> set[str]:
    """Full module paths among PEFT keys (prefix removed) that ``modules_to_save`` names (its exact-or-suffix rule).

    The outermost such module of each key counts.
    """
    spec = tuple(modules_to_save)
    if not spec:
        return set()
    out = set()
    for key in bare:
        parts = key.split(".")
        for end in range(1, len(parts)):
            path = ".".join(parts[:end])
            if any(path == m or path.endswith("." + m) for m in spec):
                out.add(path)
                break
    return out


# ---------------------------------------------------------------------------
# public pieces (config-free forms kept for callers that have only tensors)
# ---------------------------------------------------------------------------
def _peft_tuners(config: Any) -> list[Tuner]:
    if config is not None:
        return [_peft_tuner(config)]
    return [t for t in REGISTRY.values() if t.peft is not None]


def to_peft_state_dict(
    state: Mapping[str, torch.Tensor], adapter_name: str | None = None, config: Any = None
) -> dict[str, torch.Tensor]:
    """functuner names of one adapter -> PEFT's on-disk names (``state`` may be :class:`~functuner.TunerParams`).

    ``adapter_name`` / ``config`` default to the params' own.  Without a config
    the tuner with a PEFT format whose keys these are is used (LoRA).  Keys
    that carry another adapter's name are an error (a PEFT directory holds one
    adapter per folder).
    """
    config = config if config is not None else getattr(state, "config", None)
    name = adapter_name if adapter_name is not None else str(getattr(state, "adapter_name", "default"))
    error: CheckpointError | None = None
    for tuner in _peft_tuners(config):
        try:
            return _to_peft(state, tuner, name)
        except CheckpointError as e:
            error = e
    raise error or CheckpointError("no tuner has a PEFT format")


def from_peft_state_dict(
    state: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    modules_to_save: Iterable[str] | None = None,
    config: Any = None,
) -> dict[str, torch.Tensor]:
    """PEFT's on-disk names -> functuner names for adapter ``adapter_name``.

    ``modules_to_save`` lists the module names whose full copies the file
    holds (from ``adapter_config.json``); their keys become
    ``<module>.modules_to_save.<adapter>.<param>``.  A key without the
    ``base_model.model.`` prefix is an error naming the key (PEFT's silent
    "loaded nothing" failure mode).
    """
    for key in state:
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"key {key!r} lacks PEFT's {PEFT_PREFIX!r} prefix")
    mts = tuple(modules_to_save or ())
    error: CheckpointError | None = None
    for tuner in _peft_tuners(config):
        peft = tuner.peft
        assert peft is not None
        bare = {k[len(PEFT_PREFIX) :]: v for k, v in state.items()}
        saved = peft_modules_to_save(bare, mts) if mts else set()
        try:
            return _split_saved(bare, saved, adapter_name, tuner, lambda own, p=peft: p.from_keys(own, adapter_name))
        except CheckpointError as e:
            error = e
    raise error or CheckpointError("no tuner has a PEFT format")


def to_swift_state_dict(
    state: Mapping[str, torch.Tensor], adapter_name: str | None = None, config: Any = None
) -> dict[str, torch.Tensor]:
    """functuner names of one adapter -> SWIFT's on-disk names (``SwiftModel.save_pretrained``).

    ``state`` may be :class:`~functuner.TunerParams` (its config and name are
    used).  Without a config every tuner's ``to_swift_keys`` hook is applied in
    turn (each renames only keys it recognises).
    """
    config = config if config is not None else getattr(state, "config", None)
    name = adapter_name if adapter_name is not None else str(getattr(state, "adapter_name", "default"))
    if config is not None:
        return to_disk(state, config, name, "swift")
    out, saved = _pop_saved(state, name)
    for tuner in REGISTRY.values():
        out = tuner.to_swift_keys(out, None, name)
    return {**out, **saved}


def from_swift_state_dict(
    state: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    modules_to_save: Iterable[str] | None = None,
    config: Any = None,
) -> dict[str, torch.Tensor]:
    """SWIFT's on-disk names -> functuner names (inverse of :func:`to_swift_state_dict`).

    With ``config`` this is :func:`from_disk` (``modules_to_save`` then comes
    from it).  Without, only ``modules_to_save`` copies are renamed (the
    tuner's own renaming needs its config).
    """
    if config is not None:
        return from_disk(state, config, adapter_name, "swift")
    for key in state:
        if key.startswith(PEFT_PREFIX):
            raise CheckpointError(
                f"key {key!r} has PEFT's {PEFT_PREFIX!r} prefix; this file is in PEFT layout, not SWIFT's"
            )
    mts = tuple(modules_to_save or ())
    after = _after_names()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module = None if set(key.split(".")) & after else _saved_module_of(key, mts)
        out[f"{module}.{_MTS}.{adapter_name}.{key[len(module) + 1 :]}" if module else key] = value
    return out


def adapter_modules(state: Iterable[str], config: Any, adapter_name: str) -> list[str]:
    """The modules an adapter's tensors (functuner names) attach to, sorted; from the tuner's ``key_naming``.

    A key counts when a component is one its tuner puts the adapter name after
    (LoRA's ``lora_A``) or glues the name to (Adapter's ``adapter_<name>``);
    the module is everything before that component.  ``modules_to_save``
    copies and plain biases are not targets.
    """
    naming = tuner_for(config).key_naming
    glued = {prefix + adapter_name for prefix, _ in naming.glued}
    out: set[str] = set()
    for key in state:
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part in naming.after or part in glued:
                out.add(".".join(parts[:i]))
                break
    return sorted(out)


def adapter_name_markers() -> frozenset[str]:
    """The key components after which a registered tuner's keys carry the adapter name (``lora_A``...)."""
    return _after_names()


def adapter_in_key(key: str, after: frozenset[str] | None = None) -> str | None:
    """The adapter name a key carries as its own component (after e.g. ``lora_A``), or ``None``.

    ``after`` (the registered tuners' components, :func:`adapter_name_markers`) may be passed by a caller
    looking at many keys.
    """
    parts = key.split(".")
    if after is None:
        after = _after_names()
    for i, part in enumerate(parts[:-1]):
        if part in after:
            return parts[i + 1]
    return None


def rename_adapter(state: Mapping[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """Rename the adapter-name *component* of every key (never a substring of another word).

    ``q_proj.lora_A.adapter.weight`` with ``adapter -> my_adapter`` becomes
    ``q_proj.lora_A.my_adapter.weight``; a module called ``adapter_mlp`` is not
    touched (SWIFT's plain text replacement breaks both cases).  Where the name
    sits comes from every tuner's ``key_naming`` hook.
    """
    after = _after_names() | {_MTS}
    glued = [g for t in REGISTRY.values() for g in t.key_naming.glued]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        renamed = []
        for i, part in enumerate(parts):
            prev = parts[i - 1] if i else ""
            nxt = parts[i + 1] if i + 1 < len(parts) else ""
            prefix = next(
                (p for p, allowed in glued if part == p + old and nxt and (allowed is None or nxt in allowed)),
                None,
            )
            if part == old and prev in after:
                renamed.append(new)
            elif prefix is not None:
                renamed.append(prefix + new)
            else:
                renamed.append(part)
        out[".".join(renamed)] = value
    return out


def split_peft_base_weights(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate the full base weights PEFT sometimes saves beside an adapter.

    With ``save_embedding_layers`` (on by default when embeddings are targeted)
    PEFT stores ``base_model.model.<module>.base_layer.weight``: the whole
    original weight.  Returns ``(adapter tensors, {<module>.weight: tensor})``
    with the second part under the base model's own names.
    """
    rest: dict[str, torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(PEFT_PREFIX) and key.endswith(".base_layer.weight"):
            base[key[len(PEFT_PREFIX) : -len(".base_layer.weight")] + ".weight"] = value
        else:
            rest[key] = value
    return rest, base
