"""The ``functuner`` console script (:func:`main`) and its demo."""

from __future__ import annotations

from .main import main

__all__ = ["main"]
