"""Optimizer-side methods: GaLore (gradient low-rank projection) and LISA (layerwise importance sampling).

Both train full weights rather than adding adapter tensors, so they live beside the tuners rather than
in the tuner registry:

* :mod:`functuner.optim.galore`: GaLore's math as pure functions and a pure gradient transformation
  (:func:`galore_adamw`), with SWIFT's :class:`GaLoreConfig`;
* :mod:`functuner.optim.torch_optim`: the same as ``torch.optim.Optimizer`` objects for eager loops and
  ``transformers.Trainer`` (:class:`GaLoreAdamW`, :func:`create_galore_optimizer`, per-parameter mode);
* :mod:`functuner.optim.qgalore` / :mod:`functuner.optim.quant`: Q-GaLore's int8 weights (stochastic
  rounding) and low-bit projectors, selected by ``GaLoreConfig(quantize=True, proj_quant=True)``;
* :mod:`functuner.optim.lisa`: LISA's pure layer schedule (:class:`LISASchedule`) and its Trainer callback;
* :mod:`functuner.optim.checkpoint`: full-weight checkpoints (changed weights + config) and their loading;
* :mod:`functuner.optim.base`: the ``init`` / ``update`` transformation shape and its helpers.
"""

from __future__ import annotations

from .base import GradientTransformation, apply_updates, resync_state
from .checkpoint import LoadedCheckpoint, load_checkpoint, merge_checkpoint, read_checkpoint, save_checkpoint
from .galore import GaLoreConfig, adamw, galore_adamw, galore_targets
from .lisa import LISACallback, LISAConfig, LISASchedule, lisa_active_layers
from .qgalore import (
    QGaLoreLinear,
    apply_quantized_updates,
    dequantize_model,
    dequantize_params,
    quantize_model,
    quantize_params,
)
from .quant import QuantizedTensor
from .torch_optim import GaLoreAdamW, PerParameterOptimizer, create_galore_optimizer, galore_param_groups

__all__ = [
    "GaLoreAdamW",
    "GaLoreConfig",
    "GradientTransformation",
    "LISACallback",
    "LISAConfig",
    "LISASchedule",
    "LoadedCheckpoint",
    "PerParameterOptimizer",
    "QGaLoreLinear",
    "QuantizedTensor",
    "adamw",
    "apply_quantized_updates",
    "apply_updates",
    "create_galore_optimizer",
    "dequantize_model",
    "dequantize_params",
    "galore_adamw",
    "galore_param_groups",
    "galore_targets",
    "lisa_active_layers",
    "load_checkpoint",
    "merge_checkpoint",
    "quantize_model",
    "quantize_params",
    "read_checkpoint",
    "resync_state",
    "save_checkpoint",
]
