"""Adapter-name rules shared by the functional API, the shim and checkpoints."""

from __future__ import annotations

import re

from ..errors import AdapterNameError

__all__ = ["MAX_NAME_BYTES", "check_adapter_name"]

_OK = re.compile(r"[A-Za-z0-9_\-]+")
#: the longest adapter name: one path component (NAME_MAX on Linux, macOS and Windows file systems)
MAX_NAME_BYTES = 255


def check_adapter_name(name: object) -> str:
    """Return ``name`` if it is a usable adapter name, else raise :class:`AdapterNameError`.

    Allowed: letters, digits, ``_`` and ``-``; no ``.`` (it separates key parts),
    no path separators, no NUL, not empty, at most :data:`MAX_NAME_BYTES` bytes: a name is
    also a sub-directory of a checkpoint, so it must be one path component and never escape it.
    """
    if not isinstance(name, str) or not name:
        raise AdapterNameError(f"adapter name must be a non-empty string, got {name!r}")
    if ".." in name or not _OK.fullmatch(name):
        raise AdapterNameError(f"adapter name {name!r} is not allowed: use letters, digits, '_' and '-' only")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise AdapterNameError(
            f"adapter name {name[:40]!r}... is {len(name.encode())} bytes long; a name is a folder name, at most"
            f" {MAX_NAME_BYTES} bytes on common file systems"
        )
    return name
