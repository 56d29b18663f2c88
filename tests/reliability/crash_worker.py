"""Worker for the kill tests: forks writers on command so the test can SIGKILL them, or stop them at a step.

Run as ``python crash_worker.py <checkpoint dir> <reference dir> [writer]``
(one writer), or ``python crash_worker.py --multi <checkpoint root> <reference
root>`` (every writer in one process: each command names the writer after
the command word, ``prepare <writer>`` builds one, and its directories are
``<root>/<writer>``).  ``writer`` is one of :data:`WRITERS` (default ``shim``):

* ``shim``: ``SwiftModel.save_pretrained`` (two adapters plus ``extra_states``);
* ``functional``: ``functuner.save(params, dir)``;
* ``distributed``: ``functuner.distributed.save_params_on_rank0`` (one process: rank 0 of a world of one);
* ``convert``: ``functuner convert SRC DIR --to peft --overwrite`` (the CLI's ``main``, in-process);
* ``merge``: ``functuner merge --base BASE --adapter SRC --out DIR --overwrite`` (in-process).

It builds two inputs ``A`` and ``B`` that give different outputs, writes
complete references ``<reference dir>/A`` and ``<reference dir>/B`` with the
writer itself, prints ``ready <median write seconds>``, then reads commands
from stdin:

* ``save A <delay>`` / ``save B <delay>``: fork a child that runs the writer
  into ``<checkpoint dir>``, SIGKILL it after ``delay`` seconds (if still
  running), reap it, and print ``killed`` or ``finished``.
* ``steps A``: run the writer in a child that counts its steps (every file-system
  mutation: open for writing, write-close, mkdir, link, unlink, chmod, fsync,
  rename/replace/exchange, copy, rmtree, safetensors save) and print ``steps <n>``.
* ``stop A <k>``: fork a child that dies (``os._exit``, no cleanup handlers
  run, as under SIGKILL) just before its step ``k``; print ``killed`` or ``finished``.
* ``quit``.

Forking a warmed-up process makes each trial cost milliseconds instead of a
fresh interpreter start; the child does nothing but the write.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rel_common import tiny_llama  # noqa: E402

import functuner as ft  # noqa: E402
from functuner import LoRAConfig, Swift  # noqa: E402

WRITERS = ("shim", "functional", "distributed", "convert", "merge")
STOPPED = 86  # exit status of a child stopped at its step


def _config(which: str, targets: tuple[str, ...] = ("q_proj", "v_proj"), r: int = 4) -> LoRAConfig:
    return LoRAConfig(r=r, lora_alpha=8 if which == "A" else 16, target_modules=list(targets), init_lora_weights=False)


def build_shim(which: str, extra: bool = True, second: bool = True):
    model = tiny_llama()
    torch.manual_seed(1 if which == "A" else 2)
    cfgs = {"default": _config(which)}
    if second:
        cfgs["second"] = _config(which, ("o_proj", "down_proj"), r=2)
    sm = Swift.prepare_model(model, cfgs, extra_state_keys=[r"model\.norm\.weight"] if extra else None)
    if extra:
        with torch.no_grad():
            model.model.norm.weight.add_(0.5 if which == "A" else -0.5)
    return sm


def writer(kind: str, refs: Path) -> Callable[[str, Path], Any]:
    """``write(which, dest)`` for writer ``kind`` (inputs built now, under ``refs`` where they are files)."""
    if kind == "shim":
        models = {w: build_shim(w) for w in "AB"}
        return lambda which, dest: models[which].save_pretrained(dest)
    if kind in ("functional", "distributed"):
        params = {w: ft.init(tiny_llama(), _config(w), generator=1 if w == "A" else 2) for w in "AB"}
        if kind == "functional":
            return lambda which, dest: ft.save(params[which], dest)
        from functuner.distributed import save_params_on_rank0

        return lambda which, dest: save_params_on_rank0(params[which], dest)
    from functuner.cli.main import main

    srcs = {w: refs / f"src-{w}" for w in "AB"}
    for w, src in srcs.items():
        build_shim(w, extra=False, second=kind == "convert").save_pretrained(src)
    if kind == "convert":
        return lambda which, dest: _quiet(main, ["convert", str(srcs[which]), str(dest), "--to", "peft", "--overwrite"])
    assert kind == "merge", kind
    base = refs / "base"
    tiny_llama().save_pretrained(base)
    return lambda which, dest: _ok(
        main(
            ["merge", "--base", str(base), "--adapter", str(srcs[which]), "--out", str(dest), "--overwrite", "--quiet"]
        )
    )


def _quiet(main: Callable[[list[str]], int], argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # stdout is the command channel
        _ok(main(argv))


def _ok(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"the CLI exited {rc}")


# ---------------------------------------------------------------------------
# step boundaries: every file-system mutation is a step
# ---------------------------------------------------------------------------
def install_steps(stop_at: int | None) -> list[int]:
    """Wrap the file-system calls writers use; the process dies just before step ``stop_at``. Returns the counter."""
    import safetensors.torch

    import functuner.core.fs as fs_mod
    import functuner.io.checkpoint as ckpt_mod

    count = [0]

    def tick() -> None:
        count[0] += 1
        if count[0] == stop_at:
            os._exit(STOPPED)

    def wrap(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def stepped(*a: Any, **kw: Any) -> Any:
            tick()
            return real(*a, **kw)

        setattr(owner, name, stepped)

    for name in ("replace", "rename", "link", "unlink", "mkdir", "rmdir", "chmod", "fchmod", "fsync", "makedirs"):
        wrap(os, name)
    for name in ("copyfile", "copy2", "copytree", "rmtree"):
        wrap(shutil, name)
    wrap(tempfile, "mkdtemp")
    wrap(tempfile, "mkstemp")
    wrap(fs_mod, "exchange")
    wrap(safetensors.torch, "save_file")
    if hasattr(ckpt_mod, "save_file"):
        wrap(ckpt_mod, "save_file")
    real_open = builtins.open

    def stepped_open(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
        if any(c in mode for c in "wax+"):
            tick()
        return real_open(file, mode, *a, **kw)

    builtins.open = stepped_open
    io.open = stepped_open  # pathlib opens through io.open
    return count


def _child(run: Callable[[], Any], stop_at: int | None = None, count_to: Path | None = None) -> int:
    pid = os.fork()
    if pid == 0:  # the writer: nothing but the write, then exit without cleanup handlers
        code = 0
        try:
            count = install_steps(stop_at) if (stop_at is not None or count_to is not None) else None
            run()
            if count_to is not None and count is not None:
                count_to.write_text(str(count[0]))
        except BaseException:  # noqa: BLE001 - a failed write is reported as such
            code = 3
        finally:
            os._exit(code)
    return pid


def _prepare(kind: str, ck: Path, refs: Path) -> tuple[Callable[[str, Path], Any], float]:
    """Build writer ``kind``, write both references with it, and time it (median of five writes)."""
    refs.mkdir(parents=True, exist_ok=True)
    write = writer(kind, refs)
    for w in "AB":
        write(w, refs / w)
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        write("AB"[i % 2], refs / "scratch")
        times.append(time.perf_counter() - t0)
    return write, statistics.median(times)


def _run(command: str, which: str, arg: str | None, write: Callable[[str, Path], Any], ck: Path, refs: Path) -> str:
    """One command of the protocol (module docstring); returns the answer line."""
    if command in ("steps", "stop"):
        # Debris of an earlier killed trial would be removed by the write (functuner.core.fs removes dead
        # writers' leftovers first) and shift step k away from step k of the write itself: clear it here.
        for leftover in sorted(ck.parent.rglob(".*.tmp-*"), key=lambda p: -len(p.parts)):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
    if command == "steps":
        out = refs / "step-count"
        pid = _child(lambda: write(which, ck), count_to=out)
        _, status = os.waitpid(pid, 0)
        ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        return f"steps {out.read_text()}" if ok else f"failed {status}"
    if command == "stop":
        assert arg is not None
        pid = _child(lambda: write(which, ck), stop_at=int(arg))
        _, status = os.waitpid(pid, 0)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        return {STOPPED: "killed", 0: "finished"}.get(code, f"failed {status}")
    assert command == "save" and arg is not None, command
    delay = float(arg)
    pid = _child(lambda: write(which, ck))
    deadline = time.perf_counter() + delay
    status = None
    while time.perf_counter() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        time.sleep(min(0.0005, max(0.0, deadline - time.perf_counter())))
    if status is None:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    return "finished" if os.WEXITSTATUS(status) == 0 else f"failed {status}"


def main() -> None:
    if sys.argv[1] == "--multi":  # every writer, one process: commands name the writer
        ck_root, refs_root = Path(sys.argv[2]), Path(sys.argv[3])
        ready: dict[str, Callable[[str, Path], Any]] = {}
        for line in sys.stdin:
            parts = line.split()
            if not parts or parts[0] == "quit":
                break
            command, kind = parts[0], parts[1]
            if command == "prepare":
                ready[kind], seconds = _prepare(kind, ck_root / kind, refs_root / kind)
                print(f"ready {seconds:.6f}", flush=True)
                continue
            which, arg = parts[2], (parts[3] if len(parts) > 3 else None)
            print(_run(command, which, arg, ready[kind], ck_root / kind, refs_root / kind), flush=True)
        return
    ck, refs = Path(sys.argv[1]), Path(sys.argv[2])  # one writer: commands without the writer's name
    kind = sys.argv[3] if len(sys.argv) > 3 else "shim"
    write, seconds = _prepare(kind, ck, refs)
    print(f"ready {seconds:.6f}", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        print(_run(parts[0], parts[1], parts[2] if len(parts) > 2 else None, write, ck, refs), flush=True)


if __name__ == "__main__":
    main()
