"""Leftovers of killed writers (functuner/core/fs.py): the next write of a target removes those of dead processes.

A killed ``atomic_dir``/``atomic_write_text`` leaves a hidden ``.<name>.tmp-<host>-<pid>-*``
sibling.  The next write of the same target removes the ones whose writer (same host) no
longer runs, and never touches those of a live process, of another host, or of another name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from functuner.core import fs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(parent: Path, name: str, pid: int, host: str | None = None, folder: bool = True) -> Path:
    prefix = fs._tmp_prefix(name)
    if host is not None:
        prefix = prefix.replace(prefix.split(".tmp-", 1)[1].rsplit("-", 2)[0], host, 1)
    path = parent / f"{prefix.rsplit('-', 2)[0]}-{pid}-abc123"
    if folder:
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"partial")
    else:
        path.write_text("partial")
    return path


def test_next_write_removes_dead_writers_leftovers_only(tmp_path: Path) -> None:
    target = tmp_path / "ck"
    dead = _leftover(tmp_path, "ck", _dead_pid())
    live = _leftover(tmp_path, "ck", os.getpid())
    other_host = _leftover(tmp_path, "ck", _dead_pid(), host="someotherhost")
    other_name = _leftover(tmp_path, "other", _dead_pid())
    with fs.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert not dead.exists()
    assert live.exists() and other_host.exists() and other_name.exists()


def test_file_writes_remove_dead_writers_temp_files(tmp_path: Path) -> None:
    dead = _leftover(tmp_path, "config.json", _dead_pid(), folder=False)
    fs.atomic_write_text(tmp_path / "config.json", "{}\n")
    assert (tmp_path / "config.json").read_text() == "{}\n"
    assert not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_temporary_names_say_host_and_pid(tmp_path: Path) -> None:
    seen: list[str] = []
    with fs.atomic_dir(tmp_path / "ck") as tmp:
        seen.append(tmp.name)
    assert seen[0].startswith(".ck.tmp-") and f"-{os.getpid()}-" in seen[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
