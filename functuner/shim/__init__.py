"""The SWIFT-compatible stateful shim: ``Swift``, ``SwiftModel``, ``SwiftConfig`` (state + delegation to the core)."""

from __future__ import annotations

from .swift import Swift, SwiftConfig, SwiftModel

__all__ = ["Swift", "SwiftConfig", "SwiftModel"]
