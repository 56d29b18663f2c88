"""Adapter files in another library's layout that a tuner reads (its ``read_files`` hook) and writes.

ms-swift saves ReFT through pyreft's ``save_intervention`` (``intkey_*.bin``, one per layer) instead of
``adapter_model.safetensors``.  A tuner whose hook names such files (``(glob, convert)``) gets them read
here, next to ``adapter_config.json``, each only with torch's restricted loader
(``torch.load(..., weights_only=True)``, which executes no code): a file that needs more, or that is not
a dict of tensors, raises :class:`~functuner.errors.UnsafeCheckpointError` naming it.  The tuner's
``convert`` gives functuner's names.

The reverse (the tuner's ``write_files`` hook) is used only when the caller asks for pickles
(``save_pretrained(..., safe_serialization=False)``, SWIFT's ``.bin`` mode): :func:`tuner_files_to_write`
converts before anything is written, :func:`write_tuner_files` saves each plain dict of tensors
into a folder the caller writes atomically.  By default functuner writes ``adapter_model.safetensors``.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.fs import check_inside
from ..errors import CheckpointError, UnsafeCheckpointError
from ..tuners import tuner_for

__all__ = ["load_restricted", "read_tuner_files", "tuner_files_to_write", "write_tuner_files"]


def load_restricted(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``'d dict of tensors, through torch's restricted loader only; ``UnsafeCheckpointError`` else."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
        raise UnsafeCheckpointError(
            f"{path}: refused by torch's restricted loader (torch.load(weights_only=True)); functuner never"
            f" unpickles arbitrary objects ({type(e).__name__}: {e})"
        ) from None
    if type(data) not in (dict, collections.OrderedDict) or not all(
        isinstance(k, str) and type(v) in (torch.Tensor, nn.Parameter) for k, v in data.items()
    ):
        raise UnsafeCheckpointError(f"{path}: expected a dict of tensors (a state_dict), got {type(data).__name__}")
    return dict(data)


def read_tuner_files(folder: Path, config: Any, adapter_name: str, root: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of the files ``config``'s tuner reads in ``folder`` (its ``read_files`` hook), or ``None``.

    ``None`` when the tuner has no such hook or the folder has none of its files.
    """
    hook = tuner_for(config).read_files
    if hook is None:
        return None
    pattern, convert = hook
    paths = sorted(folder.glob(pattern))
    if not paths:
        return None
    files: dict[str, dict[str, torch.Tensor]] = {}
    for path in paths:
        check_inside(path, root)
        files[path.name] = load_restricted(path)
    return convert(config, files, adapter_name, str(folder))


def tuner_files_to_write(
    config: Any, state: Mapping[str, torch.Tensor], adapter_name: str
) -> dict[str, dict[str, torch.Tensor]] | None:
    """``{file name: state_dict}`` of ``config``'s tuner's own ``.bin`` layout (its ``write_files`` hook), or ``None``.

    Pure: call it before writing, so that a tensor the layout cannot hold raises while nothing has changed.
    """
    hook = tuner_for(config).write_files
    if hook is None:
        return None
    files = hook(config, state, adapter_name)
    for name in files:
        if Path(name).name != name or not name.endswith(".bin"):
            raise CheckpointError(f"adapter {adapter_name!r}: {name!r} is not a plain .bin file name")
    return files


def write_tuner_files(folder: Path, files: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """``torch.save`` each plain dict of (contiguous, detached) tensors into ``folder`` (written atomically by the caller)."""
    for name, tensors in files.items():
        torch.save({k: v.detach().contiguous() for k, v in tensors.items()}, folder / name)
