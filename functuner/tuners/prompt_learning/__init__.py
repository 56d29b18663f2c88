"""PEFT's prompt-learning tuners as native functuner tuners: prompt tuning and P-tuning.

Each is one module (config + pure functions ending in ``tuner = Tuner(...)``); :mod:`.common` holds the
forward slot and PEFT's checkpoint layout they share.  PEFT's prefix tuning is not implemented here
(``Swift.prepare_model`` still runs ``peft.PrefixTuningConfig`` through ``peft``).
"""

from __future__ import annotations

from .p_tuning import PromptEncoderConfig
from .prompt_tuning import PromptTuningConfig

__all__ = ["PromptEncoderConfig", "PromptTuningConfig"]
