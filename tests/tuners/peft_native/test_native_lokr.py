"""Native LoKr against real PEFT: one parity row per (toy model, config); see ``native_peft_helpers``."""

from __future__ import annotations

import peft
import pytest
import torch
from native_peft_helpers import MODELS, assert_parity, make_pair, mlp

import functuner as ft
from functuner.errors import ConfigError, UnsupportedModuleError
from functuner.tuners.lokr import LoKrConfig, factorization

ROWS = {
    "mlp-full-w2": ("mlp", {"target_modules": ["lin1", "lin2"], "r": 4, "alpha": 6}),
    "mlp-decompose-both": ("mlp", {"target_modules": ["lin1", "lin2"], "r": 1, "decompose_both": True}),
    "mlp-factor-modules_to_save": (
        "mlp",
        {"target_modules": ["lin1"], "r": 1, "decompose_factor": 2, "modules_to_save": ["head"]},
    ),
    "llama-patterns": (
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "up_proj"],
            "r": 2,
            "rank_pattern": {"up_proj": 1},
            "alpha_pattern": {"v_proj": 3},
        },
    ),
    "conv-flat": ("conv", {"target_modules": ["c1", "c2", "c3"], "r": 1}),
    "conv-full-w2": ("conv", {"target_modules": ["c1", "c2", "c3"], "r": 8}),
    "conv-effective": ("conv", {"target_modules": ["c1", "c2", "c3"], "r": 1, "use_effective_conv2d": True}),
    "conv1d-flat": ("conv", {"target_modules": ["c4"], "r": 1}),
    "conv1d-full-w2": ("conv", {"target_modules": ["c4"], "r": 8}),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_lokr_parity_with_peft(row: str) -> None:
    model_name, kwargs = ROWS[row]
    build, inputs = MODELS[model_name]
    model = build()
    p, pm = make_pair(model, LoKrConfig(init_weights=False, **kwargs), peft.LoKrConfig(init_weights=False, **kwargs))
    assert_parity(model, inputs(), p, pm)


@pytest.mark.parametrize("init_weights", [True, "lycoris"])
def test_default_inits_are_identity(init_weights: object) -> None:
    model = mlp()
    p = ft.init(model, LoKrConfig(target_modules=["lin1", "lin2"], r=1, init_weights=init_weights), generator=0)
    x = torch.randn(3, 12)
    torch.testing.assert_close(ft.apply(model, p, (x,)), model(x), atol=0, rtol=0)
    pm = peft.get_peft_model(mlp(), peft.LoKrConfig(target_modules=["lin1", "lin2"], r=1, init_weights=init_weights))
    zeros = {n.split("base_model.model.")[1] for n, t in pm.named_parameters() if t.requires_grad and not t.any()}
    assert zeros == {k for k, t in p.items() if not t.any()}


def test_conv1d_effective_runs_where_peft_crashes() -> None:
    """PEFT 0.21.2 raises inside ``torch.kron`` for a Conv1d CP kernel; ours runs, and merge equals apply."""
    build, inputs = MODELS["conv"]
    model, x = build(), inputs()
    kwargs = {"target_modules": ["c4"], "r": 1, "use_effective_conv2d": True, "init_weights": False}
    pm = peft.get_peft_model(build(), peft.LoKrConfig(**kwargs))
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        pm(**x)
    p = ft.init(model, LoKrConfig(**kwargs), generator=0)
    assert "c4.lokr_t2.default" in p
    out = ft.apply(model, p, kwargs=x)
    assert (out - model(**x)).abs().max() > 1e-3
    merged = torch.func.functional_call(model, ft.merge(model, p), (), x)
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=1e-5)


def test_factorization_matches_peft() -> None:
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 8, 7):
            assert factorization(dim, factor) == peft_factorization(dim, factor)


def test_dropouts_draw_from_the_generator_only() -> None:
    model = mlp().train()
    cfg = LoKrConfig(target_modules=["lin1"], r=1, init_weights=False, rank_dropout=0.5, rank_dropout_scale=True)
    p = ft.init(model, cfg, generator=0)
    x = torch.randn(3, 12)
    a = ft.apply(model, p, (x,), generator=torch.Generator().manual_seed(5))
    b = ft.apply(model, p, (x,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_grad_and_vmap_over_params() -> None:
    model = mlp()
    cfg = LoKrConfig(target_modules=["lin1", "lin2"], r=1, init_weights=False)
    p1, p2 = ft.init(model, cfg, generator=1), ft.init(model, cfg, generator=2)
    x = torch.randn(4, 12)
    grads = torch.func.grad(lambda params: ft.apply(model, params, (x,)).square().mean())(p1)
    assert set(grads) == set(p1) and all(g.abs().sum() > 0 for g in grads.values())
    stacked = ft.tree_map(lambda a, b: torch.stack([a, b]), p1, p2)
    outs = torch.func.vmap(lambda params: ft.apply(model, params, (x,)))(stacked)
    torch.testing.assert_close(outs[0], ft.apply(model, p1, (x,)))


def test_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="init_weights"):
        LoKrConfig(target_modules=["lin1"], init_weights="gaussian")
    seq = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    with pytest.raises(UnsupportedModuleError, match=r"'1' of type LayerNorm"):
        ft.init(seq, LoKrConfig(target_modules=["0", "1"]), generator=0)
