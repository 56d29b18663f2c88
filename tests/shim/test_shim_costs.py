"""What the shim's stateful calls walk (performance round 2): a load must not grow with the adapters loaded.

Structural checks, not timings: the undo record of ``load_adapter`` holds the same modules and adapters with 2
and with 12 adapters loaded, ``Swift.merge`` records only the modules whose weights it swaps, and ``eval()``
leaves already-evaluated holders alone.  That the records are still complete (a failure at any step changes
nothing) is proved by ``tests/reliability/test_atomic.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama

import functuner.shim.undo as undo_mod
from functuner import LoRAConfig, Swift

CFG = LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture
def records(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """``(modules recorded, adapters recorded)`` of every undo record made."""
    seen: list[tuple[int, int]] = []
    real = undo_mod._Snapshot

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            seen.append((len(self.modules), len(getattr(self, "adapter_fields", {}))))

    monkeypatch.setattr(undo_mod, "_Snapshot", Counting)
    return seen


def test_load_adapter_records_the_same_with_2_and_12_adapters_loaded(
    tmp_path: Path, records: list[tuple[int, int]]
) -> None:
    sm = Swift.prepare_model(tiny_llama(num_hidden_layers=1), {"first": CFG})
    for i in range(12):
        sm.save_pretrained(tmp_path / f"s{i}", adapter_name="first")
    per_load = []
    for i in range(12):
        records.clear()
        sm.load_adapter(str(tmp_path / f"s{i}"), adapter_name=f"ad{i}")
        per_load.append(list(records))
    assert per_load[1] == per_load[-1], per_load  # the same modules, and no entry of the adapters loaded
    assert all(n_adapters == 0 for _, n_adapters in per_load[-1])  # only the new one, not there yet
    assert len(list(sm.model.modules())) > 3 * per_load[-1][0][0]  # far fewer than the whole model's modules


def test_merge_records_only_the_swapped_modules(records: list[tuple[int, int]]) -> None:
    sm = Swift.prepare_model(tiny_llama(num_hidden_layers=1), CFG)
    Swift.merge(sm)
    assert records == [(2, 0)]  # q_proj and v_proj of the one layer; no adapter entry
    records.clear()
    Swift.unmerge(sm)
    assert records == [(2, 0)]


def test_eval_leaves_evaluated_holders_alone() -> None:
    sm = Swift.prepare_model(tiny_llama(num_hidden_layers=1), {"a": CFG, "b": CFG})
    sm.eval()
    holders = [m for n, m in sm.model.named_modules() if n.endswith((".lora_A.a", ".lora_A.b"))]
    assert holders and not any(m.training for m in holders)
    sm.train()
    assert all(m.training for m in sm.model.modules())  # train() still reaches every holder
    sm.eval()
    assert not any(m.training for m in sm.model.modules())
    with torch.no_grad():
        sm(input_ids=torch.tensor([[1, 2, 3]]))
