"""Worker for test_crash_during_save.py: forks savers on command so the test can SIGKILL them mid-save.

Run as ``python crash_worker.py <checkpoint dir> <reference dir>``.  It builds
two SwiftModels ``A`` and ``B`` (same base model, different adapters, configs
and extra states), writes complete references ``<reference dir>/A`` and
``<reference dir>/B``, prints ``ready <median save seconds>``, then reads
commands from stdin:

* ``save A <delay>`` / ``save B <delay>``: fork a child that runs
  ``save_pretrained(<checkpoint dir>)`` with that model, SIGKILL it after
  ``delay`` seconds (if still running), reap it, and print ``killed`` or
  ``finished``.
* ``quit``.

Forking a warmed-up process makes each trial cost milliseconds instead of a
fresh interpreter start; the child does nothing but the save.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rel_common import tiny_llama  # noqa: E402

from functuner import LoRAConfig, Swift  # noqa: E402


def build(which: str):
    model = tiny_llama()
    torch.manual_seed(1 if which == "A" else 2)
    alpha = 8 if which == "A" else 16
    cfgs = {
        "default": LoRAConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "second": LoRAConfig(r=2, lora_alpha=alpha, target_modules=["o_proj", "down_proj"], init_lora_weights=False),
    }
    sm = Swift.prepare_model(model, cfgs, extra_state_keys=[r"model\.norm\.weight"])
    with torch.no_grad():
        model.model.norm.weight.add_(0.5 if which == "A" else -0.5)
    return sm


def main() -> None:
    ck, refs = Path(sys.argv[1]), Path(sys.argv[2])
    models = {w: build(w) for w in ("A", "B")}
    for w, sm in models.items():
        sm.save_pretrained(refs / w)
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        models["AB"[i % 2]].save_pretrained(refs / "scratch")
        times.append(time.perf_counter() - t0)
    print(f"ready {statistics.median(times):.6f}", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        which, delay = parts[1], float(parts[2])
        pid = os.fork()
        if pid == 0:  # the saver: nothing but the save, then exit without cleanup handlers
            try:
                models[which].save_pretrained(ck)
            finally:
                os._exit(0)
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
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print("killed" if killed else "finished", flush=True)


if __name__ == "__main__":
    main()
