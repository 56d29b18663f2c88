"""Native LoHa against real PEFT: one parity row per (toy model, config); see ``native_peft_helpers``."""

from __future__ import annotations

import peft
import pytest
import torch
from native_peft_helpers import MODELS, assert_parity, make_pair, mlp

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, UnsupportedModuleError
from functuner.tuners.loha import LoHaConfig

ROWS = {
    "mlp": ("mlp", {"target_modules": ["lin1", "lin2"], "r": 4, "alpha": 6}),
    "mlp-modules_to_save": ("mlp", {"target_modules": ["lin1"], "r": 2, "modules_to_save": ["head"]}),
    "llama-patterns": (
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "r": 2,
            "alpha": 4,
            "rank_pattern": {"v_proj": 3},
            "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 7},
        },
    ),
    "llama-layers": ("llama", {"target_modules": ["o_proj"], "layers_to_transform": [1], "r": 3}),
    "conv-flat": ("conv", {"target_modules": ["c1", "c2", "c3", "c4"], "r": 2}),
    "conv-effective": ("conv", {"target_modules": ["c1", "c2", "c3", "c4"], "r": 2, "use_effective_conv2d": True}),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_loha_parity_with_peft(row: str) -> None:
    model_name, kwargs = ROWS[row]
    build, inputs = MODELS[model_name]
    model = build()
    p, pm = make_pair(model, LoHaConfig(init_weights=False, **kwargs), peft.LoHaConfig(init_weights=False, **kwargs))
    assert_parity(model, inputs(), p, pm, peft_grads=not kwargs.get("use_effective_conv2d"))


def test_cp_gradients_pass_gradcheck_where_peft_backward_does_not() -> None:
    """PEFT 0.21.2's ``HadaWeightCP.backward`` fails ``gradcheck``; ours is plain autograd and passes it."""
    from peft.tuners.loha.layer import HadaWeightCP
    from torch.autograd.gradcheck import GradcheckError

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 2, 3, 3), (2, 5), (2, 4)] * 2
    ts = [torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True) for s in shapes]
    scale = torch.tensor(0.5, dtype=torch.float64)
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda *a: HadaWeightCP.apply(*a, scale), ts)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 5, 3, padding=1)).double()
    p = ft.init(
        model, LoHaConfig(target_modules=["0"], r=2, use_effective_conv2d=True, init_weights=False), generator=0
    )
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, generator=g)
    names = list(p)
    leaves = [p[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(
        lambda *a: ft.apply(model, p.replace(dict(zip(names, a, strict=True))), (x,)), leaves
    )


def test_default_init_is_identity_and_pure() -> None:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = ft.init(model, LoHaConfig(target_modules=["lin1", "lin2"], r=2), generator=0)
    x = torch.randn(3, 12)
    torch.testing.assert_close(ft.apply(model, p, (x,)), model(x), atol=0, rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not p["lin1.hada_w2_b.default"].any() and p["lin1.hada_w1_a.default"].shape == (16, 2)


def test_dropouts_draw_from_the_generator_only() -> None:
    model = mlp().train()
    cfg = LoHaConfig(target_modules=["lin1", "lin2"], r=2, init_weights=False, rank_dropout=0.5, module_dropout=0.3)
    p = ft.init(model, cfg, generator=0)
    x = torch.randn(3, 12)
    with pytest.raises(ConfigError, match="generator"):
        ft.apply(model, p, (x,))
    a = ft.apply(model, p, (x,), generator=torch.Generator().manual_seed(5))
    b = ft.apply(model, p, (x,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    model.eval()
    ft.apply(model, p, (x,))  # eval: no randomness, no generator needed


def test_grad_and_vmap_over_params() -> None:
    model = mlp()
    cfg = LoHaConfig(target_modules=["lin1", "lin2"], r=2, init_weights=False)
    p1, p2 = ft.init(model, cfg, generator=1), ft.init(model, cfg, generator=2)
    x = torch.randn(4, 12)

    def loss(params: ft.TunerParams) -> torch.Tensor:
        return ft.apply(model, params, (x,)).square().mean()

    grads = torch.func.grad(loss)(p1)
    leaves = p1.map(lambda t: t.detach().requires_grad_(True))
    expected = torch.autograd.grad(loss(leaves), list(leaves.values()))
    for g, e in zip(grads.values(), expected, strict=True):
        torch.testing.assert_close(g, e)
    stacked = ft.tree_map(lambda a, b: torch.stack([a, b]), p1, p2)
    outs = torch.func.vmap(lambda params: ft.apply(model, params, (x,)))(stacked)
    torch.testing.assert_close(outs[1], ft.apply(model, p2, (x,)))


def test_errors_name_the_problem() -> None:
    model = mlp()
    with pytest.raises(ConfigError, match="LoHaConfig.r must be a positive integer"):
        LoHaConfig(target_modules=["lin1"], r=0)
    with pytest.raises(ConfigError, match="layers_to_transform"):
        LoHaConfig(target_modules=["lin1"], layers_pattern="layers")
    seq = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Embedding(4, 3))
    with pytest.raises(UnsupportedModuleError, match=r"'1' of type Embedding"):
        ft.init(seq, LoHaConfig(target_modules=["0", "1"]), generator=0)
    p = ft.init(model, LoHaConfig(target_modules=["lin1"], r=2), generator=0)
    with pytest.raises(ParamsMismatchError, match=r"lin1\.hada_w1_a\.default.*\(16, 2\).*\(16, 3\)"):
        ft.validate(model, p.replace(config=LoHaConfig(target_modules=["lin1"], r=3)))
