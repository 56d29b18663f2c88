"""benchmarks/drift.py --quick runs and prints both libraries' drift side by side (no time is asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "drift.py"


def test_drift_benchmark_quick_prints_both_columns() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = re.findall(r"^(fp32|bf16|fp16)\s+(\d+)\s+([\d.e+-]+)\s+([\d.e+-]+)\s+([\d.]+)$", res.stdout, re.M)
    assert {r[0] for r in rows} == {"fp32", "bf16", "fp16"}, res.stdout
    assert {int(r[1]) for r in rows} >= {1, 20}, res.stdout
    # functuner's shim puts the original tensors back: zero error after every number of cycles, every dtype
    assert all(float(r[2]) == 0.0 for r in rows), res.stdout
    assert all(float(r[3]) >= 0.0 and float(r[4]) > 0.0 for r in rows), res.stdout
