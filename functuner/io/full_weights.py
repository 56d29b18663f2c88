"""Full-weight checkpoints (GaLore, Q-GaLore, LISA): the changed weights as (sharded) safetensors plus a config.

GaLore and LISA train a model's own weights instead of adding adapter tensors, so their checkpoint is
the weights that changed, under the model's ``named_parameters`` names, in transformers' layout:

```text
<dir>/full_weights_config.json        {"format": "functuner.full_weights", "format_version": 1,
                                       "method": "galore" | "lisa" | ..., "method_config": {...},
                                       "num_tensors": N, "total_size": bytes}
<dir>/model.safetensors               one file, or shards
<dir>/model-00001-of-0000K.safetensors + model.safetensors.index.json  ({"metadata": {"total_size": ...},
                                                                         "weight_map": {key: shard}})
```

:func:`write_full_weights` builds the directory with :func:`functuner.core.fs.atomic_dir` (a failure or
a kill leaves the previous directory or nothing).  :func:`read_full_weights` checks everything at the
file boundary, raising :class:`~functuner.errors.CheckpointError` naming the file and key: only known
config keys, the format and version, shard names and containment, every mapped key in its shard and
nothing else, the tensor count and size, finite values (:func:`functuner.io.reader.check_finite`).
:func:`check_fits` checks the keys and shapes against a model's weights before anything changes;
:func:`replace_weights` is the functional load (``merge`` = replace) and :func:`load_into_module` the
in-place one.  The method's config stays a JSON object here; :mod:`functuner.optim.checkpoint` turns it
into a ``GaLoreConfig`` / ``LISAConfig``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.fs import atomic_dir, check_inside, read_json, write_json
from ..errors import CheckpointError
from .reader import check_finite

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FullWeightsCheckpoint",
    "check_fits",
    "is_full_weights_dir",
    "load_into_module",
    "parse_size",
    "read_full_weights",
    "replace_weights",
    "write_full_weights",
]

CONFIG_NAME = "full_weights_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
FORMAT = "functuner.full_weights"
FORMAT_VERSION = 1
_CONFIG_KEYS = {"format", "format_version", "method", "method_config", "num_tensors", "total_size"}
_SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class FullWeightsCheckpoint:
    """A full-weight checkpoint read and checked: ``tensors`` (CPU, model names) and the method's config."""

    path: str
    method: str
    method_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    files: tuple[str, ...]

    @property
    def total_size(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def parse_size(size: int | str) -> int:
    """Bytes for ``5_000_000``, ``"5GB"``, ``"500MiB"`` (transformers' ``max_shard_size`` spellings)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMG]I?B|B)?\s*", str(size).upper())
        if m is None:
            raise CheckpointError(f"max_shard_size={size!r}: use bytes (an int) or a string such as '5GB' or '500MiB'")
        value = int(m.group(1)) * _UNITS[m.group(2) or ""]
    if value < 1:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return value


def is_full_weights_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding a full-weight checkpoint config (nothing else is read)."""
    return (Path(path) / CONFIG_NAME).is_file()


def _shards(tensors: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def write_full_weights(
    tensors: Mapping[str, torch.Tensor],
    directory: str | os.PathLike[str],
    *,
    method: str,
    method_config: Mapping[str, Any],
    max_shard_size: int | str = "5GB",
    overwrite: bool = True,
) -> Path:
    """Write ``tensors`` (model names) and the config atomically; shards above ``max_shard_size``.

    Refuses (before writing) no tensors, non-tensors and NaN/inf values.  Tensors are saved as contiguous
    CPU copies (tied weights are saved once per key).  Returns the directory.
    """
    if not tensors:
        raise CheckpointError(f"{directory}: no weights to save (nothing changed, or an empty selection)")
    bad = sorted(k for k, t in tensors.items() if not isinstance(t, torch.Tensor))
    if bad:
        raise CheckpointError(f"{directory}: values of {bad[:3]} are not tensors")
    check_finite(tensors, f"{directory} (about to be saved)")
    limit = parse_size(max_shard_size)
    plan = _shards(tensors, limit)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "method_config": dict(method_config),
        "num_tensors": len(tensors),
        "total_size": total,
    }
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        names = (
            [WEIGHTS_NAME]
            if len(plan) == 1
            else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
        )
        for name, keys in zip(names, plan, strict=True):
            save_file({k: tensors[k].detach().to("cpu").contiguous().clone() for k in keys}, str(tmp / name))
        if len(plan) > 1:
            weight_map = {k: name for name, keys in zip(names, plan, strict=True) for k in keys}
            write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, tmp / INDEX_NAME)
        write_json(config, tmp / CONFIG_NAME)
    return Path(directory)


def _load(path: Path, root: Path) -> dict[str, torch.Tensor]:
    check_inside(path, root)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed by the checkpoint but not there)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_config(root: Path) -> dict[str, Any]:
    cfg_path = root / CONFIG_NAME
    data = read_json(cfg_path, root)
    unknown = sorted(set(data) - _CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"{cfg_path}: unknown key {unknown[0]!r} (known: {sorted(_CONFIG_KEYS)})")
    missing = sorted(_CONFIG_KEYS - set(data))
    if missing:
        raise CheckpointError(f"{cfg_path}: missing key {missing[0]!r}")
    if data["format"] != FORMAT:
        raise CheckpointError(f"{cfg_path}: key 'format' is {data['format']!r}, expected {FORMAT!r}")
    if data["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: key 'format_version' is {data['format_version']!r}; this functuner reads version"
            f" {FORMAT_VERSION}"
        )
    if not isinstance(data["method"], str) or not data["method"]:
        raise CheckpointError(f"{cfg_path}: key 'method' must be a non-empty string, got {data['method']!r}")
    if not isinstance(data["method_config"], dict):
        raise CheckpointError(f"{cfg_path}: key 'method_config' must be a JSON object")
    for key in ("num_tensors", "total_size"):
        if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0:
            raise CheckpointError(f"{cfg_path}: key {key!r} must be a non-negative int, got {data[key]!r}")
    return data


def read_full_weights(directory: str | os.PathLike[str]) -> FullWeightsCheckpoint:
    """Read and check a full-weight checkpoint directory (see the module docstring for every check)."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    if not is_full_weights_dir(root):
        raise CheckpointError(f"{root}: no {CONFIG_NAME} (not a full-weight checkpoint)")
    data = _read_config(root)
    index = root / INDEX_NAME
    tensors: dict[str, torch.Tensor] = {}
    if index.is_file() or index.is_symlink():
        idx = read_json(index, root)
        weight_map = idx.get("weight_map")
        unknown = sorted(set(idx) - {"metadata", "weight_map"})
        if unknown:
            raise CheckpointError(f"{index}: unknown key {unknown[0]!r} (known: ['metadata', 'weight_map'])")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: key 'weight_map' must be a non-empty object {{tensor key: shard file}}")
        files = sorted(set(weight_map.values()), key=str)
        for f in files:
            if not isinstance(f, str) or _SHARD.fullmatch(f) is None:
                raise CheckpointError(f"{index}: shard name {f!r} is not model-NNNNN-of-NNNNN.safetensors")
        for f in files:
            shard = _load(root / f, root)
            wanted = {k for k, v in weight_map.items() if v == f}
            extra = sorted(set(shard) - wanted)
            if extra:
                raise CheckpointError(f"{root / f}: holds key {extra[0]!r}, which {INDEX_NAME} does not map to it")
            absent = sorted(wanted - set(shard))
            if absent:
                raise CheckpointError(f"{root / f}: key {absent[0]!r} is mapped to this shard but missing from it")
            check_finite(shard, str(root / f))
            tensors.update(shard)
        files_read = tuple(files)
    else:
        single = root / WEIGHTS_NAME
        tensors = _load(single, root)
        check_finite(tensors, str(single))
        files_read = (WEIGHTS_NAME,)
    cfg_path = root / CONFIG_NAME
    if len(tensors) != data["num_tensors"]:
        raise CheckpointError(
            f"{cfg_path}: key 'num_tensors' says {data['num_tensors']}, the files hold {len(tensors)}"
        )
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size != data["total_size"]:
        raise CheckpointError(f"{cfg_path}: key 'total_size' says {data['total_size']} bytes, the files hold {size}")
    return FullWeightsCheckpoint(str(root), data["method"], data["method_config"], tensors, files_read)


def check_fits(ckpt: FullWeightsCheckpoint, weights: Mapping[str, Any], what: str = "the model") -> None:
    """Every key of ``ckpt`` names a floating-point weight of ``weights`` with the same shape (else CheckpointError).

    ``weights`` maps names to anything with ``shape`` and ``dtype`` (tensors, Q-GaLore's quantized leaves).
    """
    unknown = sorted(k for k in ckpt.tensors if k not in weights)
    if unknown:
        raise CheckpointError(
            f"{ckpt.path}: key {unknown[0]!r} ({len(unknown)} unknown) is not a weight of {what}; was it saved"
            " from another model?"
        )
    for k, t in ckpt.tensors.items():
        want = tuple(weights[k].shape)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{ckpt.path}: key {k!r} has shape {tuple(t.shape)}, {what} has {want}")
        if not t.is_floating_point():
            raise CheckpointError(f"{ckpt.path}: key {k!r} has dtype {t.dtype}; full weights must be floating point")


def replace_weights(weights: Mapping[str, torch.Tensor], ckpt: FullWeightsCheckpoint) -> dict[str, torch.Tensor]:
    """The functional load: a new dict, ``weights`` with the checkpoint's tensors in place (each in the
    dtype and on the device of the weight it replaces).  ``weights`` is not modified."""
    check_fits(ckpt, weights, "the weights")
    out = dict(weights)
    for k, t in ckpt.tensors.items():
        out[k] = t.to(device=weights[k].device, dtype=weights[k].dtype)
    return out


def load_into_module(module: torch.nn.Module, ckpt: FullWeightsCheckpoint) -> tuple[str, ...]:
    """Copy the checkpoint's tensors into ``module``'s parameters/buffers in place, after checking all of them.

    Returns the keys loaded.  Nothing changes when any key or shape does not fit.
    """
    own: dict[str, torch.Tensor] = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    check_fits(ckpt, own, type(module).__name__)
    with torch.no_grad():
        for k, t in ckpt.tensors.items():
            own[k].copy_(t)
    return tuple(ckpt.tensors)
