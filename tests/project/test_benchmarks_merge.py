"""The merge-memory benchmark runs (``--quick``) and prints both peaks; memory is judged in the benchmark, not here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "merge_memory.py"


def test_merge_memory_benchmark_quick_runs():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = re.search(r"functuner merge peak RSS: ([\d.]+) MiB", res.stdout)
    theirs = re.search(r"in-memory peak RSS: ([\d.]+) MiB", res.stdout)
    assert ours and theirs, res.stdout
    assert float(ours.group(1)) > 0 and float(theirs.group(1)) > 0
    diff = re.search(r"max \|functuner - in-memory\| over all merged tensors: ([\d.e+-]+)", res.stdout)
    assert diff and float(diff.group(1)) < 1e-5, res.stdout  # both paths merged the same adapter
