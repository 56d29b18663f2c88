"""The multi-adapter benchmark's quick mode runs end to end (its correctness checks against PEFT included)."""

from __future__ import annotations

import math

from benchmarks.multi_adapter import main


def test_multi_adapter_benchmark_quick_mode(tmp_path, capsys):
    out = tmp_path / "multi.md"
    results = main(["--quick", "--markdown", str(out)])
    fwd, switch, combine = results["forward"], results["switch"], results["combine"]
    for key in ("functuner single", "PEFT single", "functuner mixed 4", "functuner mixed 8", "PEFT mixed 8"):
        assert math.isfinite(fwd[key]) and fwd[key] > 0, key
    assert {"functuner bind_routes 1", "functuner bind_routes 8", "PEFT set_adapter 8"} <= set(switch)
    assert len([k for k in combine if k.startswith("functuner ")]) == 11
    text = out.read_text()
    assert "Correctness checks passed before timing" in text and "functuner mixed (8 adapters)" in text
    assert "Mixed-batch forward" in capsys.readouterr().out
