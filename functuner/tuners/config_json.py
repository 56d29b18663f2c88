"""``adapter_config.json``: functuner configs to and from SWIFT's and PEFT's JSON (the config <-> JSON home).

SWIFT writes a config's fields plus ``swift_type``; PEFT writes its own fields
plus ``peft_type``.  Which tuner reads a PEFT config, and how a config is
written in PEFT's format, comes from the tuner's ``peft`` hook
(:class:`~functuner.tuners.base.PeftFormat`); a tuner without one has no PEFT
format.  Configs with fields functuner does not know are refused, naming the
file and field, except PEFT/SWIFT bookkeeping fields at their neutral values.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..core.fs import atomic_write_text, read_json
from ..errors import CheckpointError, ConfigError
from .registry import REGISTRY, tuner_for

if TYPE_CHECKING:
    from .spec import Tuner

__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "EXTRA_STATE_DIR",
    "SAFETENSORS_NAME",
    "config_from_json",
    "config_from_peft",
    "config_to_json",
    "is_peft_native_type",
    "kept_json_fields",
    "peft_config_json",
    "peft_tuner",
    "read_adapter_config",
    "write_adapter_config",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
EXTRA_STATE_DIR = "extra_states"

# Fields PEFT / SWIFT write into adapter_config.json that functuner's configs do not have.
# A value equal to the neutral one (or any value for pure bookkeeping: _ANY) is dropped on read.
_ANY = object()
_NEUTRAL_FIELDS: dict[str, Any] = {
    "peft_version": _ANY,
    "megatron_core": _ANY,
    "qalora_group_size": _ANY,
    "auto_mapping": _ANY,
    "model_key_mapping": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "corda_config": None,
    "eva_config": None,
    "loftq_config": {},
    "megatron_config": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "ensure_weight_tying": False,
    "kasa_config": None,
    "lora_ga_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "velora_config": None,
    "runtime_config": _ANY,
    "has_additional_modules": _ANY,
}


def config_to_json(config: Any) -> dict[str, Any]:
    """The ``adapter_config.json`` content SWIFT writes for ``config`` (fields plus ``swift_type``)."""
    data = config.to_dict()
    data["swift_type"] = tuner_for(config).swift_type
    for key, value in kept_json_fields(config).items():  # bookkeeping read from a file goes back as it was
        data.setdefault(key, value)
    absent = config.__dict__.get(
        "_absent_json_fields", _NOT_IN_SWIFT_4_6 if "_kept_json_fields" not in config.__dict__ else ()
    )
    for f in dataclasses.fields(config):  # fields the file lacked (an older peft's) stay out while at their default
        if f.name in absent and data.get(f.name) == _default_json(f):
            del data[f.name]
    return cast(dict[str, Any], data)


# Fields of newer peft releases that ms-swift 4.6 (which needs peft<0.19) does not write: a config built in code
# leaves them out of SWIFT's adapter_config.json while they are at their default, so the file is the one SWIFT writes.
_NOT_IN_SWIFT_4_6 = frozenset({"kasa_config", "monteclora_config", "use_bdlora", "velora_config", "base_fingerprint"})


def _default_json(f: dataclasses.Field[Any]) -> Any:
    """A dataclass field's default as ``to_dict`` writes it (tuples as lists)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    return list(value) if isinstance(value, tuple) else value


def kept_json_fields(config: Any) -> dict[str, Any]:
    """The PEFT/SWIFT bookkeeping fields (``peft_version``, ``megatron_core``...) ``config`` was read with.

    :func:`config_from_json` keeps them on the config (not a field: equality and
    hashing ignore them) so that re-saving an ms-swift checkpoint writes its
    ``adapter_config.json`` back byte for byte.  A copy; empty for a config built in code.
    """
    return {k: json.loads(json.dumps(v)) for k, v in config.__dict__.get("_kept_json_fields", {}).items()}


def peft_tuner(config: Any, where: str = "") -> Tuner:
    """The tuner of ``config`` (or ``config`` itself, a :class:`Tuner`) if it has a PEFT format.

    Otherwise :class:`CheckpointError` (starting with ``where``) saying which tuners have one.
    """
    tuner = config if any(config is t for t in REGISTRY.values()) else tuner_for(config)
    if tuner.peft is None:
        have = [t.config_cls.__name__.removesuffix("Config") for t in REGISTRY.values() if t.peft is not None]
        raise CheckpointError(
            f"{where + ': ' if where else ''}{tuner.swift_type} adapters have no PEFT format (only"
            f" {', '.join(have)} {'exist' if len(have) > 1 else 'exists'} in both SWIFT and PEFT format);"
            " save it in SWIFT's format"
        )
    return tuner


def peft_config_json(config: Any) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for ``config``; :class:`CheckpointError` if PEFT cannot express it."""
    peft = peft_tuner(config).peft
    assert peft is not None
    return peft.config_to_json(config)


def _tuner_of_json(data: Mapping[str, Any], source: str) -> Tuner:
    swift_type, peft_type = data.get("swift_type"), data.get("peft_type")
    if not swift_type and not peft_type:
        raise CheckpointError(f"{source}: has neither 'swift_type' nor 'peft_type'")
    if not swift_type:
        for t in REGISTRY.values():
            if t.peft is not None and t.peft.peft_type == peft_type:
                return t
        if is_peft_native_type(peft_type):
            raise CheckpointError(
                f"{source}: a PEFT {peft_type} adapter; functuner implements only"
                f" {sorted(t.peft.peft_type for t in REGISTRY.values() if t.peft is not None)} of PEFT's types."
                " Load it with Swift.from_pretrained, which passes it to peft.PeftModel.from_pretrained"
            )
    try:
        return tuner_for(str(swift_type or peft_type))
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_from_json(data: Mapping[str, Any], source: str = CONFIG_NAME) -> Any:
    """Build a functuner config from an ``adapter_config.json`` dict (SWIFT's or PEFT's).

    Raises :class:`CheckpointError` naming ``source`` and the field when the
    tuner type is unknown or a field has no functuner counterpart.
    """
    tuner = _tuner_of_json(data, source)
    names = {f.name for f in dataclasses.fields(tuner.config_cls)}
    kept: dict[str, Any] = {}
    bookkeeping: dict[str, Any] = {}
    for key, value in data.items():
        if key in names:
            kept[key] = value
        elif key in ("swift_type", "peft_type"):
            continue
        elif key in _NEUTRAL_FIELDS:
            neutral = _NEUTRAL_FIELDS[key]
            if neutral is not _ANY and value != neutral and value not in (None, {}, [], False):
                raise CheckpointError(f"{source}: field {key}={value!r} is not supported by functuner")
            bookkeeping[key] = value
        else:
            raise CheckpointError(f"{source}: field {key!r} is unknown to functuner's {tuner.config_cls.__name__}")
    try:
        config = tuner.config_cls.from_dict(kept)  # type: ignore[attr-defined]
        if bookkeeping:  # written back by config_to_json (kept_json_fields), so a re-save is byte for byte
            object.__setattr__(config, "_kept_json_fields", json.loads(json.dumps(bookkeeping)))
        if "swift_type" in data:  # fields a SWIFT file lacked are left out again while they keep their default
            object.__setattr__(config, "_absent_json_fields", frozenset(names - set(data)))
        return config
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError, RecursionError) as e:
        # ConfigError names the field; a raw error means a value of a JSON type the field cannot take
        raise CheckpointError(f"{source}: {e if isinstance(e, ConfigError) else f'{type(e).__name__}: {e}'}") from None


def config_from_peft(peft_config: Any, not_ours: ConfigError | None = None) -> Any:
    """functuner's config equal to a ``peft.PeftConfig`` of a tuner functuner implements (lossless, or refused).

    Every field of PEFT's config must have a functuner counterpart (same name)
    or be PEFT bookkeeping at its neutral value; otherwise :class:`ConfigError`
    names the field.  Sets (PEFT's ``target_modules``) become sorted lists,
    enums their values, as in PEFT's ``adapter_config.json``.  An object that is
    no PEFT config (no ``peft_type`` and ``to_dict``) raises ``not_ours`` (the
    caller's "no tuner takes this config" error) or a ``ConfigError`` saying so.
    """
    if not (hasattr(peft_config, "peft_type") and callable(getattr(peft_config, "to_dict", None))):
        raise not_ours or ConfigError(f"{type(peft_config).__name__} is not a PEFT config")
    data = {k: _plain(v) for k, v in peft_config.to_dict().items()}
    kind = data.get("peft_type")
    if not any(t.peft is not None and t.peft.peft_type == kind for t in REGISTRY.values()):
        have = sorted(t.peft.peft_type for t in REGISTRY.values() if t.peft is not None)
        raise ConfigError(
            f"{type(peft_config).__name__} (peft_type {kind!r}) has no functuner tuner; functuner implements {have}"
            " of PEFT's types. Use Swift.prepare_model(model, peft_config), which returns a peft.PeftModel"
        )
    try:
        return config_from_json(data, f"{type(peft_config).__name__}")
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def _plain(value: Any) -> Any:
    """A PEFT config value as JSON holds it (sets -> sorted lists, enums -> their values)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, enum.Enum):  # PeftType, TaskType
        return value.value
    return value


def is_peft_native_type(peft_type: Any) -> bool:
    """Whether ``peft_type`` (an ``adapter_config.json`` value) names one of PEFT's tuners the shim leaves to ``peft``.

    Those are PEFT's types functuner does not implement, and those whose tuner's
    ``PeftFormat.shim_reads`` is ``False`` (IA3, LoHa, VeRA...: ``functuner.load``
    reads them natively, but ``Swift.from_pretrained`` returns a ``PeftModel`` for
    them, as SWIFT does); ``Swift`` loads them with ``peft`` itself (:mod:`functuner.io.peft`).
    """
    if not isinstance(peft_type, str):
        return False
    if any(
        t.peft is not None and t.peft.shim_reads and t.peft.peft_type == peft_type.upper() for t in REGISTRY.values()
    ):
        return False
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return peft_type in {t.value for t in peft.PeftType}


def write_adapter_config(save_directory: str | os.PathLike[str], config: Any, **extra: Any) -> Path:
    """Write ``adapter_config.json`` for ``config`` into ``save_directory`` (temp file + rename); returns its path."""
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; expected a directory")
    folder.mkdir(parents=True, exist_ok=True)
    data = config_to_json(config)
    data.update(extra)
    atomic_write_text(folder / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True))
    return folder / CONFIG_NAME


def read_adapter_config(path: str | os.PathLike[str], revision: str | None = None, **hub_kwargs: Any) -> Any:
    """The config in ``path/adapter_config.json`` (``path`` a directory or a hub id)."""
    from ..core.hub import resolve_model_dir

    folder = Path(resolve_model_dir(path, revision, **hub_kwargs))
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}")
    return config_from_json(read_json(cfg, folder), str(cfg))
