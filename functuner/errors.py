"""Exception types raised by functuner.

Every error subclasses :class:`FunctunerError` and the built-in type a caller
would naturally catch (``ValueError``, ``TypeError``, ``KeyError``...), so code
written against PEFT or SWIFT keeps working, while new code can catch
functuner's own hierarchy.
"""

from __future__ import annotations


class FunctunerError(Exception):
    """Base class of every exception functuner raises on purpose."""


class ConfigError(FunctunerError, ValueError):
    """A tuner config field has an invalid value (the message names the field)."""


class TargetError(FunctunerError, ValueError):
    """Target-module selection matched nothing, or matched something unusable."""


class UnsupportedModuleError(FunctunerError, TypeError):
    """A targeted module has a type the tuner cannot adapt."""


class ParamsMismatchError(FunctunerError, ValueError):
    """A params pytree does not fit the model (missing module, wrong shape or dtype)."""


class CheckpointError(FunctunerError, ValueError):
    """A checkpoint on disk is missing, malformed or inconsistent (the message names the file)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need unpickling to load; functuner never unpickles."""


class AdapterNameError(FunctunerError, ValueError):
    """An adapter name is empty, unknown, duplicated, or would escape a directory."""


__all__ = [
    "AdapterNameError",
    "CheckpointError",
    "ConfigError",
    "FunctunerError",
    "ParamsMismatchError",
    "TargetError",
    "UnsafeCheckpointError",
    "UnsupportedModuleError",
]
