"""Properties of native LoHa / LoKr over random layer sizes and configs (Hypothesis).

For any ``nn.Linear`` size, rank and LoKr decomposition flags: ``init`` gives PEFT's exact shapes (checked
against a real ``peft`` model), ``merge`` then ``functional_call`` equals ``apply``, and ``unmerge(merge(W))``
restores ``W`` to float32 rounding.
"""

from __future__ import annotations

import peft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import functuner as ft
from functuner.tuners.loha import LoHaConfig
from functuner.tuners.lokr import LoKrConfig


def _check(model: nn.Module, ours: object, theirs: peft.PeftConfig) -> None:
    p = ft.init(model, ours, generator=0)
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(*model[0].weight.shape[::-1])), theirs)
    prefix = "base_model.model."
    want = {n[len(prefix) :]: tuple(t.shape) for n, t in pm.named_parameters() if t.requires_grad}
    assert {k: tuple(v.shape) for k, v in p.items()} == want
    x = torch.randn(3, model[0].in_features, generator=torch.Generator().manual_seed(1))
    merged = ft.merge(model, p)
    torch.testing.assert_close(
        torch.func.functional_call(model, merged, (x,)), ft.apply(model, p, (x,)), atol=1e-4, rtol=1e-4
    )
    restored = ft.unmerge(model, p, merged)
    torch.testing.assert_close(restored["0.weight"], model[0].weight.detach(), atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    fan_in=st.integers(1, 24),
    out=st.integers(1, 24),
    r=st.integers(1, 6),
    decompose_both=st.booleans(),
    factor=st.sampled_from([-1, 2, 3, 4]),
)
def test_lokr_shapes_merge_and_unmerge(fan_in: int, out: int, r: int, decompose_both: bool, factor: int) -> None:
    model = nn.Sequential(nn.Linear(fan_in, out))
    kw = {"target_modules": ["0"], "r": r, "decompose_both": decompose_both, "decompose_factor": factor}
    _check(model, LoKrConfig(init_weights=False, **kw), peft.LoKrConfig(init_weights=False, **kw))


@settings(max_examples=15, deadline=None)
@given(fan_in=st.integers(1, 24), out=st.integers(1, 24), r=st.integers(1, 6), alpha=st.floats(0.5, 16))
def test_loha_shapes_merge_and_unmerge(fan_in: int, out: int, r: int, alpha: float) -> None:
    model = nn.Sequential(nn.Linear(fan_in, out))
    kw = {"target_modules": ["0"], "r": r, "alpha": alpha}
    _check(model, LoHaConfig(init_weights=False, **kw), peft.LoHaConfig(init_weights=False, **kw))
