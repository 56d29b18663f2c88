"""Crash during save (issue 8, item 2): SIGKILL a process running ``save_pretrained`` over an existing checkpoint.

A worker process (tests/reliability/crash_worker.py) holds two models ``A``
and ``B`` (two adapters each, plus ``extra_states``).  Each trial forks a child
that saves the model *not* on disk over the checkpoint and kills it with
SIGKILL after a random delay between 0 and 1.2x a measured save time.  After
every kill the directory must hold exactly the old or the new checkpoint:
every file byte-identical to one of the two complete references, and loading
it gives that model's outputs.  Never a mixture, never an error.

Default: 30 kills.  ``FUNCTUNER_FULL=1`` runs 300.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from rel_common import X, tiny_llama

from functuner import Swift

WORKER = Path(__file__).resolve().parent / "crash_worker.py"
TRIALS = 300 if os.environ.get("FUNCTUNER_FULL") == "1" else 30


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return Swift.from_pretrained(tiny_llama(), str(path))(input_ids=X).logits


def test_sigkill_during_save_leaves_old_or_new_never_a_mix(tmp_path: Path) -> None:
    ck, refs = tmp_path / "ck", tmp_path / "refs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(ck), str(refs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready = proc.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        save_s = float(ready[1])
        ref = {w: _files(refs / w) for w in ("A", "B")}
        assert set(ref["A"]) == set(ref["B"]) and all(
            ref["A"][k] != ref["B"][k]
            for k in ref["A"]
            if k not in ("configuration.json", "extra_states/adapter_config.json")
        )
        out = {w: _logits(refs / w) for w in ("A", "B")}
        assert not torch.equal(out["A"], out["B"])

        def run(which: str, delay: float) -> str:
            proc.stdin.write(f"save {which} {delay:.6f}\n")
            proc.stdin.flush()
            return proc.stdout.readline().strip()

        assert run("A", 60.0) == "finished"
        on_disk = "A"
        rng = random.Random(8)
        outcomes = {"killed": 0, "finished": 0}
        seen = {"old": 0, "new": 0}
        for trial in range(TRIALS):
            new = "B" if on_disk == "A" else "A"
            result = run(new, rng.uniform(0.0, 1.2 * save_s))
            assert result in outcomes, result
            outcomes[result] += 1
            now = _files(ck)
            matches = [w for w in ("A", "B") if now == ref[w]]
            assert len(matches) == 1, (
                f"trial {trial} ({result}): directory matches neither checkpoint; files "
                f"{sorted(now)} differ from A at {[k for k in ref['A'] if now.get(k) != ref['A'][k]]}"
                f" and from B at {[k for k in ref['B'] if now.get(k) != ref['B'][k]]}"
            )
            seen["new" if matches[0] == new else "old"] += 1
            if result == "finished":
                assert matches[0] == new
            if trial % 5 == 0 or matches[0] != on_disk:
                assert torch.equal(_logits(ck), out[matches[0]])
            on_disk = matches[0]
        # the kills really landed inside saves (not only before or after them)
        assert outcomes["killed"] >= TRIALS // 3, outcomes
        print(f"crash-during-save: {TRIALS} trials, save ~{save_s * 1e3:.1f} ms, {outcomes}, outcomes {seen}")
    finally:
        if proc.poll() is None:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(timeout=30)
        proc.stdin.close()  # the pipes are ours to close (else a ResourceWarning, an error under -W error)
        proc.stdout.close()
    # debris a SIGKILL can leave is beside the checkpoint, never inside it
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ck.")]
    print(f"temporary folders left beside the checkpoint by killed saves: {len(leftovers)}")
