"""Resolve a ``model_id`` to a local directory: an existing directory, or a snapshot from one of two hubs.

The one resolver behind ``Swift.from_pretrained``, ``SwiftModel.load_adapter``,
``functuner.load``, ``TunerConfig.from_pretrained`` and the CLI.  Which hub is
always explicit or documented, never guessed from the id:

* ``hf://owner/name`` or ``hub="hf"``: the Hugging Face Hub, through
  ``huggingface_hub.snapshot_download`` (``HF_HOME`` / ``HF_HUB_CACHE`` and
  ``HF_HUB_OFFLINE=1`` work as in every Hugging Face library);
* ``ms://owner/name`` or ``hub="ms"``: ModelScope, through
  ``modelscope.snapshot_download`` (``MODELSCOPE_CACHE``; ``local_files_only=True``
  reads the cache without network);
* a bare ``owner/name``: ModelScope, SWIFT's default, unless the environment sets
  ``USE_HF=1`` (SWIFT's own switch), then the Hugging Face Hub.

A path that looks like a filesystem path never goes to a hub: absolute, starting
with ``./``, ``../`` or ``~``, or whose parent folder exists.  If it is not an
existing directory the error says so at once (no retries, no cache folders left
behind).  Hub failures are re-raised as :class:`~functuner.errors.CheckpointError`
naming the id and the hub.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from ..errors import CheckpointError, ConfigError

__all__ = ["HUBS", "default_hub", "resolve_model_dir", "split_hub"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: accepted spellings of each hub (``hub=`` argument and ``<prefix>://`` of an id)
HUBS: dict[str, str] = {
    "hf": "hf",
    "huggingface": "hf",
    "hugging_face": "hf",
    "ms": "ms",
    "modelscope": "ms",
}
_NAMES = {"hf": "Hugging Face Hub", "ms": "ModelScope hub"}


def default_hub() -> str:
    """The hub of a bare ``owner/name``: ``'ms'`` (SWIFT's default), ``'hf'`` when ``USE_HF`` is set true (as SWIFT)."""
    return "hf" if os.environ.get("USE_HF", "").strip().lower() in ("1", "true", "yes", "on") else "ms"


def _hub_name(hub: str, what: str) -> str:
    key = HUBS.get(hub.strip().lower())
    if key is None:
        raise ConfigError(f"{what}: unknown hub {hub!r}; use one of {sorted(HUBS)}")
    return key


def split_hub(model_id: str, hub: str | None = None) -> tuple[str | None, str]:
    """``(hub or None for a local path, id or path)``: the prefix or ``hub=`` decides, else the rules above."""
    prefix, sep, rest = model_id.partition("://")
    if sep:
        chosen = _hub_name(prefix, f"model id {model_id!r}")
        if hub is not None and _hub_name(hub, "hub=") != chosen:
            raise ConfigError(f"model id {model_id!r} names the {_NAMES[chosen]} but hub={hub!r} was passed")
        return chosen, rest
    if _looks_like_path(model_id):
        return None, model_id
    return (_hub_name(hub, "hub=") if hub is not None else default_hub()), model_id


def _looks_like_path(path: str) -> bool:
    """Absolute, ``./``, ``../``, ``~``, a Windows drive or separator, an existing path, or an existing parent."""
    if os.path.isabs(path) or path.startswith(("./", "../", "~", ".\\", "..\\")) or path in (".", ".."):
        return True
    if "\\" in path or re.match(r"^[A-Za-z]:", path) or os.path.exists(path):
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(parent)


def resolve_model_dir(
    model_id: str | os.PathLike[str],
    revision: str | None = None,
    *,
    hub: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> str:
    """A local directory for ``model_id`` (see the module docstring for which hub, if any).

    An existing directory is returned as is; an existing *file*, or a path that
    does not exist, is a :class:`CheckpointError`.  A hub id (``owner/name``, with
    ``hf://`` / ``ms://`` or ``hub=``) is downloaded, or found in ``cache_dir`` (the
    hub's default cache otherwise) with ``local_files_only=True``.
    """
    raw = os.fspath(model_id)
    if isinstance(model_id, os.PathLike):  # a Path object is a path, whatever it looks like
        where, path = None, raw
    else:
        where, path = split_hub(raw, hub)
    if where is None:
        return _local_dir(path)
    if not _HUB_ID.match(path):
        raise CheckpointError(
            f"{raw!r}: not a {_NAMES[where]} id of the form 'owner/name' (and no such local directory)"
        )
    kwargs: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only}
    if cache_dir is not None:
        kwargs["cache_dir"] = os.fspath(cache_dir)
    if where == "hf":
        return _from_hf(path, kwargs)
    return _from_modelscope(path, kwargs)


def _local_dir(path: str) -> str:
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise CheckpointError(f"{path}: directory is not readable")
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass a checkpoint directory or a hub id")
    raise CheckpointError(
        f"{path}: no such file or directory (a filesystem path, so no hub was asked; for a hub id write 'owner/name',"
        " 'hf://owner/name' or 'ms://owner/name')"
    )


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _from_hf(repo_id: str, kwargs: dict[str, Any]) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise CheckpointError(f"{repo_id!r}: the Hugging Face Hub needs huggingface_hub (pip install it)") from e
    try:
        return str(snapshot_download(repo_id, **kwargs))
    except Exception as e:  # noqa: BLE001 - the hub client raises many types
        raise CheckpointError(f"'hf://{repo_id}': the Hugging Face Hub could not provide it: {_reason(e)}") from e


def _from_modelscope(model_id: str, kwargs: dict[str, Any]) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError as e:  # pragma: no cover - modelscope is a dependency
        raise CheckpointError(f"{model_id!r} is a ModelScope id and modelscope is not installed") from e
    logging.disable(logging.CRITICAL)  # ModelScope logs each retry; the error below says it once
    try:
        return str(snapshot_download(model_id, **kwargs))
    except Exception as e:  # noqa: BLE001 - the hub client raises many types
        raise CheckpointError(f"'ms://{model_id}': the ModelScope hub could not provide it: {_reason(e)}") from e
    finally:
        logging.disable(logging.NOTSET)
