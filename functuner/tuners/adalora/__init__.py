"""AdaLoRA: the tuner (:mod:`.tuner`) and its rank allocator (:mod:`.allocator`, a pure function of the training state).

``from functuner.tuners import adalora`` gives the config, the pure functions and
``adalora.allocator``; see :mod:`functuner.tuners.adalora.tuner` for the math.
"""

from __future__ import annotations

from . import allocator
from .tuner import (
    PEFT_FORMAT,
    AdaLoraConfig,
    init,
    merge,
    needs_generator,
    orth_regularization,
    routes,
    tuner,
    unmerge,
    validate,
)

__all__ = [
    "PEFT_FORMAT",
    "AdaLoraConfig",
    "allocator",
    "init",
    "merge",
    "needs_generator",
    "orth_regularization",
    "routes",
    "tuner",
    "unmerge",
    "validate",
]
