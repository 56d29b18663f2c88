"""The benchmark suite's quick mode runs, checks correctness before timing, and produces its tables.

No assertion here is about time: the quick mode exists so the suite cannot rot.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.__main__ import GROUPS, main, run_suite


@pytest.fixture(scope="module")
def reports():
    return {r.group: r for r in run_suite(quick=True)}


def test_every_group_ran_and_checked_correctness(reports):
    assert len(reports) == len(GROUPS)
    for group, report in reports.items():
        assert report.checks, f"{group}: no correctness check recorded"
        assert report.rows, f"{group}: empty table"
        md = report.markdown()
        assert md.startswith(f"### {group}") and "| measurement | value | target | met |" in md


def test_ratios_are_finite_and_targets_judged(reports):
    judged = 0
    for report in reports.values():
        for label, value, target, met in report.rows:
            if value.endswith("x"):
                assert math.isfinite(float(value[:-1])) and float(value[:-1]) > 0, (report.group, label, value)
            if target:
                assert met in ("yes", "NO"), (report.group, label)
                judged += 1
    assert judged >= 15  # every issue target appears as a row


def test_train_step_compares_all_rows(reports):
    checks = " ".join(next(r for g, r in reports.items() if g.startswith("LoRA training")).checks)
    for row in ("functional", "torch.func.grad", "shim"):
        assert f"{row} loss and all" in checks


def test_compile_switches_adapters_without_recompiling(reports):
    report = next(r for g, r in reports.items() if g.startswith("torch.compile"))
    rows = {label: value for label, value, _, _ in report.rows}
    assert rows["recompiles switching adapters (one config object)"] == "0"


def test_cli_writes_markdown(tmp_path):
    out = tmp_path / "bench.md"
    assert main(["--quick", "--only", "load", "--out", str(out)]) == 0
    text = out.read_text()
    assert "# functuner benchmarks (quick mode)" in text and "### Adapter checkpoint load" in text


def test_unknown_group_is_refused():
    with pytest.raises(SystemExit, match="unknown group"):
        run_suite(quick=True, only=["nope"])
