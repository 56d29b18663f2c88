"""The SWIFT-compatible stateful shim: ``Swift``, ``SwiftModel``, ``SwiftConfig`` (state + delegation to the core).

Also what a ``transformers.Trainer`` / TRL user needs around it: :class:`SwiftCheckpointCallback` and
:class:`SwiftTrainerMixin` (adapter directories in checkpoints), :class:`TrainingStepCallback` (AdaLoRA's
``update_and_allocate`` after each optimizer step), :func:`to_peft_config` (a functuner LoRA
config as PEFT's, for ``SFTTrainer(peft_config=...)``), :func:`reference_model` (TRL's ``ref_model=``).
"""

from __future__ import annotations

from .peft_names import to_peft_config
from .swift import Swift, SwiftConfig, SwiftModel
from .trainer import SwiftCheckpointCallback, SwiftTrainerMixin, reference_model
from .training import TrainingStepCallback

__all__ = [
    "Swift",
    "SwiftCheckpointCallback",
    "SwiftConfig",
    "SwiftModel",
    "SwiftTrainerMixin",
    "TrainingStepCallback",
    "reference_model",
    "to_peft_config",
]
