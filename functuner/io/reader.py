"""Reading adapter directories (SWIFT's and PEFT's layouts), with every safety check at the file boundary.

* ``adapter_model.bin`` files (what PEFT and SWIFT write with
  ``safe_serialization=False``) are read only with torch's restricted,
  non-executing ``torch.load(weights_only=True)`` loader, as PEFT reads them;
  never full pickle.  A payload that loader refuses, or anything but a plain
  dict of tensors, is refused with :class:`~functuner.errors.UnsafeCheckpointError`
  (a :class:`~functuner.errors.CheckpointError`) naming the file;
* every file read must resolve (symlinks followed) inside the checkpoint
  directory; adapter names must pass :func:`functuner.core.naming.check_adapter_name`;
* NaN/inf tensors are refused; the tuner's ``check_state`` hook checks the
  tensors against their own config, and ``check_model`` (:func:`check_model`)
  a config against a model before anything is allocated.

Tensors come back under functuner's names (adapter name inside), renamed by
:func:`functuner.io.keys.from_disk`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..core.fs import check_inside, read_json
from ..core.naming import check_adapter_name
from ..core.patterns import check_patterns
from ..errors import AdapterNameError, CheckpointError, ConfigError
from ..tuners import REGISTRY, tuner_for
from ..tuners.config_json import (
    BIN_NAME,
    CONFIG_NAME,
    EXTRA_STATE_DIR,
    SAFETENSORS_NAME,
    config_from_json,
    is_peft_native_type,
)
from . import keys, tuner_files
from .merge_shards import read_header

__all__ = [
    "AdapterCheckpoint",
    "check_extra_states",
    "check_finite",
    "check_model",
    "is_functuner_peft_type",
    "list_adapters",
    "peft_native_adapters",
    "peft_type_of",
    "read_adapter",
    "read_adapter_dir",
    "read_extra_states",
    "read_tensors",
]


@dataclass(frozen=True)
class AdapterCheckpoint:
    """One adapter read from disk.

    ``state`` uses functuner's names for adapter ``name`` (CPU tensors as
    stored); ``format`` is ``"swift"`` or ``"peft"``; ``path`` the folder read;
    ``base_weights`` the full original weights PEFT saves beside embedding
    adapters (``save_embedding_layers``), under the model's own names;
    ``weights`` the weights file read (``None`` for a config-only adapter such
    as NEFTune).
    """

    name: str
    config: Any
    state: dict[str, torch.Tensor]
    format: str
    path: str
    base_weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    weights: str | None = None


def _weights_path(folder: Path) -> Path | None:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (folder / name).exists() or (folder / name).is_symlink():
            return folder / name
    return None


def read_tensors(
    folder: str | os.PathLike[str], *, weights_only: bool = False, root: str | os.PathLike[str] | None = None
) -> dict[str, torch.Tensor] | None:
    """The tensors of ``folder/adapter_model.safetensors`` (else ``adapter_model.bin``) on CPU, or ``None``.

    ``adapter_model.bin`` is read with torch's restricted loader
    (``torch.load(..., weights_only=True)``, which executes no code) and must
    be a plain dict of tensors; anything else raises :class:`UnsafeCheckpointError`
    naming the file.  ``weights_only`` is accepted for compatibility (it used
    to be the opt-in); full unpickling is never done, whatever it says.
    """
    from ..errors import UnsafeCheckpointError

    folder, root_p = Path(folder), Path(root if root is not None else folder)
    st, binf = folder / SAFETENSORS_NAME, folder / BIN_NAME
    if st.exists() or st.is_symlink():
        check_inside(st, root_p)
        read_header(st)  # header sanity first: the culprit tensor and field named, as every reader of the file does
        try:
            return load_file(str(st), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{st}: not a readable safetensors file ({e})") from None
    if binf.exists() or binf.is_symlink():
        check_inside(binf, root_p)
        del weights_only  # always the restricted loader: there is no full-pickle path to opt into
        try:
            data = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
            raise UnsafeCheckpointError(
                f"{binf}: refused by torch's restricted loader (torch.load(weights_only=True)); functuner never"
                f" unpickles arbitrary objects. Re-save it with safetensors. ({type(e).__name__}: {e})"
            ) from None
        if (
            type(data) is not dict  # noqa: E721 - exactly a plain dict, as PEFT and SWIFT save
            or not all(isinstance(k, str) for k in data)
            or not all(type(v) is torch.Tensor or type(v) is torch.nn.Parameter for v in data.values())
        ):
            raise UnsafeCheckpointError(
                f"{binf}: expected a plain dict of tensors (what torch.save(state_dict) writes), got"
                f" {type(data).__name__}"
            )
        return dict(data)
    return None


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


def check_model(model: torch.nn.Module, config: Any, source: str) -> None:
    """The tuner's check of ``config`` (read from ``source``) against ``model``, before any tensor is allocated.

    LoRA refuses a rank larger than both dimensions of a targeted layer, so a
    config from a stranger with ``r=10**9`` fails at once instead of exhausting memory.
    """
    tuner_for(config).check_model(model, config, source)


def _own_tensors(raw: Mapping[str, torch.Tensor], expected: str, source: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The adapter name the SWIFT file was saved under, and only that adapter's tensors.

    SWIFT 4.6 selects an adapter's tensors by substring (``'.' + name in key``),
    so an adapter named ``lora`` also saves every other adapter's LoRA tensors
    (``.lora_A`` contains ``.lora``).  Tensors of other adapters are dropped
    here; the folder's adapter is ``expected`` (its folder name) when present.
    """
    after = keys.adapter_name_markers()
    owner = {k: keys.adapter_in_key(k, after) for k in raw}
    found = {c for c in owner.values() if c is not None}
    if not found:
        return expected, dict(raw)
    if expected in found:
        name = expected
    elif len(found) == 1:
        name = next(iter(found))
    else:
        raise CheckpointError(f"{source}: holds tensors of adapters {sorted(found)}; none is named {expected!r}")
    return name, {k: v for k, v in raw.items() if owner[k] in (None, name)}


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
    ``adapter_name`` component-wise (:func:`functuner.io.keys.rename_adapter`).
    A folder with a config and no weights file is an adapter without tensors
    (NEFTune's, for one); the tuner's checks decide whether that fits.
    """
    check_adapter_name(adapter_name)
    folder = Path(folder)
    root_p = Path(root) if root is not None else folder
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}")
    data = read_json(cfg_path, root_p)
    config = config_from_json(data, str(cfg_path))
    fmt = "swift" if "swift_type" in data else "peft"
    weights = _weights_path(folder)
    raw = read_tensors(folder, weights_only=weights_only, root=root_p)
    if raw is None:  # another library's files the tuner reads (ms-swift's ReFT: pyreft's), restricted loader only
        raw = tuner_files.read_tuner_files(folder, config, adapter_name if folder == root_p else folder.name, root_p)
    raw = raw or {}
    check_finite(raw, str(weights or folder))
    base_weights: dict[str, torch.Tensor] = {}
    try:  # config values from a stranger's file may have any JSON type
        if fmt == "peft":
            raw, base_weights = keys.split_peft_base_weights(raw)
            try:
                state = keys.from_disk(raw, config, adapter_name, "peft")
            except CheckpointError as e:
                raise CheckpointError(f"{folder}: {e}") from None
        else:
            saved_name, raw = _own_tensors(raw, adapter_name if folder == root_p else folder.name, folder)
            try:
                state = keys.from_disk(raw, config, saved_name, "swift")
            except CheckpointError as e:
                raise CheckpointError(f"{weights or folder}: {e}") from None
            tuner_for(config).check_state(config, state, str(cfg_path))  # keys named as the file has them
            if saved_name != adapter_name:
                state = keys.rename_adapter(state, saved_name, adapter_name)
        if fmt == "peft":
            tuner_for(config).check_state(config, state, str(cfg_path))
    except (TypeError, AttributeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{cfg_path}: config does not fit its tensors ({type(e).__name__}: {e})") from None
    return AdapterCheckpoint(
        adapter_name, config, state, fmt, str(folder), base_weights, str(weights) if weights else None
    )


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
    found = list_adapters(root)
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
    seen: dict[str, str] = {}
    for disk_name, new_name in wanted.items():
        check_adapter_name(new_name)
        if new_name in seen:
            raise AdapterNameError(
                f"{root}: adapter_name maps both {seen[new_name]!r} and {disk_name!r} to {new_name!r};"
                " each adapter needs its own name"
            )
        seen[new_name] = disk_name
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise CheckpointError(f"{root}: no adapter(s) {missing}; found {sorted(found)}")
    return wanted


def peft_native_adapters(
    path: str | os.PathLike[str],
    adapter_names: Sequence[str] | Mapping[str, str] | str | None = None,
    *,
    lora_too: bool = False,
) -> tuple[dict[str, Path], dict[str, str]] | None:
    """The adapters of a checkpoint directory that only ``peft`` can load, or ``None`` when functuner reads it.

    Returns ``({name on disk: folder}, {name on disk: name to load as})`` when
    every selected adapter is PEFT-format (no ``swift_type``) of one PEFT type
    functuner does not implement (IA3, LOHA, PROMPT_TUNING...); with
    ``lora_too`` PEFT-format adapters of the types functuner implements count
    as well (for loading into an existing ``PeftModel``).  A directory mixing
    such adapters with functuner's, or with another PEFT type, raises
    :class:`CheckpointError` (neither library can hold the mix).  Reads only
    the JSON configs; changes nothing.
    """
    root = Path(path)
    if not root.is_dir():
        return None
    found = list_adapters(root)
    wanted = _wanted(root, found, adapter_names)
    kinds: dict[str, str] = {}
    for disk_name in wanted:
        data = read_json(found[disk_name] / CONFIG_NAME, root)
        kind = data.get("peft_type")
        if "swift_type" not in data and (is_peft_native_type(kind) or (lora_too and kind in _implemented())):
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


def _implemented() -> set[str]:
    """PEFT types functuner reads itself (tuners with a ``peft`` hook)."""
    return {t.peft.peft_type for t in REGISTRY.values() if t.peft is not None}


def is_functuner_peft_type(peft_type: str | None) -> bool:
    """Whether functuner's reader understands PEFT-format adapters of ``peft_type`` (a tuner has that ``peft`` hook)."""
    return peft_type in _implemented()


def peft_type_of(path: str | os.PathLike[str], disk_name: str) -> str | None:
    """The ``peft_type`` of adapter ``disk_name`` in checkpoint directory ``path`` (``None`` for a SWIFT adapter)."""
    root = Path(path)
    found = list_adapters(root)
    if disk_name not in found:
        raise CheckpointError(f"{root}: no adapter {disk_name!r}; found {sorted(found)}")
    data = read_json(found[disk_name] / CONFIG_NAME, root)
    kind = data.get("peft_type")
    return None if "swift_type" in data or not isinstance(kind, str) else kind


def list_adapters(root: str | os.PathLike[str]) -> dict[str, Path]:
    """``{adapter name: folder}`` of a checkpoint directory (root ``adapter_config.json`` = ``default``)."""
    root = Path(root)
    found: dict[str, Path] = {}
    if (root / CONFIG_NAME).is_file():
        found["default"] = root
    try:
        entries = sorted(os.listdir(root))
    except OSError as e:
        raise CheckpointError(f"{root}: cannot list directory ({e.strerror})") from None
    for entry in entries:
        sub = root / entry
        if entry == EXTRA_STATE_DIR or entry.startswith(".") or not (sub / CONFIG_NAME).is_file():
            continue
        try:
            check_adapter_name(entry)
        except AdapterNameError as e:
            raise CheckpointError(f"{sub}: folder name is not a valid adapter name ({e})") from None
        if entry in found:
            raise CheckpointError(f"{root}: adapter 'default' is both at the root and in {sub}")
        check_inside(sub, root)
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
    cfg = folder / CONFIG_NAME
    if cfg.is_file():
        patterns = read_json(cfg, root).get("extra_state_keys")
        if patterns is not None and not isinstance(patterns, list):
            raise CheckpointError(f"{cfg}: field 'extra_state_keys' is {patterns!r}; expected a list of regexes")
        try:
            check_patterns(patterns, "extra_state_keys", list_is_regex=True)
        except ConfigError as e:
            raise CheckpointError(f"{cfg}: {e}") from None
    tensors = read_tensors(folder, weights_only=weights_only, root=root)
    if tensors is not None:  # the same rules as adapter weights: finite values
        check_finite(tensors, str(_weights_path(folder) or folder))
    return patterns, tensors


def check_extra_states(extra: Mapping[str, torch.Tensor], own_state: Mapping[str, torch.Tensor], source: str) -> None:
    """Extra states (saved copies of the model's own tensors) must fit the model: key, shape and dtype kind.

    A floating-point tensor of the model takes only a floating-point value
    (an int32 copy would be cast silently); :class:`CheckpointError` naming
    ``source`` and the key otherwise.
    """
    for k in sorted(extra):
        v = extra[k]
        if k not in own_state:
            raise CheckpointError(f"{source}: key {k!r} is not a tensor of the model")
        own = own_state[k]
        if tuple(own.shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: key {k!r} has shape {list(v.shape)}; the model's tensor has {list(own.shape)}"
            )
        if own.is_floating_point() != v.is_floating_point() or own.is_complex() != v.is_complex():
            raise CheckpointError(
                f"{source}: key {k!r} has dtype {str(v.dtype).replace('torch.', '')}; the model's tensor is"
                f" {str(own.dtype).replace('torch.', '')} (expected a tensor of that kind)"
            )
