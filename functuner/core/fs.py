"""File-system mechanics every checkpoint reader and writer shares: atomic directory swaps, safe JSON, containment.

* :func:`atomic_dir` builds a directory in a temporary sibling and puts it at
  the target in **one** atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``;
  a plain ``rename`` when the target does not exist yet).  A process killed at
  any point leaves either the old directory or the complete new one at the
  target, never a mix.  A killed write leaves a hidden
  ``.<name>.tmp-<host>-<pid>-*`` sibling; the next write of the same target
  removes such leftovers of processes on this host that no longer run (never
  those of a live process, so concurrent writers are safe).
  Where the OS has no exchange, the fallback is two renames (a kill between
  them leaves the target missing and the old content in a ``.<name>.old-*``
  sibling).
* Files and folders written here respect the process umask (``0644`` /
  ``0755`` under umask ``022``), as ``PeftModel.save_pretrained`` does, even
  though ``tempfile`` creates them private.
* :func:`read_json` reads a JSON object and raises
  :class:`~functuner.errors.CheckpointError` naming the file for anything else.
* :func:`check_inside` refuses a path that resolves (symlinks followed) outside
  a root directory.

Errors are :class:`~functuner.errors.CheckpointError` naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = [
    "atomic_dir",
    "atomic_write_text",
    "check_inside",
    "copy_plain_files",
    "exchange",
    "fsync_tree",
    "read_json",
    "sweep_leftovers",
    "umask",
    "write_json",
]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_umask_lock = threading.Lock()


def _tmp_prefix(name: str) -> str:
    """``.<name>.tmp-<host>-<pid>-``: the temporary sibling's name says who made it (fits NAME_MAX)."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
    return f".{name[:96]}.tmp-{host}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists
        return True
    return True


def sweep_leftovers(parent: Path, name: str) -> None:
    """Remove ``.<name>.tmp-<host>-<pid>-*`` siblings left by killed writers of this host (dead pids only)."""
    mine = _tmp_prefix(name)
    stem = mine[: mine.rindex("-", 0, len(mine) - 1) + 1]  # ".<name>.tmp-<host>-"
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(stem):
            continue
        pid = entry[len(stem) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path = parent / entry
        if path.is_symlink() or not path.is_dir():
            with contextlib.suppress(OSError):
                path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)


def umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows (else set and restored under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def check_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` if ``path`` resolves (symlinks followed) outside ``root``."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise CheckpointError(f"{path} resolves to {real}, outside the checkpoint directory {real_root}")


def read_json(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The JSON object in ``path`` (inside ``root`` when given); :class:`CheckpointError` naming the file otherwise."""
    path = Path(path)
    if root is not None:
        check_inside(path, root)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); expected a UTF-8 JSON object") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_json(data: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``data`` as indented, key-sorted JSON (a new file, mode from the umask); for use inside :func:`atomic_dir`."""
    Path(path).unlink(missing_ok=True)  # never write through a hard link into a previous checkpoint
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace the file ``path`` with ``text`` in one rename (temp file beside it, fsynced, mode from the umask)."""
    path = Path(path)
    sweep_leftovers(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return bool(fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0)


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """fsync every file and folder under ``folder`` (so a rename after it publishes complete data)."""
    for dirpath, _, files in os.walk(folder):
        for name in [*files, "."]:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` at ``dst`` (no data copied); copy where the file system cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_plain_files(src: str | os.PathLike[str], dst: str | os.PathLike[str], skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the regular files directly in ``src`` into ``dst``; returns their names.

    Symlinks (which could point anywhere, e.g. ``README.md -> /etc/hostname``),
    folders, hidden files and names in ``skip`` are not copied.
    """
    src, dst = Path(src), Path(dst)
    copied = []
    for entry in sorted(os.listdir(src)):
        p = src / entry
        if entry.startswith(".") or entry in skip or p.is_symlink() or not p.is_file():
            continue
        (dst / entry).unlink(missing_ok=True)  # may be a hard link into a previous checkpoint
        shutil.copyfile(p, dst / entry)
        copied.append(entry)
    return copied


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike[str],
    *,
    start_from_existing: bool = False,
    link_existing: bool = False,
    overwrite: bool = True,
) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then put it at ``target`` in one atomic step.

    Yields the temporary directory (a copy of ``target`` when
    ``start_from_existing``; with ``link_existing`` the copy hard-links the
    files instead, so the caller must only *replace* files there, never write
    into them).  On normal exit the tree is fsynced and exchanged with
    ``target`` (the old content is removed afterwards); on an exception the
    temporary directory is deleted and ``target`` is untouched.  A symlinked
    ``target``, a file at ``target``, or an existing ``target`` without
    ``overwrite`` is refused before anything is written.
    """
    target = Path(target)
    if target.is_symlink():
        raise CheckpointError(f"{target} is a symlink; refusing to write through it")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target}: already exists (pass --overwrite to replace it)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(target.parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target.name), dir=target.parent))
    except OSError as e:
        raise CheckpointError(f"{target.parent}: cannot create a directory there ({e.strerror})") from None
    try:
        if start_from_existing and target.is_dir():
            shutil.rmtree(tmp)
            shutil.copytree(target, tmp, symlinks=True, copy_function=_link_or_copy if link_existing else shutil.copy2)
        else:
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700; the result must look like any new folder
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            if not exchange(tmp, target):
                old = target.parent / f".{target.name[:96]}.old-{uuid.uuid4().hex}"
                os.replace(target, old)
                os.replace(tmp, target)
                tmp = old
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous content
        else:
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
