"""The tuner registry: one line per tuner, keyed by config class and by SWIFT type name."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import CallContext, Tuner, TunerConfig
from .lora import tuner as lora

__all__ = ["REGISTRY", "CallContext", "Tuner", "TunerConfig", "register", "tuner_for"]

REGISTRY: dict[str, Tuner] = {}


def register(t: Tuner) -> Tuner:
    """Add a tuner (idempotent for the same config class)."""
    REGISTRY[t.swift_type] = t
    return t


def tuner_for(config: Any) -> Tuner:
    """The tuner whose config class ``config`` is an instance of (or whose SWIFT type name it is)."""
    if isinstance(config, str):
        for key, t in REGISTRY.items():
            if key.lower() == config.lower():
                return t
        raise ConfigError(f"unknown swift_type {config!r}; known: {sorted(REGISTRY)}")
    for t in REGISTRY.values():
        if type(config) is t.config_cls:
            return t
    for t in REGISTRY.values():
        if isinstance(config, t.config_cls):
            return t
    raise ConfigError(
        f"no functuner tuner takes a {type(config).__name__}; known configs: "
        f"{sorted(t.config_cls.__name__ for t in REGISTRY.values())}"
    )


register(lora.tuner)

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
