"""The Conv2d / Conv3d / MoE ``target_parameters`` training-step benchmark runs in quick mode and checks PEFT parity.

No assertion here is about time: the quick mode exists so the group cannot rot.
"""

from __future__ import annotations

import math

from benchmarks import common as C
from benchmarks.__main__ import GROUPS
from benchmarks.lora_modules import run


def test_lora_modules_group_quick_mode() -> None:
    assert GROUPS["lora_modules"] == "lora_modules:run"
    report = run(C.settings(quick=True))
    checks = " ".join(report.checks)
    for case in ("conv2d", "conv3d", "moe"):
        assert f"{case} loss and all" in checks, checks
    ratios = {label: value for label, value, _, _ in report.rows if value.endswith("x")}
    for case in ("conv2d", "conv3d", "moe"):
        value = ratios[f"{case}: functional / peft step"]
        assert math.isfinite(float(value[:-1])) and float(value[:-1]) > 0, (case, value)
