"""The QLoRA benchmark group (``benchmarks/qlora.py``) runs in quick mode, checks parity with PEFT first, fills its table.

No assertion here is about time or memory: those are reported as ratios in the table (docs/performance.md).
"""

from __future__ import annotations

import math

import pytest

from benchmarks.__main__ import GROUPS, run_suite

# PEFT's constructor reads transformers' deprecated `is_gradient_checkpointing` (see pyproject's list)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def test_qlora_group_quick_mode() -> None:
    assert GROUPS["qlora"] == "qlora:run"
    (report,) = run_suite(quick=True, only=["qlora"])
    checks = " ".join(report.checks)
    assert "int8 (LLM.int8): loss and all" in checks and "(Linear8bitLt)" in checks
    assert "4-bit NF4: loss and all" in checks and "(Linear4bit)" in checks
    rows = {label: (value, target, met) for label, value, target, met in report.rows}
    for bits in ("int8 (LLM.int8)", "4-bit NF4"):
        for row in ("step: functional / PEFT", "peak memory: functional / PEFT"):
            value, target, met = rows[f"{bits} {row}"]
            assert math.isfinite(float(value[:-1])) and float(value[:-1]) > 0
            assert target and met in ("yes", "NO")
        assert rows[f"{bits} peak memory: functional"][0].endswith("MiB")
