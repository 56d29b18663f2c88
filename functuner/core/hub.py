"""Resolve a ``model_id`` to a local directory: an existing directory, or a ModelScope hub snapshot.

Hub ids are fetched with ``modelscope.snapshot_download`` (the real client;
``local_files_only=True`` reads a pre-filled cache without network, which is
how the tests run offline).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from ..errors import CheckpointError

__all__ = ["resolve_model_dir"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(
    model_id: str | os.PathLike[str],
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> str:
    """A local directory for ``model_id``.

    An existing directory is returned as is.  An existing *file* is an error
    (:class:`CheckpointError`).  Anything else is taken as a ModelScope hub id
    (``owner/name``) and downloaded (or found in ``cache_dir`` with
    ``local_files_only=True``) with ``modelscope.snapshot_download``; hub
    failures are re-raised as :class:`CheckpointError` naming the id.
    """
    path = os.fspath(model_id)
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise CheckpointError(f"{path}: directory is not readable")
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass a checkpoint directory or a hub id")
    if not _HUB_ID.match(path):
        raise CheckpointError(f"{path}: no such file or directory (and not a ModelScope id of the form 'owner/name')")
    try:
        from modelscope import snapshot_download
    except ImportError as e:  # pragma: no cover - modelscope is a dependency
        raise CheckpointError(f"{path!r} is not a local directory and modelscope is not installed") from e
    kwargs: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only}
    if cache_dir is not None:
        kwargs["cache_dir"] = os.fspath(cache_dir)
    logging.disable(logging.CRITICAL)  # ModelScope logs each retry; the error below says it once
    try:
        return str(snapshot_download(path, **kwargs))
    except Exception as e:  # noqa: BLE001 - the hub client raises many types
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path!r} is not a local directory and the ModelScope hub could not provide it: {reason}"
        ) from e
    finally:
        logging.disable(logging.NOTSET)
