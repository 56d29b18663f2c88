"""Merging adapters into a quantized base: float merged weights, re-quantized layers and the rounding error.

Merge on a quantized base is weight arithmetic on the dequantized weights
(:func:`functuner.merge` does that for every registered quantized layer).  The
float result is exact up to fp32 rounding; storing it back in the base's
format rounds again.  :func:`merge_quantized` returns both, and says how much
the re-quantization moved each merged weight, so the choice between a 16-bit
export and a re-quantized model is an informed one:

* ``weights``: the merged ``{name: tensor}`` state with every quantized
  layer's weight dense (fp32; cast it to bf16/fp16 for a 16-bit export) and its
  packed storage entries dropped, loadable into the float model of the same
  architecture;
* ``layers``: ``{module name: new layer}``, each adapted quantized layer
  re-quantized from its merged float weight (backends that can re-quantize;
  the model itself is not changed);
* ``errors``: ``{module name: RoundingError}``, max absolute and relative
  (Frobenius) error of the re-quantized weight against the float merge.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ..functional import merge as functional_merge
from .registry import kind_of
from .weights import is_storage

__all__ = ["QuantizedMerge", "RoundingError", "merge_quantized"]


class RoundingError(NamedTuple):
    """How far a re-quantized merged weight is from the float merge."""

    max_abs: float  # max |W_requantized - W_float|
    relative: float  # ||W_requantized - W_float||_F / ||W_float||_F


class QuantizedMerge(NamedTuple):
    """What :func:`merge_quantized` returns (see the module docstring)."""

    weights: dict[str, torch.Tensor]
    layers: dict[str, nn.Module]
    errors: dict[str, RoundingError]


def rounding_error(requantized: torch.Tensor, exact: torch.Tensor) -> RoundingError:
    """:class:`RoundingError` of ``requantized`` against ``exact`` (both ``(out, in)``)."""
    diff = requantized.float() - exact.float()
    denom = float(exact.float().norm())
    return RoundingError(float(diff.abs().max()), float(diff.norm()) / denom if denom else float(diff.norm()))


def merge_quantized(model: nn.Module, params: Any, *, requantize: bool = True) -> QuantizedMerge:
    """Merge ``params`` (one params object or a list) into ``model``, which may have quantized layers. Pure.

    Neither the model nor the params change.  ``requantize=False`` skips the
    re-quantized layers (``layers`` and ``errors`` are empty).  A quantized
    layer whose backend cannot re-quantize is left out of ``layers``.
    """
    merged = functional_merge(model, params)
    weights: dict[str, torch.Tensor] = {}
    storage_keys: set[str] = set()
    quantized: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if kind_of(module) is None:
            continue
        quantized[name] = module
        prefix = f"{name}." if name else ""
        storage_keys.update(prefix + k for k, _ in module.named_parameters() if k != "bias")
        storage_keys.update(prefix + k for k, _ in module.named_buffers())
    for key, value in merged.items():
        if key not in storage_keys:
            weights[key] = value
    layers: dict[str, nn.Module] = {}
    errors: dict[str, RoundingError] = {}
    for name, module in quantized.items():
        kind = kind_of(module)
        assert kind is not None
        key = f"{name}.weight" if name else "weight"
        found = merged.get(key)
        adapted = found is not None and not is_storage(module, found)  # a merged float weight, not the storage
        dense = found if found is not None and adapted else None
        if dense is None:
            dense = kind.dequantize(module)
        weights[key] = dense
        if adapted and requantize and kind.requantize is not None:
            layer = kind.requantize(module, dense)
            layers[name] = layer
            errors[name] = rounding_error(kind.dequantize(layer), dense)
    return QuantizedMerge(weights, layers, errors)
