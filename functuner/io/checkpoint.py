"""Adapter checkpoints on disk: SWIFT's and PEFT's directory layouts, read and written safely; ``save`` / ``load``.

Layouts (both are what the real libraries write):

* **SWIFT** (``SwiftModel.save_pretrained``): one sub-folder per adapter,
  ``<dir>/<adapter>/adapter_config.json`` (the config fields plus
  ``swift_type``) and ``<dir>/<adapter>/adapter_model.safetensors`` with keys
  such as ``model.layers.0.self_attn.q_proj.lora_A.<adapter>.weight``;
  ``<dir>/extra_states/`` for ``extra_state_keys``; ``<dir>/configuration.json``.
* **PEFT** (``PeftModel.save_pretrained``): the ``default`` adapter at the
  root, others in sub-folders; keys prefixed ``base_model.model.`` with the
  adapter name removed; ``adapter_config.json`` without ``swift_type``.  Only
  tuners with a ``peft`` hook have this layout.

This module holds the writers and the front doors (:func:`save`, :func:`load`,
:func:`convert_checkpoint`); reading is :mod:`functuner.io.reader`, configs
:mod:`functuner.tuners.config_json`, key names :mod:`functuner.io.keys`, file-system
mechanics :mod:`functuner.core.fs` (every name is re-exported here).  Every
write goes to a temporary directory beside the target which then replaces the
target in one atomic exchange, so an interrupted save never leaves a
half-written checkpoint where a good one was; files get the umask's mode.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..core.fs import atomic_dir, atomic_write_text, copy_plain_files, read_json, umask
from ..core.naming import check_adapter_name
from ..errors import AdapterNameError, CheckpointError
from ..tuners import REGISTRY, tuner_for
from ..tuners.config_json import (
    BIN_NAME,
    CONFIG_NAME,
    EXTRA_STATE_DIR,
    SAFETENSORS_NAME,
    config_from_json,
    config_to_json,
    is_peft_native_type,
    peft_config_json,
    peft_tuner,
    read_adapter_config,
    write_adapter_config,
)
from . import keys
from .reader import (
    AdapterCheckpoint,
    check_extra_states,
    check_finite,
    check_model,
    is_functuner_peft_type,
    list_adapters,
    peft_native_adapters,
    peft_type_of,
    read_adapter,
    read_adapter_dir,
    read_extra_states,
    read_tensors,
)

__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "EXTRA_STATE_DIR",
    "SAFETENSORS_NAME",
    "AdapterCheckpoint",
    "atomic_dir",
    "check_finite",
    "check_lora_ranks",
    "check_model",
    "config_from_json",
    "config_to_json",
    "convert_checkpoint",
    "is_functuner_peft_type",
    "is_peft_native_type",
    "list_adapters",
    "load",
    "load_extra_states",
    "peft_config_json",
    "peft_native_adapters",
    "peft_type_of",
    "read_adapter",
    "read_adapter_config",
    "read_adapter_dir",
    "read_checkpoint",
    "read_extra_states",
    "read_tensors",
    "save",
    "weights_name",
    "write_adapter_config",
    "write_configuration_json",
    "write_extra_states",
    "write_peft_adapter",
    "write_peft_checkpoint",
    "write_swift_adapter",
]


check_lora_ranks = check_model  # the name callers used before the check became a tuner hook


def _save_tensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write tensors as a new weights file (contiguous CPU copies, so views and shared storage are fine).

    ``path`` named :data:`BIN_NAME` gets SWIFT's / PEFT's ``safe_serialization=False``
    form: ``torch.save`` of a plain ``dict`` of plain tensors (which torch's
    restricted ``weights_only`` loader reads back); any other name a safetensors
    file.  An existing file is unlinked first: it may be a hard link into the
    previous checkpoint.
    """
    ready = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    Path(path).unlink(missing_ok=True)
    if Path(path).name == BIN_NAME:
        torch.save(dict(ready), str(path))
    else:
        try:
            save_file(ready, str(path), metadata={"format": "pt"})
        except SafetensorError as e:  # an I/O failure (file-size limit, full disk) inside the temporary copy
            raise CheckpointError(f"{path}: could not write ({e}); the existing checkpoint is unchanged") from None
    os.chmod(path, 0o666 & ~umask())  # safetensors creates it 0600; PEFT's files follow the umask


def _write_config(data: Mapping[str, Any], path: Path) -> None:
    """``adapter_config.json`` as SWIFT and PEFT write it: ``json.dumps(data, indent=2, sort_keys=True)``, no newline.

    The same bytes as ms-swift's ``SwiftConfig.save_pretrained`` (and PEFT's), so a
    checkpoint read and re-saved keeps its config file byte for byte.  A new file
    (never written through a hard link into a previous checkpoint), mode from the umask.
    """
    path.unlink(missing_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True))


def weights_name(safe_serialization: bool) -> str:
    """The weights file name SWIFT and PEFT use: safetensors, or ``adapter_model.bin`` for ``safe_serialization=False``."""
    return SAFETENSORS_NAME if safe_serialization else BIN_NAME


def write_swift_adapter(
    save_directory: str | os.PathLike[str],
    adapter_name: str,
    config: Any,
    state: Mapping[str, torch.Tensor],
    *,
    safe_serialization: bool = True,
) -> Path:
    """Write one adapter in SWIFT's layout at ``save_directory/adapter_name/`` (atomically); returns that path.

    ``state`` uses functuner's names; keys are converted to SWIFT's on-disk names.
    An adapter without tensors (NEFTune) gets only its ``adapter_config.json``.
    ``safe_serialization=False`` writes ``adapter_model.bin`` (tensors only) as SWIFT does.
    """
    check_adapter_name(adapter_name)
    disk = keys.to_disk(state, config, adapter_name, "swift")
    target = Path(save_directory) / adapter_name
    with atomic_dir(target) as tmp:
        _write_config(config_to_json(config), tmp / CONFIG_NAME)
        if disk:
            _save_tensors(disk, tmp / weights_name(safe_serialization))
    return target


def _write_peft_files(
    folder: Path, adapter_name: str, config: Any, state: Mapping[str, torch.Tensor], safe_serialization: bool = True
) -> None:
    data = peft_config_json(config)
    disk = keys.to_disk(state, config, adapter_name, "peft")
    _write_config(data, folder / CONFIG_NAME)
    (folder / weights_name(not safe_serialization)).unlink(missing_ok=True)  # no stale file of the other kind
    _save_tensors(disk, folder / weights_name(safe_serialization))


def write_peft_adapter(
    folder: str | os.PathLike[str], adapter_name: str, config: Any, state: Mapping[str, torch.Tensor]
) -> Path:
    """Write one adapter in PEFT's layout into ``folder`` (atomically replacing it); returns ``folder``."""
    check_adapter_name(adapter_name)
    peft_config_json(config)  # refuse before touching the disk
    keys.to_disk(state, config, adapter_name, "peft")
    with atomic_dir(folder) as tmp:
        _write_peft_files(tmp, adapter_name, config, state)
    return Path(folder)


def write_peft_checkpoint(
    output_dir: str | os.PathLike[str],
    adapters: Mapping[str, AdapterCheckpoint],
    copy_from: str | os.PathLike[str] | None = None,
    *,
    keep_existing: bool = True,
    overwrite: bool = True,
    safe_serialization: bool = True,
) -> Path:
    """Write several adapters in PEFT's layout: ``default`` at the root, others in sub-folders.

    Validates every adapter before writing anything; the whole ``output_dir``
    is replaced atomically.  With ``keep_existing`` other files already in it
    are kept; regular top-level files of ``copy_from`` (``configuration.json``,
    ``README.md``...; never symlinks) are copied.
    """
    for ck in adapters.values():
        try:
            peft_config_json(ck.config)
            keys.to_disk(ck.state, ck.config, ck.name, "peft")
        except CheckpointError as e:
            raise CheckpointError(f"adapter {ck.name!r} ({ck.path}): {e}") from None
    out = Path(output_dir)
    with atomic_dir(out, start_from_existing=keep_existing, overwrite=overwrite) as tmp:
        if copy_from is not None:
            copy_plain_files(copy_from, tmp, skip=(CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME))
        for name, ck in adapters.items():
            folder = tmp if name == "default" else tmp / name
            if folder != tmp:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
            else:
                (tmp / BIN_NAME).unlink(missing_ok=True)
            _write_peft_files(folder, name, ck.config, ck.state, safe_serialization)
        if "default" in adapters:
            shutil.rmtree(tmp / "default", ignore_errors=True)
    return out


def write_extra_states(
    save_directory: str | os.PathLike[str],
    patterns: Sequence[str],
    state: Mapping[str, torch.Tensor],
    *,
    safe_serialization: bool = True,
) -> Path:
    """Write ``extra_states/`` (SWIFT's layout: weights plus ``{"extra_state_keys": [...]}``) atomically."""
    target = Path(save_directory) / EXTRA_STATE_DIR
    with atomic_dir(target) as tmp:
        _save_tensors(state, tmp / weights_name(safe_serialization))
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:  # SWIFT's json.dump: compact, no newline
            json.dump({"extra_state_keys": list(patterns)}, f)
    return target


def write_configuration_json(save_directory: str | os.PathLike[str]) -> None:
    """SWIFT's ``configuration.json`` (``{}``) if it is missing (written via a temp file and rename)."""
    path = Path(save_directory) / "configuration.json"
    if not path.exists():
        atomic_write_text(path, "{}")


# ---------------------------------------------------------------------------
# whole directories
# ---------------------------------------------------------------------------
def read_checkpoint(
    path: str | os.PathLike[str],
    adapter_names: Any = None,
    *,
    weights_only: bool = False,
) -> dict[str, AdapterCheckpoint]:
    """:func:`read_adapter_dir`, refusing a directory that holds no adapter at all (naming what was looked for)."""
    root = Path(path)
    if root.is_dir() and not list_adapters(root):
        raise CheckpointError(
            f"{root}: neither a SWIFT nor a PEFT adapter directory (no {CONFIG_NAME} at the top or in a sub-folder)"
        )
    return read_adapter_dir(root, adapter_names, weights_only=weights_only)


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str = "peft",
    *,
    overwrite: bool = True,
    keep_existing: bool = True,
    same_format_ok: bool = True,
) -> dict[str, AdapterCheckpoint]:
    """Write every adapter of ``src`` in ``to``'s layout (``"peft"`` or ``"swift"``) at ``dst``, atomically.

    Everything is read with the library's reader (all its checks) and
    validated before anything is written; ``dst`` may be ``src``.  Refused
    (:class:`CheckpointError`): a tuner without a PEFT format, SWIFT-only
    fields PEFT cannot hold, ``extra_states/`` (to PEFT), full base weights
    (to SWIFT), an existing ``dst`` without ``overwrite``, and, without
    ``same_format_ok``, a directory already wholly in ``to``'s layout (unless
    converting in place).  Regular top-level files of ``src`` are copied
    (never symlinks).  ``Swift.save_to_peft_format`` is
    ``convert_checkpoint(src, dst, "peft")``; ``functuner convert`` adds
    ``overwrite=False, keep_existing=False, same_format_ok=False``.  Returns
    the adapters read.
    """
    keys._check_fmt(to)
    src_p = Path(src)
    if not src_p.is_dir():
        raise CheckpointError(f"{src_p}: not a directory")
    found = list_adapters(src_p)
    if not found:
        read_checkpoint(src_p)  # raises the "neither layout" error
    read_extra_states(src_p)  # a malformed extra_states/ is named as such, whatever the target format
    if to == "peft":
        if (src_p / EXTRA_STATE_DIR).exists():
            raise CheckpointError(f"{src_p / EXTRA_STATE_DIR}: SWIFT extra states, which PEFT's format cannot hold")
        for name, folder in found.items():  # refuse what PEFT cannot hold before parsing the fields
            data = read_json(folder / CONFIG_NAME, src_p)
            kind = data.get("swift_type")
            if isinstance(kind, str) and kind.lower() in {t.lower() for t in REGISTRY}:
                peft = peft_tuner(tuner_for(kind), f"{folder / CONFIG_NAME}: adapter {name!r}").peft
                assert peft is not None
                peft.check_json(data, str(folder / CONFIG_NAME))
    adapters = read_adapter_dir(src_p)
    in_place = os.path.realpath(src_p) == os.path.realpath(dst)
    if not same_format_ok and not in_place and adapters and all(ck.format == to for ck in adapters.values()):
        raise CheckpointError(f"{src_p}: already in {to.upper()} format")
    if to == "peft":
        write_peft_checkpoint(dst, adapters, copy_from=src_p, keep_existing=keep_existing, overwrite=overwrite)
        return adapters
    for ck in adapters.values():
        if ck.base_weights:
            raise CheckpointError(
                f"{ck.weights}: holds full base weights ({', '.join(sorted(ck.base_weights))}) that SWIFT's format"
                " cannot hold; merge them into the base model instead (functuner merge)"
            )
    with atomic_dir(dst, start_from_existing=keep_existing, overwrite=overwrite) as tmp:
        copy_plain_files(src_p, tmp, skip=(CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME))
        if "default" in adapters:  # PEFT's root adapter becomes SWIFT's default/ folder
            for stale in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
                (tmp / stale).unlink(missing_ok=True)
        for name, ck in adapters.items():
            write_swift_adapter(tmp, name, ck.config, ck.state)
        write_configuration_json(tmp)
    return adapters


# ---------------------------------------------------------------------------
# the functional front door: functuner.save / functuner.load
# ---------------------------------------------------------------------------
def save(params: Any, directory: str | os.PathLike[str], *, format: str = "swift") -> Path:  # noqa: A002
    """Write ``params`` (a :class:`~functuner.TunerParams`) to ``directory``; returns ``directory``.

    ``format="swift"``: the layout ``SwiftModel.save_pretrained`` writes for one
    adapter (``directory/<adapter name>/`` plus ``configuration.json``).
    ``format="peft"``: ``PeftModel.save_pretrained``'s (``default`` at the
    root, another name in ``directory/<adapter name>/``); a tuner without a
    PEFT format raises :class:`CheckpointError` before anything is written.
    Other adapters already in ``directory`` are kept; the directory is
    replaced in one atomic step.
    """
    from ..core.params import TunerParams

    if not isinstance(params, TunerParams):
        raise TypeError(f"save expects TunerParams, got {type(params).__name__}")
    keys._check_fmt(format)
    name = params.adapter_name
    check_adapter_name(name)
    state = {k: v.detach() for k, v in params.items()}
    if format == "peft":
        peft_tuner(params.config, f"save(format='peft') of adapter {name!r}")
        peft_config_json(params.config)
    keys.to_disk(state, params.config, name, format)  # every refusal before the disk is touched
    root = Path(directory)
    with atomic_dir(root, start_from_existing=True, link_existing=True) as tmp:
        if format == "peft":
            ck = AdapterCheckpoint(name, params.config, state, "peft", str(root))
            folder = tmp if name == "default" else tmp / name
            if folder != tmp:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
            else:
                (tmp / BIN_NAME).unlink(missing_ok=True)
            _write_peft_files(folder, name, ck.config, ck.state)
        else:
            write_swift_adapter(tmp, name, params.config, state)
            write_configuration_json(tmp)
    return root


def load_extra_states(
    directory: str | os.PathLike[str],
    model: torch.nn.Module | None = None,
    *,
    revision: str | None = None,
    weights_only: bool = False,
    **hub_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """SWIFT's ``extra_states/`` of a checkpoint (saved copies of the model's own tensors), checked, as a new dict.

    :func:`load` reads one adapter's params; the extra states are whole tensors of the model
    (``extra_state_keys``: e.g. a trained classifier head) that the shim writes into the model.  Here they
    are returned, never written: pass them to ``torch.func.functional_call`` or ``model.load_state_dict(...,
    strict=False)``.  They pass the adapter weights' checks (finite values, no pickle unless
    ``weights_only``); with ``model`` every key must be a tensor of the model with its shape and dtype kind
    (:class:`~functuner.errors.CheckpointError` naming the file and key otherwise).  ``{}`` when the
    checkpoint has none.
    """
    from ..core.hub import resolve_model_dir

    root = Path(resolve_model_dir(directory, revision, **hub_kwargs))
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    _, tensors = read_extra_states(root, weights_only=weights_only)
    if not tensors:
        return {}
    if model is not None:
        check_extra_states(tensors, model.state_dict(), str(root / EXTRA_STATE_DIR))
    return dict(tensors)


def load(
    directory: str | os.PathLike[str],
    model: torch.nn.Module | None = None,
    *,
    adapter_name: str | None = None,
    revision: str | None = None,
    weights_only: bool = False,
    **hub_kwargs: Any,
) -> Any:
    """Read one adapter (SWIFT or PEFT layout) as :class:`~functuner.TunerParams`, with every reader check.

    ``directory`` is a checkpoint directory, one adapter's folder, or a
    ModelScope hub id (resolved as ``Swift.from_pretrained`` does; ``revision``,
    ``cache_dir``, ``local_files_only``).  ``adapter_name`` picks the adapter
    when the directory holds several (it is also the params' name).  With
    ``model`` the config is checked against it before the tensors are used
    (LoRA ranks...), then the params are validated on it and their names put
    in the order ``init`` gives on that model, so ``load(save(p), model) == p``
    and loaded params map together with fresh ones; without ``model`` the
    names come in sorted order.
    """
    from ..core.hub import resolve_model_dir
    from ..core.params import TunerParams

    root = Path(resolve_model_dir(directory, revision, **hub_kwargs))
    found = list_adapters(root)
    if not found:
        read_checkpoint(root)  # raises the "neither layout" error
    if adapter_name is None:
        if len(found) != 1:
            raise CheckpointError(f"{root}: holds adapters {sorted(found)}; choose one with adapter_name=")
        disk_name = next(iter(found))
        as_name = disk_name
        if disk_name == "default" and found[disk_name] == root and "swift_type" in read_json(root / CONFIG_NAME, root):
            with_name = root.resolve().name  # one SWIFT adapter's own folder: its name is the folder's
            try:
                check_adapter_name(with_name)
                as_name = with_name
            except AdapterNameError:
                pass
    elif adapter_name in found:
        disk_name = as_name = adapter_name
    elif len(found) == 1 and "default" in found:
        disk_name, as_name = "default", adapter_name
    else:
        raise CheckpointError(f"{root}: has no adapter {adapter_name!r}; it holds {sorted(found)}")
    ck = read_adapter(found[disk_name], as_name, weights_only=weights_only, root=root)
    if model is not None:
        check_model(model, ck.config, str(Path(ck.path) / CONFIG_NAME))
    params = TunerParams(ck.state, ck.config, as_name)
    if model is not None:
        from ..functional import validate

        validate(model, params)
        params = _in_init_order(model, params)
    return params


def _in_init_order(model: torch.nn.Module, params: Any) -> Any:
    """``params`` with its names in the order ``init`` gives them on ``model`` (validated params, same keys).

    A file stores names sorted; ``init`` orders them by module.  The order is the
    pytree's leaf order, so a loaded adapter must have ``init``'s to be used in one
    ``tree_map`` (or compared with ``==``) with params made by ``init``.  Costs one
    ``init`` (fresh tensors of the adapter's size, discarded).
    """
    from ..core.params import TunerParams

    fresh = tuner_for(params.config).init(model, params.config, torch.Generator().manual_seed(0), params.adapter_name)
    if set(fresh) != set(params):  # validate passed, so this is a tuner whose names depend on more than the model
        return params
    return TunerParams({k: params[k] for k in fresh}, params.config, params.adapter_name)
