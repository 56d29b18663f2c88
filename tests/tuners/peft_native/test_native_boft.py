"""Native BOFT against real PEFT: parity rows (see ``native_peft_helpers``), checkpoints both ways, torch.func, shim.

Rows: PEFT's BOFT rows of ``tests/test_custom_models.py`` (huggingface/peft@5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40:
"Vanilla MLP 1-5 BOFT", "Conv2d 1/2 BOFT") plus a transformers Llama built from a config.  PEFT's rows with
``boft_n_butterfly_factor > 1`` ("Vanilla MLP 6", "MLP2 1/2", "Conv2d2 1") need PEFT's CUDA extension, without which
PEFT uses factor 1: ``test_native_boft_butterfly.py`` compares them whole-model with that extension's kernels ported
to torch; here the permutations are also checked against PEFT's own ``block_butterfly_perm`` / ``perm2mat``, the
product against PEFT's formula, and the rotation is checked orthogonal.
``init_weights=False`` everywhere so that parity is not vacuous.
"""

from __future__ import annotations

import peft
import pytest
import torch
from native_peft_helpers import (
    MODELS,
    assert_parity,
    check_peft_round_trip,
    make_pair,
    mlp,
)
from peft.tuners.boft.layer import BOFTLayer

import functuner as ft
from functuner.errors import ConfigError, UnsupportedModuleError
from functuner.tuners import boft
from functuner.tuners.boft import BOFTConfig

pytestmark = pytest.mark.filterwarnings(
    "ignore:Failed to load the CUDA extension:UserWarning",  # PEFT tries to compile its CUDA kernel on CPU
    "ignore:Setting boft_n_butterfly_factor to 1:UserWarning",
)

ROWS = {
    "peft-mlp-1": ("peft_mlp", {"target_modules": ["lin1"], "boft_block_size": 2}),
    "peft-mlp-2-mts": ("peft_mlp", {"target_modules": ["lin1"], "modules_to_save": ["lin0"], "boft_block_size": 2}),
    "peft-mlp-3-dropout-eval": ("peft_mlp", {"target_modules": ["lin1"], "boft_block_size": 2, "boft_dropout": 0.1}),
    "peft-mlp-4": ("peft_mlp", {"target_modules": ["lin1"], "boft_block_size": 2, "boft_n_butterfly_factor": 1}),
    "peft-mlp-5": (
        "peft_mlp",
        {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 1},
    ),
    "peft-conv2d-1": ("peft_conv2d", {"target_modules": ["conv2d"], "boft_block_size": 45}),
    "peft-conv2d-2": ("peft_conv2d", {"target_modules": ["conv2d"], "boft_block_size": 0, "boft_block_num": 1}),
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "boft_block_size": 4}),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_boft_parity_with_peft(row: str) -> None:
    model_name, kwargs = ROWS[row]
    build, inputs = MODELS[model_name]
    model = build()
    p, pm = make_pair(model, BOFTConfig(init_weights=False, **kwargs), peft.BOFTConfig(init_weights=False, **kwargs))
    assert_parity(model, inputs(), p, pm)


@pytest.mark.parametrize(
    ("dim", "size", "num", "factors"),
    [(20, 10, 0, 2), (16, 2, 0, 3), (16, 0, 8, 3), (72, 2, 0, 2), (72, 2, 0, 3)],  # MLP 6, MLP2 1/2, Conv2d2 1
)
def test_butterfly_matches_peft_formula_for_more_factors(dim: int, size: int, num: int, factors: int) -> None:
    cfg = BOFTConfig(target_modules=["x"], boft_block_size=size, boft_block_num=num, boft_n_butterfly_factor=factors)
    plan = boft._plan("x", torch.nn.Linear(dim, 3), cfg)
    r = torch.randn(plan.factors, plan.num, plan.size, plan.size, generator=torch.Generator().manual_seed(0)) * 0.1
    ours = boft.butterfly(r, plan)
    blocks = boft._cayley(r)
    expected = None
    for i in range(plan.factors):
        perm = BOFTLayer.block_butterfly_perm(None, dim, plan.num // 2**i, plan.size // 2, plan.factors - 1)
        pmat = BOFTLayer.perm2mat(None, perm)
        mi = pmat @ torch.block_diag(*blocks[i].unbind(0)) @ pmat.T
        expected = mi if expected is None else mi @ expected
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours @ ours.T, torch.eye(dim), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_peft_loads_our_save_and_we_load_peft_save(adapter_name: str, tmp_path) -> None:
    build, inputs = MODELS["llama"]
    model, x = build(), inputs()
    cfg = {"boft_block_size": 4, "target_modules": ["q_proj", "v_proj"], "init_weights": False}
    p = ft.init(model, BOFTConfig(**cfg), generator=3, adapter_name=adapter_name)
    check_peft_round_trip(tmp_path, model, x, p, peft.BOFTConfig(**cfg), "BOFT")


def test_swift_round_trip_peft_config_init_grad_vmap_and_dropout(tmp_path) -> None:
    model = mlp()
    cfg = peft.BOFTConfig(boft_block_size=4, target_modules=["lin1", "lin2"], init_weights=False, boft_dropout=0.5)
    p1 = ft.init(model, cfg, generator=1)
    assert isinstance(p1.config, BOFTConfig)
    ft.save(p1, tmp_path)
    back = ft.load(tmp_path, model)
    assert back.config == p1.config and all(torch.equal(back[k], p1[k]) for k in p1)
    p2 = ft.init(model, p1.config, generator=2)
    x = torch.randn(4, 12)

    def loss(params: ft.TunerParams) -> torch.Tensor:
        return ft.apply(model, params, (x,)).square().mean()

    grads = torch.func.grad(loss)(p1)
    leaves = p1.map(lambda t: t.detach().requires_grad_(True))
    for g, e in zip(grads.values(), torch.autograd.grad(loss(leaves), list(leaves.values())), strict=True):
        torch.testing.assert_close(g, e)
    stacked = ft.tree_map(lambda a, b: torch.stack([a, b]), p1, p2)
    outs = torch.func.vmap(lambda params: ft.apply(model, params, (x,)))(stacked)
    torch.testing.assert_close(outs[1], ft.apply(model, p2, (x,)))
    train = mlp().train()
    a = ft.apply(train, p1, (x,), generator=torch.Generator().manual_seed(5))
    b = ft.apply(train, p1, (x,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)  # the block dropout is drawn from the call's generator only


def test_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="exactly one of boft_block_size"):
        BOFTConfig(target_modules=["lin1"], boft_block_size=2, boft_block_num=2)
    with pytest.raises(ConfigError, match=r"rotated size \(12\) must be divisible by boft_block_size \(5\)"):
        ft.init(mlp(), BOFTConfig(target_modules=["lin1"], boft_block_size=5), generator=0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, dilation=2))
    with pytest.raises(UnsupportedModuleError, match="dilation"):
        ft.init(conv, BOFTConfig(target_modules=["0"], boft_block_size=2), generator=0)


def test_shim_merges_and_unmerges_and_peft_configs_still_go_to_peft() -> None:
    x = torch.randn(3, 12)
    cfg = BOFTConfig(boft_block_size=4, target_modules=["lin1", "lin2"], init_weights=False)
    sm = ft.Swift.prepare_model(mlp(), cfg)
    assert isinstance(sm, ft.SwiftModel)
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    out = sm(x)
    ft.Swift.merge(sm)
    torch.testing.assert_close(sm(x), out, atol=1e-5, rtol=1e-5)
    ft.Swift.unmerge(sm)
    assert all(torch.equal(v, before[k]) for k, v in sm.state_dict().items())
    pm = ft.Swift.prepare_model(mlp(), peft.BOFTConfig(boft_block_size=4, target_modules=["lin1"]))
    assert isinstance(pm, peft.PeftModel)
