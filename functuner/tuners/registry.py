"""The tuner registry: which :class:`~functuner.tuners.base.Tuner` handles a config class or a SWIFT type name.

Kept apart from :mod:`functuner.tuners.base` (and importing nothing from it at run time) so that config
JSON reading (:mod:`functuner.tuners.config_json`) can look tuners up without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .spec import Tuner

__all__ = ["REGISTRY", "register", "tuner_for"]

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
