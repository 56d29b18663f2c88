"""Adapter directories on disk, as the command line reads and writes them.

Two layouts hold the same LoRA tensors:

* **SWIFT** (``SwiftModel.save_pretrained``): one sub-folder per adapter,
  ``<dir>/<adapter>/adapter_config.json`` (with ``swift_type``) and
  ``<dir>/<adapter>/adapter_model.safetensors`` whose keys carry the adapter
  name (``q_proj.lora_A.<adapter>.weight``), no ``base_model.model.`` prefix.
* **PEFT** (``PeftModel.save_pretrained``): the ``default`` adapter at the
  top, other adapters in sub-folders; keys with the ``base_model.model.``
  prefix and without the adapter name; configs carry ``peft_type`` only.

Everything read here is safetensors (never unpickled); every renaming goes
through :mod:`functuner.keys`.  Writers build the whole output in a temporary
sibling directory and rename it into place, so a failure leaves nothing at the
destination.  Tensors are CPU tensors exactly as stored (dtype unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import CheckpointError, UnsafeCheckpointError
from ..io import keys

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterDir",
    "AdapterTensors",
    "atomic_directory",
    "convert_directory",
    "find_adapters",
    "load_tensors",
    "lora_config",
    "pick_adapter",
    "rename_from_disk",
    "resolve_path",
    "write_adapters",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PICKLED = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_SWIFT_ONLY = (
    "swift_type",
    "lora_dtype",
    "lorap_lr_ratio",
    "lorap_emb_lr",
    "use_qa_lora",
    "use_merged_linear",
    "enable_lora",
    "lr_ratio",
    "model_key_mapping",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class AdapterDir:
    """One adapter on disk: its name, layout (``'swift'`` or ``'peft'``), folder, config and weights file."""

    name: str
    layout: str
    folder: Path
    config: dict[str, Any]
    weights: Path

    @property
    def tuner_type(self) -> str:
        return str(self.config.get("swift_type") or self.config.get("peft_type") or "?")


def resolve_path(path: str) -> Path:
    """A local directory for ``path``; a ``owner/name`` that is not a local path is fetched from ModelScope.

    Raises :class:`CheckpointError` naming the path when it is missing, not a
    directory, unreadable, or cannot be fetched.
    """
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{path}: not a directory (expected an adapter or model folder)")
        if not os.access(p, os.R_OK | os.X_OK):
            raise CheckpointError(f"{path}: directory is not readable")
        return p
    if _HUB_ID.match(path):
        try:
            from modelscope import snapshot_download
        except Exception as exc:  # noqa: BLE001 - any import failure means "cannot fetch"
            raise CheckpointError(f"{path}: no such local directory, and ModelScope is unavailable ({exc})") from None
        import logging

        logging.disable(logging.CRITICAL)  # ModelScope logs each retry on stderr; the error below says it once
        try:
            return Path(snapshot_download(path))
        except Exception as exc:  # noqa: BLE001 - network/hub errors come in many types
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        finally:
            logging.disable(logging.NOTSET)
        raise CheckpointError(f"{path}: no such local directory, and fetching it from ModelScope failed: {reason}")
    raise CheckpointError(f"{path}: no such file or directory")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _weights_file(folder: Path) -> Path:
    st = folder / ADAPTER_WEIGHTS
    if st.is_file():
        return st
    for name in _PICKLED:
        if (folder / name).is_file():
            raise UnsafeCheckpointError(
                f"{folder / name}: pickled weights; functuner never unpickles. Re-save with safetensors"
                " (save_pretrained(..., safe_serialization=True))"
            )
    raise CheckpointError(f"{folder}: has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")


def _safetensors_keys(path: Path) -> list[str]:
    from ..io.merge_shards import read_header

    return list(read_header(path).tensors)


def _layout_of(folder: Path, config: dict[str, Any], weights: Path) -> str:
    names = _safetensors_keys(weights)
    prefixed = [k for k in names if k.startswith(keys.PEFT_PREFIX)]
    if names and len(prefixed) == len(names):
        return "peft"
    if not prefixed and ("swift_type" in config or names):
        return "swift"
    raise CheckpointError(
        f"{weights}: mixes keys with and without PEFT's {keys.PEFT_PREFIX!r} prefix (e.g. {prefixed[0]!r} and"
        f" {next(k for k in names if not k.startswith(keys.PEFT_PREFIX))!r})"
    )


def _adapter_at(folder: Path, name: str) -> AdapterDir:
    config = _read_json(folder / ADAPTER_CONFIG)
    weights = _weights_file(folder)
    return AdapterDir(name, _layout_of(folder, config, weights), folder, config, weights)


def find_adapters(root: Path) -> list[AdapterDir]:
    """Every adapter in ``root`` (SWIFT or PEFT layout), sorted by name, ``default`` first.

    Raises :class:`CheckpointError` when ``root`` holds neither layout, naming
    what was looked for.
    """
    found: list[AdapterDir] = []
    if (root / ADAPTER_CONFIG).is_file():
        found.append(_adapter_at(root, "default"))
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise CheckpointError(f"{root}: cannot list directory ({exc.strerror})") from None
    for sub in entries:
        if sub.is_dir() and (sub / ADAPTER_CONFIG).is_file():
            if sub.name == "default" and found and found[0].name == "default":
                raise CheckpointError(f"{root}: holds an adapter both at the top and in default/")
            found.append(_adapter_at(sub, sub.name))
    if not found:
        raise CheckpointError(
            f"{root}: neither a SWIFT nor a PEFT adapter directory (no {ADAPTER_CONFIG} at the top or in a sub-folder)"
        )
    found.sort(key=lambda a: (a.name != "default", a.name))
    return found


def pick_adapter(adapters: list[AdapterDir], name: str | None, where: Path) -> AdapterDir:
    """The adapter called ``name``, or the only one when ``name`` is None (error listing the names otherwise)."""
    names = [a.name for a in adapters]
    if name is None:
        if len(adapters) == 1:
            return adapters[0]
        raise CheckpointError(f"{where}: holds {len(adapters)} adapters {names}; choose one with --adapter-name")
    for a in adapters:
        if a.name == name:
            return a
    raise CheckpointError(f"{where}: has no adapter {name!r}; it holds {names}")


def _modules_to_save(config: Mapping[str, Any]) -> set[str] | None:
    mts = config.get("modules_to_save")
    if not mts:
        return None
    return {mts} if isinstance(mts, str) else set(mts)


class AdapterTensors(NamedTuple):
    """An adapter's tensors under functuner names, and full base weights saved beside it (base model's names)."""

    adapter: dict[str, torch.Tensor]
    base_weights: dict[str, torch.Tensor]


def rename_from_disk(adapter: AdapterDir, raw: Mapping[str, Any]) -> AdapterTensors:
    """On-disk keys -> functuner names (values passed through untouched, whatever they are)."""
    mts = _modules_to_save(adapter.config)
    if adapter.layout == "peft":
        rest, base = keys.split_peft_base_weights(raw)
        return AdapterTensors(keys.from_peft_state_dict(rest, adapter.name, mts), base)
    saved, own = _own_swift_tensors(raw, adapter)
    state = keys.from_swift_state_dict(own, saved, mts)
    if saved != adapter.name:
        state = keys.rename_adapter(state, saved, adapter.name)
    return AdapterTensors(state, {})


_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _adapter_in_key(key: str) -> str | None:
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _LORA_PARTS:
            return parts[i + 1]
    return None


def _own_swift_tensors(raw: Mapping[str, Any], adapter: AdapterDir) -> tuple[str, dict[str, Any]]:
    """The adapter name a SWIFT file was saved under, and only that adapter's entries.

    ms-swift 4.6 picks an adapter's tensors by substring, so an adapter named
    ``lora`` also saves every other adapter's LoRA tensors (``.lora_A.default``
    contains ``.lora``); those are dropped, as :mod:`functuner.checkpoint` does.
    """
    found = {n for k in raw if (n := _adapter_in_key(k)) is not None}
    if not found or adapter.name in found:
        name = adapter.name
    elif len(found) == 1:
        name = next(iter(found))
    else:
        raise CheckpointError(f"{adapter.weights}: holds tensors of adapters {sorted(found)}; none is {adapter.name!r}")
    return name, {k: v for k, v in raw.items() if _adapter_in_key(k) in (None, name)}


def load_tensors(adapter: AdapterDir) -> AdapterTensors:
    """The adapter's tensors (CPU, stored dtype) under functuner names (``<module>.lora_A.<adapter>.weight``...)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(adapter.weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{adapter.weights}: not a readable safetensors file ({exc})") from None
    return rename_from_disk(adapter, raw)


def lora_config(adapter: AdapterDir) -> Any:
    """The adapter's :class:`~functuner.LoRAConfig` from its JSON (via :func:`functuner.checkpoint.config_from_json`).

    Fields with no functuner counterpart raise :class:`CheckpointError` naming
    the file and field, rather than being silently dropped.
    """
    from ..io.checkpoint import config_from_json

    where = adapter.folder / ADAPTER_CONFIG
    if adapter.tuner_type.upper() != "LORA":
        raise CheckpointError(f"{where}: tuner type {adapter.tuner_type!r} is not LoRA; only LoRA can be merged here")
    return config_from_json(adapter.config, str(where))


def peft_config_json(config: Mapping[str, Any]) -> dict[str, Any]:
    """A SWIFT LoRA config as PEFT writes it (``LoRAConfig.to_peft_config``): SWIFT-only fields dropped."""
    out = {k: v for k, v in config.items() if k not in _SWIFT_ONLY}
    out["peft_type"] = str(config.get("swift_type") or config.get("peft_type") or "LORA").upper()
    return out


def swift_config_json(config: Mapping[str, Any]) -> dict[str, Any]:
    """A PEFT LoRA config as SWIFT writes it: ``swift_type`` added, PEFT's fields kept."""
    out = dict(config)
    out["swift_type"] = str(config.get("peft_type") or "LORA").upper()
    return out


@contextmanager
def atomic_directory(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``final``; on success rename it to ``final``.

    On any exception the temporary directory is removed and ``final`` is left
    as it was.  ``final`` existing is a :class:`CheckpointError` unless
    ``overwrite``; then it is replaced only after the new one is complete.
    """
    final = final.resolve() if final.exists() else Path(os.path.abspath(final))
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final}: already exists (pass --overwrite to replace it)")
    parent = final.parent
    if not parent.is_dir():
        raise CheckpointError(f"{parent}: parent directory of the output does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    except OSError as exc:
        raise CheckpointError(f"{parent}: cannot create a directory there ({exc.strerror})") from None
    try:
        yield tmp
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
            os.replace(final, trash / "old")
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_adapters(
    out: Path, items: list[tuple[AdapterDir, dict[str, Any], dict[str, torch.Tensor]]], layout: str
) -> None:
    """Write adapters (source, config JSON, on-disk tensors) into the *temporary* directory ``out``.

    ``layout='peft'`` puts ``default`` at the top and others in sub-folders (as
    ``Swift.save_to_peft_format`` does); ``'swift'`` puts every adapter in its
    own sub-folder and adds SWIFT's ``configuration.json``.
    """
    from safetensors.torch import save

    for source, config, tensors in items:
        folder = out if (layout == "peft" and source.name == "default") else out / source.name
        folder.mkdir(parents=True, exist_ok=True)
        _fsync_write(folder / ADAPTER_CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        _fsync_write(folder / ADAPTER_WEIGHTS, save(contiguous, metadata={"format": "pt"}))
    if layout == "swift" and not (out / "configuration.json").exists():
        _fsync_write(out / "configuration.json", b"{}")


def _check_convertible(adapter: AdapterDir, to: str) -> None:
    cfg = adapter.config
    where = adapter.folder / ADAPTER_CONFIG
    if adapter.tuner_type.upper() != "LORA":
        raise CheckpointError(
            f"{where}: adapter {adapter.name!r} is {adapter.tuner_type}; only LoRA exists in both SWIFT and PEFT format"
        )
    for field in ("use_qa_lora", "use_merged_linear", "enable_lora"):
        if cfg.get(field):
            raise CheckpointError(
                f"{where}: {field}={cfg[field]!r} has no PEFT equivalent; {to.upper()} format cannot hold it"
            )
    if to == "peft" and cfg.get("lora_dtype") not in (None, "None"):
        raise CheckpointError(
            f"{where}: lora_dtype={cfg['lora_dtype']!r} has no PEFT equivalent; PEFT format cannot hold it"
        )


def convert_directory(src: Path, dst: Path, to: str, overwrite: bool = False) -> tuple[list[str], str]:
    """Convert every adapter in ``src`` to ``to`` (``'peft'`` or ``'swift'``) layout at ``dst``, atomically.

    SWIFT -> PEFT follows ``Swift.save_to_peft_format``: LoRA only (no QA-LoRA,
    merged-linear, ``lora_dtype`` or ``extra_states``), ``default`` at the top.
    Other top-level files are copied.  Returns ``(adapter names, source format)``.
    Raises :class:`CheckpointError` with the reason when ``to`` cannot hold something.
    """
    adapters = find_adapters(src)
    if to == "peft" and (src / "extra_states").exists():
        raise CheckpointError(
            f"{src / 'extra_states'}: SWIFT extra states (non-adapter weights) cannot be held by PEFT format"
        )
    layouts = sorted({a.layout for a in adapters})
    if layouts == [to]:
        raise CheckpointError(f"{src}: already in {to.upper()} format")
    items = []
    for a in adapters:
        _check_convertible(a, to)
        tensors, base_weights = load_tensors(a)
        if base_weights and to == "swift":
            raise CheckpointError(
                f"{a.weights}: holds full base weights ({', '.join(sorted(base_weights))}) that SWIFT format cannot"
                " hold; merge them into the base model instead (functuner merge)"
            )
        if to == "peft":
            items.append((a, peft_config_json(a.config), keys.to_peft_state_dict(tensors, a.name)))
        else:
            items.append((a, swift_config_json(a.config), keys.to_swift_state_dict(tensors, a.name)))
    with atomic_directory(dst, overwrite) as tmp:
        write_adapters(tmp, items, to)
        for item in sorted(src.iterdir()):
            if item.is_file() and item.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) and not (tmp / item.name).exists():
                shutil.copy2(item, tmp / item.name)
    return [a.name for a in adapters], "/".join(layouts)
