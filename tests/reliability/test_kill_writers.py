"""Kill tests for every writer (issue 20): a kill at any point leaves the old directory or the complete new one.

Writers: ``SwiftModel.save_pretrained`` (shim), ``functuner.save``
(functional), ``functuner.distributed.save_params_on_rank0`` (rank-0 save),
and the console script's ``convert`` and ``merge`` (see
tests/reliability/crash_worker.py, which holds two inputs ``A`` and ``B``
and their complete outputs).  With ``A`` on disk, each trial writes ``B`` over
it and is stopped:

* **at every step boundary** (fault injection): the child dies with
  ``os._exit`` (no cleanup, as under SIGKILL) just before its k-th file-system
  mutation, for every k from 1 to the number of steps the write takes;
* **at random points**: SIGKILL after a uniform random delay in
  [0, 1.5 x the measured write time] (30 kills; ``FUNCTUNER_FULL=1``: 300).

After each trial the directory must be byte-for-byte the complete ``A`` or the
complete ``B`` (every file, and no other file); a write that finished must
have left ``B``.  Hidden ``.<name>.tmp-*`` folders a killed write leaves
beside the swapped folder are debris no reader looks at (readers skip hidden
entries; the next write of that folder is unaffected); they are counted, not
compared.  One worker process serves every writer (its start-up is the
expensive part).  (SIGKILL of ``save_pretrained`` is also tested with more
checks, loading included, in test_crash_during_save.py; here it gets the
step-boundary kills.)
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "crash_worker.py"
TRIALS = 300 if os.environ.get("FUNCTUNER_FULL") == "1" else 30
WRITERS = ("shim", "functional", "distributed", "convert", "merge")


def _files(root: Path) -> dict[str, bytes]:
    """Every visible file under ``root`` (hidden debris of killed writes skipped)."""
    if not root.is_dir():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = p.read_bytes()
    return out


class Worker:
    """The one worker process, serving every writer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--multi", str(root / "ck"), str(root / "refs")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, f"the worker died on {line!r}"
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(tmp_path_factory.mktemp("kills"))
    yield w
    w.close()


class Session:
    """One writer of the worker, with ``A`` on disk at the start."""

    def __init__(self, worker: Worker, kind: str) -> None:
        self.worker, self.kind = worker, kind
        self.ck = worker.root / "ck" / kind
        ready = worker.ask(f"prepare {kind}").split()
        assert ready[0] == "ready", ready
        self.write_s = float(ready[1])
        self.ref = {w: _files(worker.root / "refs" / kind / w) for w in "AB"}
        assert self.ref["A"] and self.ref["A"] != self.ref["B"]
        assert self.ask("save A 600") == "finished"
        assert self.on_disk("first write") == "A"

    def ask(self, line: str) -> str:
        command, rest = line.split(" ", 1)
        return self.worker.ask(f"{command} {self.kind} {rest}")

    def on_disk(self, what: str) -> str:
        now = _files(self.ck)
        matches = [w for w in "AB" if now == self.ref[w]]
        if len(matches) != 1:
            diff = {
                w: sorted(set(now) ^ set(self.ref[w]) | {k for k in now if self.ref[w].get(k) != now[k]}) for w in "AB"
            }
            raise AssertionError(f"{what}: the directory is neither complete checkpoint; differs: {diff}")
        return matches[0]

    def ensure_a(self) -> None:
        if self.on_disk("before a trial") != "A":
            assert self.ask("save A 600") == "finished"
            assert self.on_disk("restoring A") == "A"

    def debris(self) -> int:
        return sum(1 for p in self.ck.parent.rglob(".*tmp-*") if p.is_dir())


_sessions: dict[str, Session] = {}


def session(worker: Worker, kind: str) -> Session:
    if kind not in _sessions:
        _sessions[kind] = Session(worker, kind)
    return _sessions[kind]


@pytest.mark.parametrize("kind", WRITERS)
def test_a_kill_at_every_step_boundary_leaves_old_or_new(kind: str, worker: Worker) -> None:
    s = session(worker, kind)
    s.ensure_a()
    answer = s.ask("steps B")
    assert answer.startswith("steps "), answer
    total = int(answer.split()[1])
    assert total >= 5, total
    seen = {"A": 0, "B": 0}
    for k in range(1, total + 1):
        s.ensure_a()
        result = s.ask(f"stop B {k}")
        assert result == "killed", f"step {k} of {total}: {result}"
        seen[s.on_disk(f"{kind}: killed before step {k} of {total}")] += 1
    s.ensure_a()
    assert s.ask(f"stop B {total + 1}") == "finished"
    assert s.on_disk("after a complete write") == "B"
    # both outcomes happen: the swap is one of the steps, and the old content is kept up to it
    assert seen["A"] >= 1 and seen["B"] >= 1, seen
    print(f"{kind}: {total} steps, killed before each: old {seen['A']}, new {seen['B']}; debris {s.debris()}")


@pytest.mark.parametrize("kind", [w for w in WRITERS if w != "shim"])  # shim: test_crash_during_save.py
def test_sigkill_at_random_points_leaves_old_or_new(kind: str, worker: Worker) -> None:
    s = session(worker, kind)
    rng = random.Random(20)
    outcomes = {"killed": 0, "finished": 0}
    on_disk = s.on_disk("start")
    for trial in range(TRIALS):
        new = "B" if on_disk == "A" else "A"
        result = s.ask(f"save {new} {rng.uniform(0.0, 1.5 * s.write_s):.6f}")
        assert result in outcomes, result
        outcomes[result] += 1
        now = s.on_disk(f"{kind}: trial {trial} ({result})")
        if result == "finished":
            assert now == new
        on_disk = now
    assert outcomes["killed"] >= TRIALS // 3, outcomes
    print(f"{kind}: {TRIALS} SIGKILLs, write ~{s.write_s * 1e3:.1f} ms, {outcomes}; debris {s.debris()}")
