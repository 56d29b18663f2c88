"""Checkpoints of GaLore / Q-GaLore / LISA training: the changed full weights plus the method's config.

The files are :mod:`functuner.io.full_weights`' layout (``full_weights_config.json`` and a sharded or
single ``model.safetensors``, keys named as ``model.named_parameters()``); this module adds what the
disk layer does not know: the method's config class (``GaLoreConfig`` or ``LISAConfig``, rebuilt with
unknown keys refused), Q-GaLore's int8 weights (saved dequantized, in their float dtype; re-quantized
when loaded), and the shim (a ``SwiftModel`` loads into its wrapped model).

* :func:`save_checkpoint` ``(model or weights, directory, config, base=...)``: only the weights that
  differ from ``base`` (when given) are written, atomically;
* :func:`read_checkpoint`: the checked tensors and the config object;
* :func:`merge_checkpoint`: the functional load, ``merge`` = replace, returns new weights;
* :func:`load_checkpoint`: the in-place load into an ``nn.Module`` or a ``SwiftModel``; everything is
  checked (keys, shapes, finite values) before the first weight changes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import CheckpointError, FunctunerError
from ..io.full_weights import (
    CONFIG_NAME,
    FullWeightsCheckpoint,
    check_fits,
    read_full_weights,
    write_full_weights,
)
from ..shim.swift import SwiftModel
from .galore import GaLoreConfig
from .lisa import LISAConfig
from .qgalore import QGaLoreLinear
from .quant import QuantizedTensor, dequantize, quantize

__all__ = ["METHODS", "LoadedCheckpoint", "load_checkpoint", "merge_checkpoint", "read_checkpoint", "save_checkpoint"]

METHODS: dict[str, type] = {"galore": GaLoreConfig, "lisa": LISAConfig}


class LoadedCheckpoint(NamedTuple):
    """A read checkpoint: the method's config object (``None`` for method ``"full"``) and the checked files."""

    config: GaLoreConfig | LISAConfig | None
    checkpoint: FullWeightsCheckpoint


def _method(config: Any) -> tuple[str, dict[str, Any]]:
    if config is None:
        return "full", {}
    for name, cls in METHODS.items():
        if type(config) is cls:
            return name, dataclasses.asdict(config)  # type: ignore[call-overload]
    raise CheckpointError(
        f"save_checkpoint: config must be a GaLoreConfig, a LISAConfig or None, got {type(config).__name__}"
    )


def _dense(weights: nn.Module | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Float weights by ``named_parameters`` name (Q-GaLore's int8 weights dequantized)."""
    if isinstance(weights, SwiftModel):
        weights = weights.model
    if isinstance(weights, nn.Module):
        int8 = {f"{n}.weight": m for n, m in weights.named_modules() if isinstance(m, QGaLoreLinear)}
        return {n: (int8[n].dequantized_weight() if n in int8 else p.detach()) for n, p in weights.named_parameters()}
    return {n: (dequantize(t) if isinstance(t, QuantizedTensor) else t) for n, t in weights.items()}


def save_checkpoint(
    weights: nn.Module | Mapping[str, Any],
    directory: str | os.PathLike[str],
    config: GaLoreConfig | LISAConfig | None = None,
    *,
    base: nn.Module | Mapping[str, Any] | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = True,
) -> Path:
    """Save the full weights of a model (or a ``{name: tensor}`` pytree) that differ from ``base``.

    ``base`` (the model or weights before training) selects the changed weights; without it every
    given weight is saved.  ``config`` is recorded (``method`` ``"galore"`` or ``"lisa"``; ``None`` is
    ``"full"``).  Written atomically; raises :class:`~functuner.errors.CheckpointError` when nothing changed.
    """
    method, method_config = _method(config)
    dense = _dense(weights)
    if base is not None:
        before = _dense(base)
        absent = sorted(set(dense) - set(before))
        if absent:
            raise CheckpointError(f"save_checkpoint: {absent[:3]} are not weights of base; pass the untrained model")
        dense = {n: t for n, t in dense.items() if not torch.equal(t.to(before[n].device), before[n])}
    return write_full_weights(
        dense, directory, method=method, method_config=method_config, max_shard_size=max_shard_size, overwrite=overwrite
    )


def read_checkpoint(directory: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Read and check a checkpoint; the method's config is rebuilt (unknown keys raise CheckpointError)."""
    ckpt = read_full_weights(directory)
    source = Path(ckpt.path) / CONFIG_NAME
    if ckpt.method == "full":
        return LoadedCheckpoint(None, ckpt)
    cls = METHODS.get(ckpt.method)
    if cls is None:
        raise CheckpointError(f"{source}: key 'method' is {ckpt.method!r}; known: {['full', *METHODS]}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(ckpt.method_config) - fields)
    if unknown:
        raise CheckpointError(f"{source}: method_config key {unknown[0]!r} is not a {cls.__name__} field")
    try:
        config = cls(**ckpt.method_config)
    except (FunctunerError, TypeError) as e:
        raise CheckpointError(f"{source}: method_config is not a valid {cls.__name__} ({e})") from None
    return LoadedCheckpoint(config, ckpt)


def _as_checkpoint(source: str | os.PathLike[str] | LoadedCheckpoint) -> FullWeightsCheckpoint:
    return source.checkpoint if isinstance(source, LoadedCheckpoint) else read_checkpoint(source).checkpoint


def merge_checkpoint(weights: Mapping[str, Any], source: str | os.PathLike[str] | LoadedCheckpoint) -> dict[str, Any]:
    """The functional load (``merge`` = replace): new weights with the checkpoint's tensors in place.

    Each replaced leaf keeps its dtype and device; a Q-GaLore int8 leaf is re-quantized (round to
    nearest, its own group size).  ``weights`` is not modified; a key or shape that does not fit raises
    :class:`~functuner.errors.CheckpointError` first.
    """
    ckpt = _as_checkpoint(source)
    check_fits(ckpt, weights, "the weights")
    out = dict(weights)
    for k, t in ckpt.tensors.items():
        old = weights[k]
        if isinstance(old, QuantizedTensor):
            out[k] = quantize(t.to(device=old.device, dtype=old.dtype), bits=old.bits, group_size=old.group_size)
        else:
            out[k] = t.to(device=old.device, dtype=old.dtype)
    return out


def load_checkpoint(model: nn.Module, source: str | os.PathLike[str] | LoadedCheckpoint) -> tuple[str, ...]:
    """Load a checkpoint into ``model`` (an ``nn.Module`` or a ``SwiftModel``) in place; returns the keys.

    A ``SwiftModel`` loads into the model it wraps (its adapters stay); one with merged adapters is
    refused (unmerging afterwards would subtract the adapters from the wrong weights).  Q-GaLore int8
    layers are re-quantized from the loaded values.  Nothing changes when any check fails.
    """
    ckpt = _as_checkpoint(source)
    inner = model
    if isinstance(model, SwiftModel):
        merged = list(model._state.merged)  # noqa: SLF001 - the shim's own record of merged adapters
        if merged:
            raise CheckpointError(
                f"{ckpt.path}: the SwiftModel has merged adapters {merged}; Swift.unmerge(model) before loading"
                " full weights into it"
            )
        inner = model.model
    own: dict[str, Any] = dict(inner.named_parameters())
    own.update(dict(inner.named_buffers()))
    check_fits(ckpt, own, type(inner).__name__)
    int8 = {f"{n}.weight": m for n, m in inner.named_modules() if isinstance(m, QGaLoreLinear)}
    with torch.no_grad():
        for k, t in ckpt.tensors.items():
            if k in int8:
                int8[k].set_weight(t.to(int8[k].weight.device), stochastic=False, generator=None)
            else:
                own[k].copy_(t)
    return tuple(ckpt.tensors)
