"""The shim's checkpoint side: its state dicts, loading tensors into live adapters, saving and reading directories.

Design note: the disk layer (:mod:`functuner.io`) owns formats: key names
(:func:`functuner.io.keys.to_disk` / :func:`~functuner.io.keys.from_disk`, with
each tuner's key hooks), file layout, atomic writes and the safety checks of
reading.  This module owns only what is about the shim's *live* state: which
tensors of which adapter go out (``state_dict``, ``save_pretrained``), copying
loaded values into the live parameters all or nothing, and checking what a
directory holds against the wrapped model before ``from_pretrained`` changes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.naming import check_adapter_name
from ..errors import CheckpointError, ConfigError, FunctunerError
from ..io import checkpoint as ckpt
from ..io import keys
from ..io.peft import is_peft_model
from ..io.reader import check_extra_states
from ..io.tuner_files import tuner_files_to_write, write_tuner_files
from .placement import filled, path_modules, reload
from .state import AdapterEntry, ShimState
from .training import as_saved
from .undo import own_modules, undo_on_error

__all__ = [
    "Found",
    "adapter_state_dict",
    "extra_states",
    "load_into_adapter",
    "load_peft_dir",
    "read_for_model",
    "save",
    "save_wrapped_model",
    "undo_for_load",
    "warn_bin",
]

Grab = Callable[[torch.Tensor], torch.Tensor]


def _not_meta(adapter: AdapterEntry) -> None:
    if adapter.offload == "meta":
        raise ConfigError(f"adapter {adapter.name!r} is offloaded to 'meta'; activate it before reading it")


def _not_sharded(name: str, tensors: Mapping[str, Any]) -> None:
    """Refuse, before anything is written, an adapter whose tensors FSDP2 sharded (each rank holds a slice)."""
    for key, t in tensors.items():
        if hasattr(t, "full_tensor") and hasattr(t, "placements"):  # a DTensor
            raise CheckpointError(
                f"adapter {name!r}: tensor {key!r} is sharded (a DTensor, e.g. after FSDP2's fully_shard), so"
                " save_pretrained would write one rank's slice; gather it on every rank and save from rank 0:"
                f" full = functuner.distributed.gather_params(model.adapters[{name!r}].params), then"
                " functuner.distributed.save_params_on_rank0(full, save_directory)"
            )


def adapter_state_dict(
    state: ShimState, adapter_name: str | None, peft_format: bool, grab: Grab, save_adapter: bool, save_extra: bool
) -> dict[str, Any]:
    """``SwiftModel.state_dict``'s content: adapters' tensors under on-disk names, then extra states."""
    out: dict[str, Any] = {}
    if save_adapter:
        for name, adapter in state.adapters.items():
            if adapter_name is not None and name != adapter_name:
                continue
            _not_meta(adapter)
            tensors = {k: grab(v) for k, v in adapter.tensors.items()}
            out.update(keys.to_disk(tensors, adapter.config, name, "peft" if peft_format else "swift"))
    if save_extra:
        out.update(extra_states(state, grab))
    return out


def extra_states(state: ShimState, grab: Grab = torch.Tensor.detach) -> dict[str, torch.Tensor]:
    """The wrapped model's tensors matching ``extra_state_keys`` (``re.fullmatch``), adapters' own excluded."""
    pats = state.extra_state_keys
    if not pats:
        return {}
    adapter_keys = {k for a in state.adapters.values() for k in a.tensors if k not in a.shared}
    return {
        n: grab(p)
        for n, p in state.model.state_dict(keep_vars=True).items()
        if n not in adapter_keys and any(re.fullmatch(k, n) for k in pats)
    }


def load_into_adapter(state: ShimState, adapter_name: str, values: Mapping[str, torch.Tensor]) -> None:
    """Copy ``values`` (SWIFT's or PEFT's on-disk names) into adapter ``adapter_name``: every tensor, all or nothing."""
    adapter = state.require(adapter_name)
    data = dict(values)
    fmt = "peft" if data and all(k.startswith(keys.PEFT_PREFIX) for k in data) else "swift"
    named = keys.from_disk(data, adapter.config, adapter_name, fmt)
    new = filled(adapter.params, named)
    with undo_on_error(state.model, state, overwritten=adapter.tensors.values()):
        reload(state, adapter)
        with torch.no_grad():
            for k, v in new.items():
                adapter.tensors[k].copy_(v)


def warn_bin(save_directory: str | os.PathLike[str]) -> None:
    """The warning of ``save_pretrained(safe_serialization=False)``: it works as in SWIFT, safetensors are better."""
    warnings.warn(
        f"save_pretrained({str(save_directory)!r}, safe_serialization=False) writes pickled .bin files"
        " (tensors only); safetensors (the default) are recommended: they load without unpickling, and faster",
        UserWarning,
        stacklevel=3,
    )


def save(
    state: ShimState,
    save_directory: str | os.PathLike[str],
    names: Sequence[str],
    peft_format: bool,
    safe_serialization: bool = True,
) -> None:
    """Write ``names`` (SWIFT's layout, or PEFT's), ``extra_states/`` and ``configuration.json`` in one atomic step.

    ``safe_serialization=False`` writes ``adapter_model.bin`` files (``torch.save`` of a plain dict of tensors,
    as SWIFT does) instead of safetensors; in SWIFT's layout a tuner with its own ``.bin`` layout (its
    ``write_files`` hook: ReFT's pyreft ``intkey_*.bin``) gets exactly the files ms-swift writes.  When no
    adapter has modules of its own (every tuner leaves the base trainable: NEFTune alone), the whole wrapped
    model is trained, so it is saved too, with its own ``save_pretrained``, into the same directory in the
    same atomic step (SWIFT's ``has_additional_modules``).
    """
    for n in names:
        state.require(n)
        check_adapter_name(n)
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} is a file; save_pretrained needs a directory")
    snapshots, configs = {}, {}
    for n in names:
        adapter = state.adapters[n]
        _not_meta(adapter)
        saved = as_saved(adapter)  # the tuner's saved form after training steps (AdaLoRA's allocated ranks)
        snapshots[n], configs[n] = dict(saved), saved.config
        _not_sharded(n, snapshots[n])
        if peft_format:  # refuse what PEFT cannot hold before anything is written
            ckpt.peft_config_json(configs[n])
            keys.to_disk(snapshots[n], configs[n], n, "peft")
    # a tuner's own .bin layout (ms-swift's ReFT: pyreft's intkey_*.bin), converted before anything is written
    own = (
        {}
        if safe_serialization or peft_format
        else {n: tuner_files_to_write(configs[n], snapshots[n], n) for n in names}
    )
    extra = extra_states(state)
    inner: Any = state.model
    whole_model = bool(state.adapters) and not any(a.tuner.freezes_base for a in state.adapters.values())
    if whole_model and not callable(getattr(inner, "save_pretrained", None)):
        raise CheckpointError(
            f"save_pretrained({str(root)!r}): the model itself is trained (no adapter has modules of its own) and"
            f" the wrapped {type(inner).__name__} has no save_pretrained; save it with torch.save(model.model.state_dict())"
        )
    if root.is_symlink():  # the user's own link: write where it points, swapping the real directory
        root = Path(os.path.realpath(root))
    # one atomic step for the whole directory: a crash leaves the old checkpoint or the new one, never a mix
    # (files kept from the old directory are hard links, and every file written is a new one)
    with ckpt.atomic_dir(root, start_from_existing=True, link_existing=True) as tmp:
        if peft_format:
            ckpt.write_peft_checkpoint(
                tmp,
                {n: ckpt.AdapterCheckpoint(n, configs[n], snapshots[n], "peft", str(root)) for n in names},
                safe_serialization=safe_serialization,
            )
        else:
            for n in names:
                files = own.get(n)
                ckpt.write_swift_adapter(
                    tmp, n, configs[n], snapshots[n] if files is None else {}, safe_serialization=safe_serialization
                )
                if files is not None:  # into the fresh adapter folder, inside this atomic step
                    write_tuner_files(tmp / n, files)
        if extra:
            ckpt.write_extra_states(tmp, state.extra_state_keys, extra, safe_serialization=safe_serialization)
        if whole_model:  # as SWIFT: the trained model itself, beside the adapter configs
            inner.save_pretrained(tmp, safe_serialization=safe_serialization)
        ckpt.write_configuration_json(tmp)


def save_wrapped_model(
    state: ShimState, save_directory: str | os.PathLike[str], kwargs: dict[str, Any], safe_serialization: bool = True
) -> None:
    """A SwiftModel without adapters (after ``merge_and_unload``) saves the wrapped model with its own ``save_pretrained``."""
    inner: Any = state.model
    if not callable(getattr(inner, "save_pretrained", None)):
        raise CheckpointError(
            f"save_pretrained({str(save_directory)!r}): the SwiftModel has no adapters left and the wrapped"
            f" {type(inner).__name__} has no save_pretrained; save it with torch.save(model.model.state_dict(), path)"
        )
    inner.save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)


class Found(NamedTuple):
    """What ``from_pretrained`` read from a directory, checked against the model it goes onto."""

    configs: dict[str, Any]
    states: dict[str, dict[str, torch.Tensor]]
    extra: dict[str, torch.Tensor]
    extra_state_keys: Sequence[str] | None


def read_for_model(
    inner: nn.Module, model_dir: str, adapter_name: Any, weights_only: bool, extra_state_keys: Sequence[str] | None
) -> Found:
    """Read adapters and extra states from ``model_dir`` and check them against ``inner`` before it changes."""
    found = ckpt.read_adapter_dir(model_dir, adapter_name, weights_only=weights_only)
    patterns, extra = ckpt.read_extra_states(model_dir, weights_only=weights_only)
    if extra_state_keys is None:
        extra_state_keys = patterns
    # the model's own tensors only when something is checked against them (a walk that grows with the adapters)
    own_state = inner.state_dict() if extra or any(ck.base_weights for ck in found.values()) else {}
    for ck in found.values():  # PEFT's saved copies of base weights must be the model's own
        differ = sorted(
            k
            for k, v in ck.base_weights.items()
            if k not in own_state or own_state[k].shape != v.shape or not torch.equal(own_state[k].cpu(), v)
        )
        if differ:
            raise CheckpointError(
                f"{ck.path}: holds base weights {differ[:4]} that differ from the model's;"
                " functuner loads adapters, not base weights (load that base model first)"
            )
    if extra:  # key, shape and dtype kind (the reader checked finiteness): the rules adapter weights follow
        check_extra_states(extra, own_state, f"{model_dir}/extra_states")
    configs = {n: c.config for n, c in found.items()}
    if not configs and not extra:
        hint = ""
        if (Path(model_dir) / "training_args.bin").is_file():  # a transformers.Trainer checkpoint of a SwiftModel
            hint = (
                "; it is a transformers.Trainer checkpoint without adapter configs: train with"
                " callbacks=[functuner.shim.trainer.SwiftCheckpointCallback()] so checkpoints are adapter directories,"
                " or load its model.safetensors into a SwiftModel with the same configs (model.load_state_dict)"
            )
        raise CheckpointError(
            f"{model_dir}: no adapter found (no adapter_config.json at the root or in sub-folders){hint}"
        )
    for ck in found.values():
        ckpt.check_model(inner, ck.config, f"{ck.path}/{ckpt.CONFIG_NAME}")  # the tuner's check (LoRA: ranks)
    return Found(configs, {n: c.state for n, c in found.items()}, dict(extra or {}), extra_state_keys)


@contextlib.contextmanager
def undo_for_load(
    inner: nn.Module, state: ShimState | None, found: Found, inference_mode: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """All or nothing for ``from_pretrained``: yields the model's tensors the extra states are copied into.

    The undo record covers the model's own modules (not the holders of adapters already loaded), the holders on
    the new tensors' paths and the new adapters, so a load costs the same with 1 or 1,000 adapters loaded; when
    it may change more (the first freezing of the base beside adapters that did not freeze it, or extra-state
    patterns making parameters trainable), everything is recorded.
    """
    targets = {k: _tensor_at(inner, k) for k in found.extra}
    scope: dict[str, Any] = {}
    wide = (
        state is not None
        and state.adapters
        and (
            not inner.__dict__.get("_functuner_frozen", False)
            or (not inference_mode and (state.extra_state_keys or found.extra_state_keys))
        )
    )
    if not wide:
        keys = [k for st in found.states.values() for k in st]
        scope = {"modules": [*own_modules(inner), *path_modules(inner, keys)], "adapters": list(found.configs)}
    with undo_on_error(inner, state, overwritten=targets.values(), **scope):
        yield targets


def _tensor_at(inner: nn.Module, key: str) -> torch.Tensor:
    """The model's parameter or buffer ``key`` (a state-dict key the reader checked exists)."""
    path, _, leaf = key.rpartition(".")
    owner = inner.get_submodule(path) if path else inner
    found = owner._parameters.get(leaf)
    out = found if found is not None else owner._buffers[leaf]
    assert out is not None
    return out


def load_peft_dir(
    model: Any, model_dir: str, folders: Mapping[str, Path], renames: Mapping[str, str], kwargs: dict[str, Any]
) -> Any:
    """``Swift.from_pretrained`` on a PEFT directory: functuner's checks, then peft loads it; a ``PeftModel`` back.

    ``kwargs`` go to peft (``inference_mode=False`` meaning ``is_trainable=True``);
    ``weights_only`` is accepted (``.bin`` is always read with torch's restricted loader).
    """
    from ..io.peft import load_peft_native

    kwargs = dict(kwargs)
    if kwargs.pop("extra_state_keys", None):
        raise ConfigError("extra_state_keys is a SWIFT feature; PEFT adapters cannot carry extra states")
    weights_only = bool(kwargs.pop("weights_only", False))
    if "inference_mode" in kwargs:
        kwargs.setdefault("is_trainable", not bool(kwargs.pop("inference_mode")))
    _check_peft_dir_for_model(model, model_dir, renames, weights_only)
    return load_peft_native(model, model_dir, folders, renames, weights_only=weights_only, **kwargs)


def _check_peft_dir_for_model(model: Any, model_dir: str, renames: Mapping[str, str], weights_only: bool) -> None:
    """functuner's load checks on a PEFT directory before peft touches ``model`` (nothing changes here).

    Adapters of a type functuner implements are read with its reader (config
    fields, NaN/inf, the tuner's tensor checks), checked against the model
    (ranks, via the tuner's ``check_model``) and validated (every tensor's
    module and shape).  PEFT's other types get the file checks in
    :func:`functuner.io.peft.load_peft_native`.
    """
    from ..core.params import TunerParams
    from ..functional import validate

    mine = {n: m for n, m in renames.items() if ckpt.is_functuner_peft_type(ckpt.peft_type_of(model_dir, n))}
    found = ckpt.read_adapter_dir(model_dir, mine, weights_only=weights_only)
    if is_peft_model(model):  # its layers are peft's wrappers: peft checks the fit, load_peft_native undoes a failure
        return
    for name, ck in found.items():
        source = f"{ck.path}/{ckpt.CONFIG_NAME}"
        ckpt.check_model(model, ck.config, source)  # the tuner's check (LoRA: ranks) before any allocation
        try:
            validate(model, TunerParams(ck.state, ck.config, name))
        except FunctunerError as e:
            raise type(e)(f"checkpoint {source}: {e}") from None
