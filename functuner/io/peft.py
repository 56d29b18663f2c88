"""Loading PEFT's own tuners (IA3, LoHa, LoKr, AdaLoRA, VeRA, BOFT, prompt/prefix tuning...) through ``peft``.

functuner implements LoRA and SWIFT's tuners itself; a PEFT checkpoint of any
other PEFT type is handed to the real ``peft.PeftModel.from_pretrained`` /
``PeftModel.load_adapter``, as ms-swift's ``Swift.from_pretrained`` does.
Which adapters go this way is decided by
:func:`functuner.io.checkpoint.peft_native_adapters`; this module only calls peft,
with functuner's safety rules around it:

* the weights files are read and checked first (``.bin`` only with torch's
  restricted ``weights_only`` loader, files must stay inside the directory, no NaN/inf);
* loading is strict: the adapter's state after loading must hold exactly the
  keys of the file (PEFT itself only warns about missing keys);
* on any failure the model is put back as it was (child modules, parameters,
  buffers and attributes as before, ``requires_grad`` flags restored, a new
  adapter of an existing PeftModel deleted).

Impure by nature: PEFT changes ``model`` in place.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import AdapterNameError, CheckpointError
from . import checkpoint as ckpt

__all__ = ["is_peft_config", "is_peft_model", "load_peft_native"]


def is_peft_config(obj: Any) -> bool:
    """Whether ``obj`` is a ``peft.PeftConfig`` (such configs go to PEFT itself: the SWIFT contract).

    Never imports peft: a PeftConfig instance means peft is already imported.
    """
    peft_mod = sys.modules.get("peft")
    return peft_mod is not None and isinstance(obj, peft_mod.PeftConfig)


def is_peft_model(obj: Any) -> bool:
    """Whether ``obj`` is a ``peft.PeftModel`` (the shim's entry points hand those to PEFT's own methods)."""
    peft_mod = sys.modules.get("peft")
    return peft_mod is not None and isinstance(obj, peft_mod.PeftModel)


def _check_files(root: Path, folders: Mapping[str, Path], weights_only: bool) -> None:
    """Read every adapter's weights once with functuner's readers (safety checks only; peft reads them again)."""
    for folder in folders.values():
        tensors = ckpt.read_tensors(folder, weights_only=weights_only, root=root)
        if tensors is None:
            raise CheckpointError(f"{folder}: no {ckpt.SAFETENSORS_NAME} (or {ckpt.BIN_NAME})")
        ckpt.check_finite(tensors, str(folder))


def _check_strict(peft_model: Any, folder: Path, adapter_name: str, weights_only: bool) -> None:
    """The loaded adapter's state must have exactly the file's keys (PEFT only warns on a mismatch)."""
    import peft

    on_disk = set(ckpt.read_tensors(folder, weights_only=weights_only) or {})
    loaded = set(peft.get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    if on_disk != loaded:
        missing, unexpected = sorted(loaded - on_disk), sorted(on_disk - loaded)
        raise CheckpointError(
            f"{folder}: does not fit the model (PEFT would load it partly untrained); keys the model"
            f" expects but the file lacks {missing[:6]}, keys the model has no place for"
            f" {unexpected[:6]}"
        )


class _Snapshot:
    """What loading with peft can change on a model: child modules, attributes, adapter configs, trainable flags."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            (m, dict(m._modules), dict(m._parameters), dict(m._buffers), set(m.__dict__)) for m in model.modules()
        ]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        configs = getattr(model, "peft_config", None)
        self.configs = configs if isinstance(configs, dict) else None
        self.config_names = set(configs) if isinstance(configs, dict) else set()

    def restore(self, peft_model: Any, added: list[str]) -> None:
        """Undo peft's in-place changes: injected layers and adapter entries go, flags come back."""
        if peft_model is not None and self.configs is not None:  # an existing PeftModel: let peft clean its layers
            for name in added:
                if name in peft_model.peft_config:
                    with contextlib.suppress(Exception):  # best effort; the snapshot below restores the structure
                        peft_model.delete_adapter(name)
        for m, children, params, buffers, attrs in self.modules:
            m._modules.clear()
            m._modules.update(children)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            for key in set(m.__dict__) - attrs:
                del m.__dict__[key]
        if self.configs is not None:
            for name in set(self.configs) - self.config_names:
                del self.configs[name]
        for p, flag in self.flags:
            p.requires_grad_(flag)


def load_peft_native(
    model: nn.Module,
    root: str,
    folders: Mapping[str, Path],
    renames: Mapping[str, str],
    *,
    weights_only: bool = False,
    **peft_kwargs: Any,
) -> Any:
    """Load PEFT-format adapters ``folders`` (``{name on disk: folder}``) onto ``model`` with peft.

    ``renames`` maps each name on disk to the adapter name to load it as.
    ``model`` is a plain ``nn.Module`` (a new ``PeftModel`` is returned) or a
    ``PeftModel`` (the adapters are added to it and it is returned).
    ``peft_kwargs`` (``is_trainable=...``) go to peft.  All or nothing: on an
    error the model is left as it was and the error is raised.
    """
    import peft

    root_p = Path(root)
    _check_files(root_p, folders, weights_only)
    existing = set(model.peft_config) if isinstance(model, peft.PeftModel) else set()
    taken = sorted(existing & set(renames.values()))
    if taken:
        raise AdapterNameError(f"{root}: the PeftModel already has adapter(s) {taken}")
    snapshot = _Snapshot(model)
    result: Any = model if isinstance(model, peft.PeftModel) else None
    added: list[str] = []
    try:
        for disk_name, folder in folders.items():
            name = renames[disk_name]
            added.append(name)
            if result is None:
                result = peft.PeftModel.from_pretrained(model, str(folder), adapter_name=name, **peft_kwargs)
            else:
                result.load_adapter(str(folder), adapter_name=name, **peft_kwargs)
            _check_strict(result, folder, name, weights_only)
    except BaseException:
        snapshot.restore(result if result is model else None, added)
        raise
    return result
