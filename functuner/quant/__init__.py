"""Quantized base models (QLoRA): which quantized linear layers functuner adapts, merges and exports.

Registered kinds (one module per backend): bitsandbytes ``Linear4bit`` /
``Linear8bitLt`` (:mod:`.bnb`), torchao int8 weight-only tensors
(:mod:`.torchao`), optimum-quanto ``QLinear`` (:mod:`.quanto`), HQQ
``HQQLinear`` (:mod:`.hqq`).  Every other quantized layer is refused with
:class:`~functuner.errors.UnsupportedModuleError` before anything changes
(:func:`check_supported`).

* LoRA / DoRA read a quantized layer's true shape and its dequantized weight
  (:mod:`.weights`); adapters default to fp32 there, as PEFT's
  ``autocast_adapter_dtype=True``.
* :func:`merge_quantized`: float merged weights, re-quantized layers and the
  rounding error (:mod:`.merge`); the shim's merge swaps a re-quantized weight
  in and the original storage back on unmerge (exact).
* :func:`prepare_model_for_kbit_training` / :func:`kbit_training_plan`:
  PEFT's preparation for k-bit training (:mod:`.kbit`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .kbit import KbitPlan, kbit_training_plan, prepare_model_for_kbit_training
    from .kind import QuantKind
    from .merge import QuantizedMerge, RoundingError, merge_quantized, rounding_error
    from .registry import check_supported, is_quantized, kind_of, looks_quantized
    from .weights import dense_weight, weight_shape

# names resolved on first use: tuners import functuner.quant.registry / .weights while functuner.functional
# (which .merge imports) is still initialising, so this package must not import .merge eagerly
_EXPORTS = {
    "KbitPlan": "kbit",
    "kbit_training_plan": "kbit",
    "prepare_model_for_kbit_training": "kbit",
    "QuantKind": "kind",
    "QuantizedMerge": "merge",
    "RoundingError": "merge",
    "merge_quantized": "merge",
    "rounding_error": "merge",
    "check_supported": "registry",
    "is_quantized": "registry",
    "kind_of": "registry",
    "looks_quantized": "registry",
    "dense_weight": "weights",
    "weight_shape": "weights",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'functuner.quant' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "KbitPlan",
    "QuantKind",
    "QuantizedMerge",
    "RoundingError",
    "check_supported",
    "dense_weight",
    "is_quantized",
    "kbit_training_plan",
    "kind_of",
    "looks_quantized",
    "merge_quantized",
    "prepare_model_for_kbit_training",
    "rounding_error",
    "weight_shape",
]
