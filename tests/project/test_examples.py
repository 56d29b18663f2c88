"""Each script in examples/ runs to completion in its --quick mode, in a fresh interpreter, as a user runs it.

The scripts check their own results (loss goes down, reload/PEFT/merge agree,
mixed-batch answers equal per-request ones) and exit non-zero otherwise; these
tests also check the lines that report those results.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(script: str, tmp_path: pathlib.Path) -> str:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} --quick exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _floats(pattern: str, text: str) -> list[float]:
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return [float(g) for g in match.groups()]


def test_functional_loop_quick(tmp_path: pathlib.Path) -> None:
    out = _run("functional_loop.py", tmp_path)
    first, last = _floats(r"first 3 steps ([\d.]+) -> last 3 steps ([\d.]+)", out)
    assert last < first
    assert "saved and reloaded default/ (28 tensors)" in out
    (gap,) = _floats(r"max \|merged - adapter\| = ([\d.e+-]+)", out)
    assert gap < 1e-4


def test_trainer_shim_quick(tmp_path: pathlib.Path) -> None:
    out = _run("trainer_shim.py", tmp_path)
    assert "trainable params: 8,192" in out
    before, after = _floats(r"eval loss ([\d.]+) -> ([\d.]+)", out)
    assert after < before
    reloaded, peft_gap, merged = _floats(
        r"reloaded - trained\| = ([\d.e+-]+), \|peft - trained\| = ([\d.e+-]+), \|merged - trained\| = ([\d.e+-]+)", out
    )
    assert reloaded == 0.0 and peft_gap < 1e-5 and merged < 1e-4
    assert not list(tmp_path.glob("functuner-trainer-*")), "the example left its temporary folder behind"


def test_multi_adapter_serving_quick(tmp_path: pathlib.Path) -> None:
    out = _run("multi_adapter_serving.py", tmp_path)
    assert "3 adapters, 6 requests, batches of 3" in out
    assert "answers equal to serving each request alone: 6/6" in out


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_has_a_quick_mode_or_its_own_test(script: str) -> None:
    text = (ROOT / "examples" / script).read_text()
    tested_elsewhere = {"distributed_lora.py": "tests/io/test_distributed.py"}
    if script in tested_elsewhere:
        assert script in (ROOT / tested_elsewhere[script]).read_text()
    else:
        assert "--quick" in text and f'"{script}"' in pathlib.Path(__file__).read_text()
