"""Adapter checkpoints on disk: SWIFT's and PEFT's directory layouts, read and written safely.

Layouts (both are what the real libraries write):

* **SWIFT** (``SwiftModel.save_pretrained``): one sub-folder per adapter,
  ``<dir>/<adapter>/adapter_config.json`` (the config fields plus
  ``swift_type``) and ``<dir>/<adapter>/adapter_model.safetensors`` with keys
  such as ``model.layers.0.self_attn.q_proj.lora_A.<adapter>.weight``;
  ``<dir>/extra_states/`` for ``extra_state_keys``; ``<dir>/configuration.json``.
* **PEFT** (``PeftModel.save_pretrained``): the ``default`` adapter at the
  root, others in sub-folders; keys prefixed ``base_model.model.`` with the
  adapter name removed; ``adapter_config.json`` without ``swift_type``.

Safety rules, all enforced here:

* pickled ``adapter_model.bin`` files are refused with
  :class:`~functuner.errors.UnsafeCheckpointError` unless the caller passes
  ``weights_only=True`` (then torch's restricted, non-executing loader is used);
* every file read must resolve (symlinks followed) inside the checkpoint
  directory; adapter names must pass :func:`functuner.naming.check_adapter_name`;
* every write goes to a temporary directory beside the target which then
  replaces the target in one rename (``renameat2(RENAME_EXCHANGE)`` where the
  OS has it), so an interrupted save never leaves a half-written checkpoint
  where a good one was;
* configs with fields functuner does not know are refused (naming the file and
  field), except PEFT/SWIFT bookkeeping fields at their neutral values.

Tensors in memory always use functuner's names (adapter name inside, relative
to the original model); all renaming goes through :mod:`functuner.keys`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.naming import check_adapter_name
from ..core.targets import match_name
from ..errors import AdapterNameError, CheckpointError, ConfigError, TargetError, UnsafeCheckpointError
from ..tuners import tuner_for
from . import keys

__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "EXTRA_STATE_DIR",
    "SAFETENSORS_NAME",
    "AdapterCheckpoint",
    "atomic_dir",
    "check_finite",
    "check_lora_ranks",
    "config_from_json",
    "config_to_json",
    "is_peft_native_type",
    "peft_config_json",
    "peft_native_adapters",
    "read_adapter",
    "read_adapter_config",
    "read_adapter_dir",
    "read_extra_states",
    "read_tensors",
    "write_adapter_config",
    "write_configuration_json",
    "write_extra_states",
    "write_peft_adapter",
    "write_peft_checkpoint",
    "write_swift_adapter",
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
# SWIFT-only LoRA fields that do not change the weights or the forward (training hyper-parameters):
# dropped when writing PEFT's format.  Any other SWIFT-only field at a non-default value is refused.
_SWIFT_ONLY_LORA_TRAINING_FIELDS = ("lorap_lr_ratio", "lorap_emb_lr")
_SWIFT_ONLY_LORA_FIELDS = ("lora_dtype", "use_qa_lora", "use_merged_linear", "enable_lora")


@dataclass(frozen=True)
class AdapterCheckpoint:
    """One adapter read from disk.

    ``state`` uses functuner's names for adapter ``name`` (CPU tensors as
    stored); ``format`` is ``"swift"`` or ``"peft"``; ``path`` the folder read;
    ``base_weights`` the full original weights PEFT saves beside embedding
    adapters (``save_embedding_layers``), under the model's own names.
    """

    name: str
    config: Any
    state: dict[str, torch.Tensor]
    format: str
    path: str
    base_weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------
def config_to_json(config: Any) -> dict[str, Any]:
    """The ``adapter_config.json`` content SWIFT writes for ``config`` (fields plus ``swift_type``)."""
    data = config.to_dict()
    data["swift_type"] = tuner_for(config).swift_type
    return cast(dict[str, Any], data)


def config_from_json(data: Mapping[str, Any], source: str = "adapter_config.json") -> Any:
    """Build a functuner config from an ``adapter_config.json`` dict (SWIFT's or PEFT's).

    Raises :class:`CheckpointError` naming ``source`` and the field when the
    tuner type is unknown or a field has no functuner counterpart.
    """
    kind = data.get("swift_type") or data.get("peft_type")
    if not kind:
        raise CheckpointError(f"{source}: has neither 'swift_type' nor 'peft_type'")
    if "swift_type" not in data and is_peft_native_type(kind):
        raise CheckpointError(
            f"{source}: a PEFT {kind} adapter; functuner implements only LoRA of PEFT's types."
            " Load it with Swift.from_pretrained, which passes it to peft.PeftModel.from_pretrained"
        )
    try:
        tuner = tuner_for(str(kind))
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    names = {f.name for f in dataclasses.fields(tuner.config_cls)}
    kept: dict[str, Any] = {}
    for key, value in data.items():
        if key in names:
            kept[key] = value
        elif key == "swift_type":
            continue
        elif key in _NEUTRAL_FIELDS:
            neutral = _NEUTRAL_FIELDS[key]
            if neutral is not _ANY and value != neutral and value not in (None, {}, [], False):
                raise CheckpointError(f"{source}: field {key}={value!r} is not supported by functuner")
        else:
            raise CheckpointError(f"{source}: field {key!r} is unknown to functuner's {tuner.config_cls.__name__}")
    try:
        return tuner.config_cls.from_dict(kept)  # type: ignore[attr-defined]
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError, RecursionError) as e:
        # ConfigError names the field; a raw error means a value of a JSON type the field cannot take
        raise CheckpointError(f"{source}: {e if isinstance(e, ConfigError) else f'{type(e).__name__}: {e}'}") from None


def peft_config_json(config: Any) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for a LoRA config; :class:`CheckpointError` if PEFT cannot express it.

    SWIFT-only fields that change the model (``lora_dtype`` set...) are refused
    rather than dropped; LoRA+ learning-rate fields (training only) are dropped.
    """
    if tuner_for(config).swift_type != "LORA":
        raise CheckpointError(f"only LoRA adapters have a PEFT format; this one is {tuner_for(config).swift_type}")
    data = config.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    for name in _SWIFT_ONLY_LORA_FIELDS:
        if data.get(name) != defaults.get(name):
            raise CheckpointError(f"LoRA field {name}={data[name]!r} has no PEFT counterpart; cannot write PEFT format")
    for name in _SWIFT_ONLY_LORA_FIELDS + _SWIFT_ONLY_LORA_TRAINING_FIELDS + ("swift_type",):
        data.pop(name, None)
    data["peft_type"] = "LORA"
    return cast(dict[str, Any], data)


def _read_json(path: Path, root: Path) -> dict[str, Any]:
    _check_inside(path, root)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
def _check_inside(path: Path, root: Path) -> None:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise CheckpointError(f"{path} resolves to {real}, outside the checkpoint directory {real_root}")


def read_tensors(
    folder: str | os.PathLike[str], *, weights_only: bool = False, root: str | os.PathLike[str] | None = None
) -> dict[str, torch.Tensor] | None:
    """The tensors of ``folder/adapter_model.safetensors`` on CPU, or ``None`` when there is no weights file.

    A pickled ``adapter_model.bin`` raises :class:`UnsafeCheckpointError` unless
    ``weights_only=True`` (torch's restricted loader, which executes no code).
    """
    folder, root_p = Path(folder), Path(root if root is not None else folder)
    st, binf = folder / SAFETENSORS_NAME, folder / BIN_NAME
    if st.exists():
        _check_inside(st, root_p)
        try:
            return load_file(str(st), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{st}: not a readable safetensors file ({e})") from None
    if binf.exists():
        _check_inside(binf, root_p)
        if not weights_only:
            raise UnsafeCheckpointError(
                f"{binf} is a pickle file; functuner does not unpickle checkpoints. Convert it to safetensors,"
                " or pass weights_only=True to load it with torch's restricted loader"
            )
        try:
            data = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
            raise UnsafeCheckpointError(f"{binf}: refused by torch.load(weights_only=True): {e}") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{binf}: expected a dict of tensors")
        return dict(data)
    return None


def _modules_to_save(config: Any) -> set[str]:
    spec = getattr(config, "modules_to_save", None)
    return set(spec) if spec else set()


def read_adapter(
    folder: str | os.PathLike[str],
    adapter_name: str,
    *,
    weights_only: bool = False,
    root: str | os.PathLike[str] | None = None,
) -> AdapterCheckpoint:
    """Read one adapter folder (SWIFT or PEFT layout) as adapter ``adapter_name``.

    SWIFT files keep the adapter name they were saved with inside the keys;
    that name is the folder's name (``saved_name``) and is renamed to
    ``adapter_name`` component-wise (:func:`functuner.keys.rename_adapter`).
    """
    check_adapter_name(adapter_name)
    folder = Path(folder)
    root_p = Path(root) if root is not None else folder
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}")
    data = _read_json(cfg_path, root_p)
    config = config_from_json(data, str(cfg_path))
    fmt = "swift" if "swift_type" in data else "peft"
    raw = read_tensors(folder, weights_only=weights_only, root=root_p)
    raw = raw or {}
    check_finite(raw, str(folder / (SAFETENSORS_NAME if (folder / SAFETENSORS_NAME).exists() else BIN_NAME)))
    base_weights: dict[str, torch.Tensor] = {}
    try:  # config values from a stranger's file may have any JSON type
        if fmt == "peft":
            raw, base_weights = keys.split_peft_base_weights(raw)
            try:
                state = keys.from_peft_state_dict(raw, adapter_name, _saved_module_names(raw, config))
            except CheckpointError as e:
                raise CheckpointError(f"{folder}: {e}") from None
        else:
            saved_name, raw = _own_tensors(raw, adapter_name if folder == root_p else folder.name, folder)
            state = keys.from_swift_state_dict(raw, saved_name, _modules_to_save(config))
            if getattr(config, "swift_type", None) == "part":  # SWIFT saves Part copies at the original keys
                state = keys.part_from_swift_state_dict(state, config.target_modules, saved_name)
            if getattr(config, "swift_type", None) == "LLAMAPRO":  # SWIFT saves new blocks at expanded-list keys
                state = keys.llamapro_from_swift_state_dict(state, config.keys()["module_list"], saved_name)
            if saved_name != adapter_name:
                state = keys.rename_adapter(state, saved_name, adapter_name)
    except (TypeError, AttributeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{cfg_path}: config does not fit its tensors ({type(e).__name__}: {e})") from None
    return AdapterCheckpoint(adapter_name, config, state, fmt, str(folder), base_weights)


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse NaN or infinite values in floating-point ``tensors`` (:class:`CheckpointError` naming ``source`` and the key).

    A diverged run saves NaN/inf adapters; loading one would silently turn
    every output into NaN, so functuner refuses it at the file boundary.
    """
    floats = [t for t in tensors.values() if (t.is_floating_point() or t.is_complex()) and t.numel()]
    # fast path: a sum is finite only if every summand is (NaN/inf propagate; an overflow only sends us to the
    # exact per-tensor check below), so one reduction per tensor and one sync replace a full isfinite pass each
    sums = [(torch.view_as_real(t) if t.is_complex() else t).sum().double() for t in floats]
    if not floats or bool(torch.isfinite(torch.stack(sums)).all()):
        return
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor {key!r} holds {n_bad} NaN/inf value(s); refusing to load it")


def check_lora_ranks(model: torch.nn.Module, config: Any, source: str) -> None:
    """Refuse a LoRA config whose rank exceeds both dimensions of a targeted layer (:class:`CheckpointError`).

    Checked before any tensor is allocated, so a config from a stranger with
    ``r=10**9`` fails at once instead of exhausting memory.  (A rank between the
    two dimensions is wasteful but valid, as in PEFT, and is accepted.)
    """
    if tuner_for(config).swift_type != "LORA":
        return
    from ..core.targets import select_modules
    from ..tuners.lora.tuner import _in_out, _kind

    try:
        selected = select_modules(
            model,
            config.target_modules,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
        )
    except TargetError as e:
        raise TargetError(f"{source}: {e}") from None
    for name, module in selected:
        if config.modules_to_save and match_name(name, config.modules_to_save):
            continue
        r = config.rank_for(name)
        fan_in, fan_out = _in_out(module, _kind(module, name))
        if r > max(fan_in, fan_out):
            raise CheckpointError(
                f"{source}: field r={r} is larger than layer {name!r} ({fan_in} in, {fan_out} out);"
                " the checkpoint is corrupt or not for this model"
            )


def _saved_module_names(raw: Mapping[str, torch.Tensor], config: Any) -> set[str]:
    """Full module paths (PEFT layout, prefix removed) that ``config.modules_to_save`` names."""
    spec = getattr(config, "modules_to_save", None)
    if not spec:
        return set()
    out = set()
    for key in raw:
        parts = key[len(keys.PEFT_PREFIX) :].split(".")
        for end in range(1, len(parts)):
            path = ".".join(parts[:end])
            if match_name(path, spec):
                out.add(path)
                break
    return out


_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _adapter_component(key: str) -> str | None:
    """The adapter name inside a SWIFT LoRA key (``...lora_A.<name>.weight``), or ``None``."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _LORA_PARTS:
            return parts[i + 1]
    return None


def _own_tensors(raw: Mapping[str, torch.Tensor], expected: str, source: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The adapter name the SWIFT file was saved under, and only that adapter's tensors.

    SWIFT 4.6 selects an adapter's tensors by substring (``'.' + name in key``),
    so an adapter named ``lora`` also saves every other adapter's LoRA tensors
    (``.lora_A`` contains ``.lora``).  Tensors of other adapters are dropped
    here; the folder's adapter is ``expected`` (its folder name) when present.
    """
    found = {c for k in raw if (c := _adapter_component(k)) is not None}
    if not found:
        return expected, dict(raw)
    if expected in found:
        name = expected
    elif len(found) == 1:
        name = next(iter(found))
    else:
        raise CheckpointError(f"{source}: holds tensors of adapters {sorted(found)}; none is named {expected!r}")
    return name, {k: v for k, v in raw.items() if _adapter_component(k) in (None, name)}


def read_adapter_dir(
    path: str | os.PathLike[str],
    adapter_names: Sequence[str] | Mapping[str, str] | str | None = None,
    *,
    weights_only: bool = False,
) -> dict[str, AdapterCheckpoint]:
    """Every adapter in a checkpoint directory, ``{adapter name: AdapterCheckpoint}``.

    ``adapter_names``: ``None`` (all), a name, a list of names, or a dict
    ``{name on disk: name to load as}``.  A root-level ``adapter_config.json``
    is the adapter ``default`` (PEFT's layout, or a single SWIFT adapter);
    sub-folders holding an ``adapter_config.json`` are adapters named after the
    folder.  Nothing is modified.  Raises :class:`CheckpointError` for a
    missing directory or a requested adapter that is not there.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    found = _list_adapters(root)
    wanted = _wanted(root, found, adapter_names)
    out: dict[str, AdapterCheckpoint] = {}
    for disk_name, new_name in wanted.items():
        check_adapter_name(new_name)
        out[new_name] = read_adapter(found[disk_name], new_name, weights_only=weights_only, root=root)
    return out


def _wanted(
    root: Path, found: Mapping[str, Path], adapter_names: Sequence[str] | Mapping[str, str] | str | None
) -> dict[str, str]:
    """``{name on disk: name to load as}`` for ``adapter_names`` (see :func:`read_adapter_dir`); all must exist."""
    if adapter_names is None:
        wanted = {n: n for n in found}
    elif isinstance(adapter_names, str):
        wanted = {adapter_names: adapter_names}
    elif isinstance(adapter_names, Mapping):
        wanted = dict(adapter_names)
    else:
        wanted = {n: n for n in adapter_names}
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise CheckpointError(f"{root}: no adapter(s) {missing}; found {sorted(found)}")
    return wanted


def is_peft_native_type(peft_type: Any) -> bool:
    """Whether ``peft_type`` (an ``adapter_config.json`` value) names one of PEFT's tuners other than LoRA.

    Those are loaded by ``peft`` itself (:mod:`functuner._peft_passthrough`), never read as functuner configs.
    """
    if not isinstance(peft_type, str) or peft_type.upper() == "LORA":
        return False
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return peft_type in {t.value for t in peft.PeftType}


def peft_native_adapters(
    path: str | os.PathLike[str],
    adapter_names: Sequence[str] | Mapping[str, str] | str | None = None,
    *,
    lora_too: bool = False,
) -> tuple[dict[str, Path], dict[str, str]] | None:
    """The adapters of a checkpoint directory that only ``peft`` can load, or ``None`` when functuner reads it.

    Returns ``({name on disk: folder}, {name on disk: name to load as})`` when
    every selected adapter is PEFT-format (no ``swift_type``) of one PEFT type
    other than LoRA (IA3, LOHA, PROMPT_TUNING...); with ``lora_too`` PEFT-format
    LoRA counts as well (for loading into an existing ``PeftModel``).  A
    directory mixing such adapters with functuner's, or with another PEFT type,
    raises :class:`CheckpointError` (neither library can hold the mix).  Reads
    only the JSON configs; changes nothing.
    """
    root = Path(path)
    if not root.is_dir():
        return None
    found = _list_adapters(root)
    wanted = _wanted(root, found, adapter_names)
    kinds: dict[str, str] = {}
    for disk_name in wanted:
        data = _read_json(found[disk_name] / CONFIG_NAME, root)
        kind = data.get("peft_type")
        if "swift_type" not in data and (is_peft_native_type(kind) or (lora_too and kind == "LORA")):
            kinds[disk_name] = str(kind)
    if not kinds:
        return None
    others = sorted(set(wanted) - set(kinds))
    if others or len(set(kinds.values())) > 1:
        raise CheckpointError(
            f"{root}: mixes PEFT adapters {kinds} with {others or 'each other'}; PEFT holds one"
            " PEFT type per model and functuner does not implement these: load them separately"
        )
    return {n: found[n] for n in wanted}, wanted


def _list_adapters(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if (root / CONFIG_NAME).is_file():
        found["default"] = root
    for entry in sorted(os.listdir(root)):
        sub = root / entry
        if entry == EXTRA_STATE_DIR or entry.startswith(".") or not (sub / CONFIG_NAME).is_file():
            continue
        try:
            check_adapter_name(entry)
        except AdapterNameError as e:
            raise CheckpointError(f"{sub}: folder name is not a valid adapter name ({e})") from None
        if entry in found:
            raise CheckpointError(f"{root}: adapter 'default' is both at the root and in {sub}")
        _check_inside(sub, root)
        found[entry] = sub
    return found


def read_extra_states(
    path: str | os.PathLike[str], *, weights_only: bool = False
) -> tuple[list[str] | None, dict[str, torch.Tensor] | None]:
    """``(extra_state_keys, tensors)`` from ``<path>/extra_states/`` (``None`` where absent)."""
    root = Path(path)
    folder = root / EXTRA_STATE_DIR
    if not folder.is_dir():
        return None, None
    patterns = None
    if (folder / CONFIG_NAME).is_file():
        patterns = _read_json(folder / CONFIG_NAME, root).get("extra_state_keys")
    return patterns, read_tensors(folder, weights_only=weights_only, root=root)


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); ``False`` where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return bool(fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` at ``dst`` (no data copied); copy where the file system cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike[str], *, start_from_existing: bool = False, link_existing: bool = False
) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then put it at ``target`` in one step.

    Yields the temporary directory (a copy of ``target`` when
    ``start_from_existing``; with ``link_existing`` the copy hard-links the
    files instead, so the caller must only *replace* files there, never write
    into them).  On normal exit it replaces ``target`` atomically
    (the old content is removed afterwards); on an exception the temporary
    directory is deleted and ``target`` is untouched.  A symlinked ``target``
    is refused.
    """
    target = Path(target)
    if target.is_symlink():
        raise CheckpointError(f"{target} is a symlink; refusing to write through it")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if start_from_existing and target.is_dir():
            shutil.rmtree(tmp)
            shutil.copytree(target, tmp, symlinks=True, copy_function=_link_or_copy if link_existing else shutil.copy2)
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            if not _exchange(tmp, target):
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
                os.replace(target, old)
                os.replace(tmp, target)
                tmp = old
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous content
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_tensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write tensors as safetensors (contiguous CPU copies, so views and shared storage are fine)."""
    ready = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(ready, str(path), metadata={"format": "pt"})


def _write_json(data: Mapping[str, Any], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True))


def write_swift_adapter(
    save_directory: str | os.PathLike[str], adapter_name: str, config: Any, state: Mapping[str, torch.Tensor]
) -> Path:
    """Write one adapter in SWIFT's layout at ``save_directory/adapter_name/`` (atomically); returns that path.

    ``state`` uses functuner's names; keys are converted to SWIFT's on-disk names.
    """
    check_adapter_name(adapter_name)
    disk = keys.to_swift_state_dict(state, adapter_name)
    target = Path(save_directory) / adapter_name
    with atomic_dir(target) as tmp:
        _write_json(config_to_json(config), tmp / CONFIG_NAME)
        if disk:
            _save_tensors(disk, tmp / SAFETENSORS_NAME)
    return target


def _write_peft_files(folder: Path, adapter_name: str, config: Any, state: Mapping[str, torch.Tensor]) -> None:
    data = peft_config_json(config)
    disk = keys.to_peft_state_dict(state, adapter_name)
    _write_json(data, folder / CONFIG_NAME)
    _save_tensors(disk, folder / SAFETENSORS_NAME)


def write_peft_adapter(
    folder: str | os.PathLike[str], adapter_name: str, config: Any, state: Mapping[str, torch.Tensor]
) -> Path:
    """Write one LoRA adapter in PEFT's layout into ``folder`` (atomically replacing it); returns ``folder``."""
    check_adapter_name(adapter_name)
    peft_config_json(config)  # refuse before touching the disk
    with atomic_dir(folder) as tmp:
        _write_peft_files(tmp, adapter_name, config, state)
    return Path(folder)


def write_peft_checkpoint(
    output_dir: str | os.PathLike[str],
    adapters: Mapping[str, AdapterCheckpoint],
    copy_from: str | os.PathLike[str] | None = None,
) -> Path:
    """Write several LoRA adapters in PEFT's layout: ``default`` at the root, others in sub-folders.

    Validates every adapter before writing anything; the whole ``output_dir``
    is replaced atomically (other files already in it, and non-adapter files of
    ``copy_from`` such as ``configuration.json``, are kept).
    """
    for ck in adapters.values():
        try:
            peft_config_json(ck.config)
            keys.to_peft_state_dict(ck.state, ck.name)
        except CheckpointError as e:
            raise CheckpointError(f"adapter {ck.name!r} ({ck.path}): {e}") from None
    out = Path(output_dir)
    with atomic_dir(out, start_from_existing=True) as tmp:
        if copy_from is not None:
            src = Path(copy_from)
            for entry in os.listdir(src):
                p = src / entry
                if (
                    entry.startswith(".")
                    or p.is_symlink()
                    or p.is_dir()
                    or entry in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME)
                ):
                    continue
                shutil.copy2(p, tmp / entry)
        for name, ck in adapters.items():
            folder = tmp if name == "default" else tmp / name
            if folder != tmp:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
            else:
                for stale in (BIN_NAME,):
                    (tmp / stale).unlink(missing_ok=True)
            _write_peft_files(folder, name, ck.config, ck.state)
        if "default" in adapters:
            shutil.rmtree(tmp / "default", ignore_errors=True)
    return out


def write_extra_states(
    save_directory: str | os.PathLike[str], patterns: Sequence[str], state: Mapping[str, torch.Tensor]
) -> Path:
    """Write ``extra_states/`` (SWIFT's layout: safetensors plus ``{"extra_state_keys": [...]}``) atomically."""
    target = Path(save_directory) / EXTRA_STATE_DIR
    with atomic_dir(target) as tmp:
        _save_tensors(state, tmp / SAFETENSORS_NAME)
        _write_json({"extra_state_keys": list(patterns)}, tmp / CONFIG_NAME)
    return target


def write_configuration_json(save_directory: str | os.PathLike[str]) -> None:
    """SWIFT's ``configuration.json`` (``{}``) if it is missing (written via a temp file and rename)."""
    path = Path(save_directory) / "configuration.json"
    if path.exists():
        return
    fd, tmp = tempfile.mkstemp(prefix=".configuration.json.", dir=save_directory)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("{}")
    os.replace(tmp, path)


def write_adapter_config(save_directory: str | os.PathLike[str], config: Any, **extra: Any) -> Path:
    """Write ``adapter_config.json`` for ``config`` into ``save_directory`` (temp file + rename); returns its path."""
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; expected a directory")
    folder.mkdir(parents=True, exist_ok=True)
    data = config_to_json(config)
    data.update(extra)
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, folder / CONFIG_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return folder / CONFIG_NAME


def read_adapter_config(path: str | os.PathLike[str], revision: str | None = None, **hub_kwargs: Any) -> Any:
    """The config in ``path/adapter_config.json`` (``path`` a directory or a ModelScope hub id)."""
    from ..core.hub import resolve_model_dir

    folder = Path(resolve_model_dir(path, revision, **hub_kwargs))
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}")
    return config_from_json(_read_json(cfg, folder), str(cfg))


def save(params: Any, directory: str | os.PathLike[str]) -> Path:
    """Write ``params`` (a :class:`~functuner.TunerParams`) in SWIFT's layout at ``directory/<adapter name>/``."""
    return write_swift_adapter(directory, params.adapter_name, params.config, dict(params))


def load(directory: str | os.PathLike[str], model: torch.nn.Module | None = None, adapter_name: str = "default") -> Any:
    """Read one adapter folder (SWIFT or PEFT layout) as :class:`~functuner.TunerParams` (validated on ``model``)."""
    from ..core.params import TunerParams

    ck = read_adapter(directory, adapter_name)
    params = TunerParams(ck.state, ck.config, adapter_name)
    if model is not None:
        from ..functional import validate

        validate(model, params)
    return params
