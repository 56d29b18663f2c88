"""Adapters that cannot be stacked (different ranks/targets in a tree map, mixed devices) give a ConfigError naming them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners.lora.mixed import apply_mixed, stack_adapters


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def _lora(model: nn.Module, r: int, targets: list[str], name: str, seed: int = 0) -> ft.TunerParams:
    cfg = ft.LoRAConfig(r=r, target_modules=targets, init_lora_weights=False)
    return ft.init(model, cfg, generator=seed, adapter_name=name)


def test_tree_map_over_adapters_with_other_rank_names_them_and_the_difference() -> None:
    model = _model()
    a, b = _lora(model, 2, ["0"], "a"), _lora(model, 4, ["0", "2"], "b")
    with pytest.raises(ConfigError) as info:
        ft.tree_map(lambda *ts: torch.stack(ts), a, b)
    msg = str(info.value)
    for fragment in ("functuner.tree_map", "'a' and 'b'", "r=2 vs 4", "target_modules=['0'] vs ['0', '2']"):
        assert fragment in msg, (fragment, msg)
    assert "LoRAConfig(" not in msg  # no config repr dump
    assert "stack_adapters" in msg  # the fix


def test_tree_map_over_same_named_adapters_with_other_rank() -> None:
    model = _model()
    a, b = _lora(model, 2, ["0"], "x"), _lora(model, 3, ["0"], "x")
    with pytest.raises(
        ConfigError, match=r"adapters 'x' and 'x' cannot be mapped together; their configs differ in r=2"
    ):
        ft.tree_map(lambda *ts: torch.stack(ts), [a], [b])
    with pytest.raises(ConfigError, match="not nested the same way"):
        ft.tree_map(lambda *ts: ts[0], [a], [a, a])


def test_tree_map_of_one_structure_still_works_and_keeps_fn_errors() -> None:
    model = _model()
    a, b = _lora(model, 2, ["0"], "x", seed=1), _lora(model, 2, ["0"], "x", seed=2)
    stacked = ft.tree_map(lambda *ts: torch.stack(ts), a, b)
    assert all(t.shape[0] == 2 for t in stacked.values())

    def fails(*ts: torch.Tensor) -> torch.Tensor:
        raise ValueError("from fn")

    with pytest.raises(ValueError, match="from fn") as info:
        ft.tree_map(fails, a, b)
    assert not isinstance(info.value, ConfigError)


def test_stack_adapters_pads_other_ranks_and_targets() -> None:
    model = _model()
    a, b = _lora(model, 2, ["0"], "a", seed=1), _lora(model, 4, ["0", "2"], "b", seed=2)
    x = torch.randn(3, 6)
    out = apply_mixed(model, stack_adapters(model, [a, b]), ["a", "b", "__base__"], (x,))
    want = torch.cat([ft.apply(model, a, (x[:1],)), ft.apply(model, b, (x[1:2],)), model(x[2:])])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_stack_adapters_on_different_devices_names_them() -> None:
    model = _model()
    a, b = _lora(model, 2, ["0"], "a"), _lora(model, 3, ["0"], "b")
    b_meta = ft.TunerParams({k: v.to("meta") for k, v in b.items()}, b.config, "b")
    with pytest.raises(ConfigError, match=r"module '0' cannot be stacked \('a': r=2 torch.float32 on cpu, 'b': r=3"):
        stack_adapters(model, [a, b_meta])
