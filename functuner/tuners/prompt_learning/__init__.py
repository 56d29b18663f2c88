"""PEFT's prompt-learning tuners as native functuner tuners: prompt tuning, P-tuning and prefix tuning.

Each is one module (config + pure functions ending in ``tuner = Tuner(...)``); :mod:`.common` holds the
forward slot and PEFT's checkpoint layout they share.
"""

from __future__ import annotations

from .p_tuning import PromptEncoderConfig
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig

__all__ = ["PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig"]
