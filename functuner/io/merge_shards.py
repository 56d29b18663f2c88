"""Merge an adapter into a safetensors base checkpoint, shard by shard, tensor by tensor.

Memory: the adapter's tensors plus one base tensor (and its fp32 merge) at a
time.  Untouched tensors are copied as raw bytes in 16 MiB chunks with plain
reads (no memory map, so pages already written do not stay in this process's
resident set); adapted weights are read, merged in float32 and rounded once to
the output dtype.  Nothing here imports ``peft`` or ``transformers``.  Which
base key each adapter tensor adapts, and the merge formula, come from the
tuner's ``plan_shard_merge`` hook (LoRA's: :mod:`functuner.tuners.lora.streaming`,
built on the same layout and formula as ``functuner.merge``), so a streamed
merge equals ``functuner.merge`` on the same weights, bitwise.

Layouts handled are the ones ``transformers`` writes: ``model.safetensors``,
or shards listed in ``model.safetensors.index.json`` (``{"metadata":
{"total_size": N}, "weight_map": {key: shard file}}``).  The output has the
same shard file names, the same tensor order inside each shard, the same
index (``total_size`` updated if ``dtype`` changes sizes), and a copy of every
other file (config, tokenizer...).  It is written into a temporary sibling
directory and renamed into place, so a failure (a full disk included) leaves
nothing at the destination.

A bitsandbytes 4/8-bit checkpoint is first dequantized, shard by shard, into
a temporary float copy (:func:`functuner.quant.checkpoint.dequantize_bnb_checkpoint`)
which is then merged; any other quantized checkpoint is refused before writing.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch

from ..errors import CheckpointError, ParamsMismatchError, UnsafeCheckpointError
from ..quant.checkpoint import bnb_dequantizable, dequantize_bnb_checkpoint, quantized_checkpoint
from ..tuners import tuner_for

__all__ = ["Header", "MergePlan", "merge_checkpoint", "plan_merge", "read_base", "read_header", "shard_files"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_CHUNK = 16 << 20
_MAX_HEADER = 100 << 20
_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "U16": (None, 2),
    "U32": (None, 4),
    "U64": (None, 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
}
_FLOAT_NAMES = {"F64", "F32", "F16", "BF16"}
_NAME_OF = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class Header:
    """A safetensors file's header: tensors in file order, ``__metadata__``, and the file's path."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header without reading the data.

    Raises :class:`CheckpointError` naming the file for a truncated or corrupt
    file: bad header length, bad JSON, unknown dtype, offsets that overlap,
    leave gaps, disagree with the shape, or run past the end of the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header length {n}, file size {size})"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{path}: header field '__metadata__' is {metadata!r}; expected an object of strings")
    base = 8 + n
    entries: list[tuple[str, TensorInfo]] = []
    for key, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(
                f"{path}: header entry for tensor {key!r} is {info!r}; expected an object with 'dtype', 'shape'"
                " and 'data_offsets'"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(
                f"{path}: tensor {key!r}: field 'dtype' is {dtype!r}; expected one of {sorted(_DTYPES)}"
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(
                f"{path}: tensor {key!r}: field 'shape' is {shape!r}; expected a list of non-negative integers"
            )
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise CheckpointError(
                f"{path}: tensor {key!r}: field 'data_offsets' is {offsets!r}; expected [begin, end], two"
                " non-negative integers"
            )
        shape, (a, b) = tuple(shape), offsets
        entries.append((key, TensorInfo(dtype, shape, base + a, base + b)))
    entries.sort(key=lambda kv: kv[1].start)
    pos = base
    for key, t in entries:
        if t.start != pos:
            raise CheckpointError(
                f"{path}: corrupt safetensors file (tensor {key!r} starts at {t.start - base}, expected {pos - base})"
            )
        pos = t.end
    if pos != size:
        what = "truncated" if pos > size else "corrupt"
        raise CheckpointError(f"{path}: {what} safetensors file (data should end at byte {pos}, file has {size})")
    return Header(path, dict(entries), metadata)


def _is_count(x: Any) -> bool:
    """A JSON value that is a non-negative integer (not a bool, not a float such as ``4.0`` or ``1e400``)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _inside_source(path: Path, base_dir: Path) -> None:
    """Refuse a file of the base checkpoint that resolves (symlinks followed) outside it.

    The one exception is the Hugging Face hub cache's own layout
    (``snapshots/<rev>/<file> -> ../../blobs/<hash>``): links into that
    repository's ``blobs`` folder are followed.
    """
    real = os.path.realpath(path)
    roots = [os.path.realpath(base_dir)]
    if base_dir.parent.name == "snapshots":
        roots.append(os.path.realpath(base_dir.parent.parent / "blobs"))
    if not any(os.path.commonpath([real, r]) == r for r in roots):
        raise CheckpointError(
            f"{path}: resolves to {real}, outside the base checkpoint {base_dir}; refusing to copy it"
        )


def _copy_checked(base_dir: Path) -> Callable[[str, str], object]:
    def copy(src: str, dst: str) -> object:
        _inside_source(Path(src), base_dir)
        return shutil.copy2(src, dst)

    return copy


def shard_files(base_dir: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The safetensors files of a checkpoint in order, and its index JSON (``None`` for a single file)."""
    index_path = base_dir / INDEX
    if index_path.is_file():
        from ..core.fs import read_json

        index = read_json(index_path, base_dir)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f"{index_path}: field 'weight_map' is {weight_map!r}; expected an object {{tensor name: shard file}}"
            )
        if not isinstance(index.get("metadata", {}), (dict, type(None))):
            raise CheckpointError(f"{index_path}: field 'metadata' is {index['metadata']!r}; expected an object")
        names: list[str] = []
        for key, name in weight_map.items():
            if not isinstance(name, str):
                raise CheckpointError(
                    f"{index_path}: weight_map[{key!r}] is {name!r}; expected a shard file name (a string)"
                )
            if name not in names:
                if os.path.basename(name) != name or name in ("", ".", "..") or "\0" in name:
                    raise CheckpointError(
                        f"{index_path}: weight_map[{key!r}] = {name!r} is not a plain file name in the checkpoint"
                    )
                names.append(name)
        return sorted(names), index
    if (base_dir / SINGLE).is_file():
        return [SINGLE], None
    for pickled in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if (base_dir / pickled).is_file():
            raise UnsafeCheckpointError(
                f"{base_dir / pickled}: pickled weights; functuner never unpickles. Convert the base to safetensors first"
            )
    raise CheckpointError(f"{base_dir}: no {SINGLE} or {INDEX} (not a safetensors model checkpoint)")


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """What to do to which base key: replace it with a tensor stored with the adapter, then merge it (the tuner's plan)."""

    merges: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]  # base key -> old tensor -> merged tensor (fp32)
    replacements: dict[str, torch.Tensor]


def plan_merge(
    headers: Mapping[str, TensorInfo],
    tensors: Mapping[str, torch.Tensor],
    config: Any,
    adapter_name: str,
    fan_in_fan_out: bool,
    adapter_path: Path,
    base_weights: Mapping[str, torch.Tensor] | None = None,
) -> MergePlan:
    """Match an adapter's tensors (functuner names) to base keys; raise naming the first mismatch.

    ``headers`` maps every base key to its info; the matching is the tuner's own
    (its ``plan_shard_merge`` hook; for LoRA the layout :func:`functuner.merge` uses on
    a weights mapping), with ``fan_in_fan_out``
    deciding square 2-D weights.  Raises :class:`ParamsMismatchError` for an
    adapter key whose target is missing from the base or whose shape does not
    fit.  ``base_weights`` (full weights PEFT saved beside the adapter, base
    names) replace the base's before merging.
    """
    shapes = {k: tuple(info.shape) for k, info in headers.items()}
    tuner = tuner_for(config)
    if tuner.plan_shard_merge is None:
        raise CheckpointError(
            f"{adapter_path}: {tuner.swift_type} adapters have no streaming merge; merge them in memory with"
            " functuner.merge(model, params) or keep them as adapters"
        )
    plan = tuner.plan_shard_merge(tensors, config, adapter_name, shapes, fan_in_fan_out, str(adapter_path))
    replacements: dict[str, torch.Tensor] = {}
    for key, value in sorted((base_weights or {}).items()):
        if key not in headers:
            raise ParamsMismatchError(f"{adapter_path}: saved base weight {key!r} is not in the base checkpoint")
        if tuple(headers[key].shape) != tuple(value.shape):
            raise ParamsMismatchError(
                f"{adapter_path}: saved base weight {key!r} (shape {list(value.shape)}) does not fit the base's"
                f" shape {list(headers[key].shape)}"
            )
        if (headers[key].dtype in _FLOAT_NAMES) != value.is_floating_point():
            raise CheckpointError(
                f"{adapter_path}: saved base weight {key!r} has dtype {str(value.dtype).replace('torch.', '')};"
                f" the base's tensor is {headers[key].dtype} (expected a tensor of that kind)"
            )
        replacements[key] = value
    replacements.update(plan.replacements)
    return MergePlan(dict(plan.merges), replacements)


def _read_tensor(f: Any, info: TensorInfo, path: Path) -> torch.Tensor:
    torch_dtype = _DTYPES[info.dtype][0]
    if torch_dtype is None:
        raise CheckpointError(f"{path}: dtype {info.dtype} cannot be merged or converted")
    f.seek(info.start)
    buf = bytearray(info.nbytes)
    if f.readinto(buf) != info.nbytes:
        raise CheckpointError(f"{path}: truncated safetensors file (tensor data ends early)")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=torch_dtype)
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(info.shape)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())  # type: ignore[arg-type]


def _out_dtype_name(info: TensorInfo, dtype: torch.dtype | None) -> str:
    if dtype is not None and info.dtype in _FLOAT_NAMES:
        return _NAME_OF[dtype]
    return info.dtype


def _write_shard(
    header: Header, dest: Path, plan: MergePlan, dtype: torch.dtype | None, progress: Callable[[int], None]
) -> int:
    """Write ``header``'s file with the plan applied to ``dest``; return the data size in bytes."""
    out_entries: dict[str, Any] = {}
    pos = 0
    for key, info in header.tensors.items():
        name = _out_dtype_name(info, dtype)
        nbytes = (info.nbytes // _DTYPES[info.dtype][1]) * _DTYPES[name][1]
        out_entries[key] = {"dtype": name, "shape": list(info.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    if header.metadata is not None:
        out_entries = {"__metadata__": header.metadata, **out_entries}
    raw = json.dumps(out_entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(header.path, "rb") as src, open(dest, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for key, info in header.tensors.items():
            name = out_entries[key]["dtype"]
            if key in plan.merges or key in plan.replacements or name != info.dtype:
                w = plan.replacements[key] if key in plan.replacements else _read_tensor(src, info, header.path)
                if key in plan.merges:
                    w = plan.merges[key](w)
                w = w.to(_DTYPES[name][0])
                out.write(_tensor_bytes(w))
                del w
            else:
                src.seek(info.start)
                left = info.nbytes
                while left:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise CheckpointError(f"{header.path}: truncated safetensors file (tensor {key!r} ends early)")
                    out.write(chunk)
                    left -= len(chunk)
            progress(info.nbytes)
        out.flush()
        os.fsync(out.fileno())
    return pos


def read_base(base_dir: Path) -> tuple[list[str], dict[str, Any] | None, list[Header], dict[str, TensorInfo]]:
    """Read and cross-check a base checkpoint's index and every shard header (no tensor data).

    Returns ``(shard names, index or None, headers, {tensor name: info})``.
    Raises :class:`CheckpointError` naming the file and the key/field for a
    malformed index or header, a shard resolving outside ``base_dir``, a
    tensor in two shards, or an index entry its shard does not hold.
    """
    names, index = shard_files(base_dir)
    for n in names:
        _inside_source(base_dir / n, base_dir)
    headers = [read_header(base_dir / n) for n in names]
    all_infos: dict[str, TensorInfo] = {}
    owner: dict[str, str] = {}
    for name, h in zip(names, headers, strict=True):
        for k, info in h.tensors.items():
            if k in all_infos:
                raise CheckpointError(f"{base_dir / name}: tensor {k!r} also appears in {owner[k]}")
            all_infos[k], owner[k] = info, name
    if index is not None:
        for k, shard in index["weight_map"].items():
            if owner.get(k) != shard:
                raise CheckpointError(f"{base_dir / INDEX}: maps {k!r} to {shard}, but that shard does not hold it")
    return names, index, headers, all_infos


def merge_checkpoint(
    base_dir: Path,
    tmp_out: Path,
    tensors: Mapping[str, torch.Tensor],
    config: Any,
    adapter_name: str,
    *,
    dtype: torch.dtype | None = None,
    adapter_path: Path | None = None,
    base_weights: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Merge the adapter into ``base_dir``'s shards, writing everything into the (empty) directory ``tmp_out``.

    Validates every shard header and matches every adapter key before writing
    a byte.  ``progress(nbytes)`` is called after each tensor; ``on_plan(total)``
    once with the total input bytes.  Returns a summary dict (shards, merged
    weights, replaced tensors, bytes written).
    """
    names, index, headers, all_infos = read_base(base_dir)
    quantized = quantized_checkpoint(all_infos, _config(base_dir))
    if quantized is not None and bnb_dequantizable(all_infos):  # bitsandbytes: dequantize shard by shard first
        with tempfile.TemporaryDirectory(prefix=".dequantized-", dir=tmp_out.parent) as dense:
            dequantize_bnb_checkpoint(base_dir, Path(dense), names, index, dtype)
            return merge_checkpoint(
                Path(dense),
                tmp_out,
                tensors,
                config,
                adapter_name,
                dtype=dtype,
                adapter_path=adapter_path,
                base_weights=base_weights,
                progress=progress,
                on_plan=on_plan,
            )
    if quantized is not None:
        raise CheckpointError(
            f"{base_dir}: a quantized checkpoint ({quantized}); the streaming merge dequantizes bitsandbytes"
            " checkpoints only. Load the quantized model and call functuner.quant.merge_quantized(model, params):"
            " its float weights can be saved in 16 bit (docs/quantization.md)"
        )
    fan_in_fan_out = bool(getattr(config, "fan_in_fan_out", False)) or _model_type(base_dir) == "gpt2"
    plan = plan_merge(
        all_infos, tensors, config, adapter_name, fan_in_fan_out, adapter_path or base_dir, base_weights or {}
    )
    if on_plan is not None:
        on_plan(sum(i.nbytes for i in all_infos.values()))
    tick = progress or (lambda n: None)
    total = 0
    current = tmp_out
    try:
        for name, h in zip(names, headers, strict=True):
            current = tmp_out / name
            total += _write_shard(h, current, plan, dtype, tick)
        for item in sorted(base_dir.iterdir()):
            if item.name in names or item.name == INDEX:
                continue
            current = tmp_out / item.name
            if item.is_dir():  # files resolving outside the base are refused, never copied
                _inside_source(item, base_dir)
                shutil.copytree(item, tmp_out / item.name, copy_function=_copy_checked(base_dir))
            else:
                _copy_checked(base_dir)(str(item), str(tmp_out / item.name))
        if index is not None:
            current = tmp_out / INDEX
            new_index = dict(index)
            new_index["metadata"] = {**dict(index.get("metadata") or {}), "total_size": total}
            with open(tmp_out / INDEX, "w", encoding="utf-8") as f:
                f.write(json.dumps(new_index, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        full = "disk full: " if exc.errno == errno.ENOSPC else ""
        where = exc.filename or current
        raise CheckpointError(f"{full}could not write {where} ({exc.strerror}); no output was written") from None
    return {"shards": len(names), "merged": len(plan.merges), "replaced": len(plan.replacements), "bytes": total}


def _model_type(base_dir: Path) -> str | None:
    try:
        return cast("str | None", json.loads((base_dir / "config.json").read_text(encoding="utf-8")).get("model_type"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _config(base_dir: Path) -> dict[str, Any] | None:
    """``config.json`` of the base as a dict, ``None`` if absent or not an object."""
    try:
        data = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
