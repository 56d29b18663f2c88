"""The tuner registry: one line per tuner, keyed by config class and by SWIFT type name."""

from __future__ import annotations

from .base import CallContext, Tuner, TunerConfig
from .lora.tuner import tuner as _lora_tuner
from .registry import REGISTRY, register, tuner_for
from .sub_batch import SUB_BATCH, choose_per_sample, per_sample_types, why_not_per_sample

__all__ = [
    "REGISTRY",
    "SUB_BATCH",
    "CallContext",
    "Tuner",
    "TunerConfig",
    "choose_per_sample",
    "per_sample_types",
    "register",
    "tuner_for",
    "why_not_per_sample",
]

register(_lora_tuner)

from . import longlora  # noqa: E402

register(longlora.tuner)

from . import reft  # noqa: E402

register(reft.tuner)

from . import llamapro  # noqa: E402

register(llamapro.tuner)

from . import scetuning  # noqa: E402

register(scetuning.tuner)

from . import restuning  # noqa: E402

register(restuning.tuner)

from . import adapter, neftune, part, prompt, side  # noqa: E402

register(adapter.tuner)
register(prompt.tuner)
register(side.tuner)
register(part.tuner)
register(neftune.tuner)

from . import ia3, loha, lokr  # noqa: E402

register(ia3.tuner)
register(loha.tuner)
register(lokr.tuner)

from . import adalora, boft, fourierft, oft, trainable_tokens, vera  # noqa: E402

register(vera.tuner)
register(fourierft.tuner)
register(oft.tuner)
register(boft.tuner)
register(adalora.tuner)
register(trainable_tokens.tuner)

from .prompt_learning import p_tuning, prefix_tuning, prompt_tuning  # noqa: E402

register(prompt_tuning.tuner)
register(p_tuning.tuner)
register(prefix_tuning.tuner)
