"""Native (IA)³ against real PEFT: one parity row per (toy model, config); see ``native_peft_helpers``."""

from __future__ import annotations

import peft
import pytest
import torch
from native_peft_helpers import MODELS, assert_parity, make_pair, mlp

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, UnsupportedModuleError
from functuner.tuners.ia3 import IA3Config

ROWS = {
    "mlp-out-and-ff": ("mlp", {"target_modules": ["lin1", "lin2"], "feedforward_modules": ["lin2"]}),
    "mlp-modules_to_save": (
        "mlp",
        {"target_modules": ["lin1"], "feedforward_modules": [], "modules_to_save": ["head"]},
    ),
    "llama-list": (
        "llama",
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    ),
    "llama-regex": (
        "llama",
        {"target_modules": r".*\.(k_proj|up_proj)", "feedforward_modules": r".*up_proj"},
    ),
    "gpt2-conv1d": ("gpt2", {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}),
    "conv2d": ("conv", {"target_modules": ["c1", "c2", "c3"], "feedforward_modules": ["c2", "c3"]}),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_ia3_parity_with_peft(row: str) -> None:
    model_name, kwargs = ROWS[row]
    build, inputs = MODELS[model_name]
    model = build()
    p, pm = make_pair(
        model, IA3Config(init_ia3_weights=False, **kwargs), peft.IA3Config(init_ia3_weights=False, **kwargs)
    )
    assert_parity(model, inputs(), p, pm)


def test_default_init_is_identity_and_pure() -> None:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = ft.init(model, IA3Config(target_modules=["lin1", "lin2"], feedforward_modules=["lin2"]), generator=0)
    x = torch.randn(3, 12)
    torch.testing.assert_close(ft.apply(model, p, (x,)), model(x), atol=0, rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(p) == {"lin1.ia3_l.default", "lin2.ia3_l.default"}
    assert p["lin1.ia3_l.default"].shape == (16, 1) and p["lin2.ia3_l.default"].shape == (1, 16)


def test_grad_and_vmap_over_params() -> None:
    model = mlp()
    cfg = IA3Config(target_modules=["lin1", "lin2"], feedforward_modules=["lin2"], init_ia3_weights=False)
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
    torch.testing.assert_close(outs[0], ft.apply(model, p1, (x,)))
    torch.testing.assert_close(outs[1], ft.apply(model, p2, (x,)))


def test_errors_name_the_problem() -> None:
    model = mlp()
    with pytest.raises(ConfigError, match="feedforward_modules is None"):
        ft.init(model, IA3Config(target_modules=["lin1"]), generator=0)
    with pytest.raises(ConfigError, match="subset of target_modules"):
        IA3Config(target_modules=["lin1"], feedforward_modules=["lin2"])
    seq = torch.nn.Sequential(torch.nn.Embedding(4, 3))
    with pytest.raises(UnsupportedModuleError, match=r"'0' of type Embedding"):
        ft.init(seq, IA3Config(target_modules=["0"], feedforward_modules=[]), generator=0)
    p = ft.init(model, IA3Config(target_modules=["lin1"], feedforward_modules=[]), generator=0)
    bad = ft.TunerParams({"lin1.ia3_l.default": torch.ones(1, 12)}, p.config)
    with pytest.raises(ParamsMismatchError, match=r"lin1\.ia3_l\.default.*\(1, 12\).*\(16, 1\)"):
        ft.validate(model, bad)


def test_shim_takes_native_configs_and_still_passes_peft_configs_to_peft() -> None:
    x = torch.randn(3, 12)
    cfg = IA3Config(target_modules=["lin1", "lin2"], feedforward_modules=["lin2"], init_ia3_weights=False)
    model = mlp()
    p = ft.init(model, cfg, generator=0)
    sm = ft.Swift.prepare_model(mlp(), cfg)
    assert isinstance(sm, ft.SwiftModel)
    trained = {k.removeprefix("base_model."): v.detach() for k, v in sm.named_parameters() if v.requires_grad}
    assert set(trained) == set(p)
    torch.testing.assert_close(sm(x), ft.apply(model, p.replace(trained), (x,)))
    pm = ft.Swift.prepare_model(mlp(), peft.IA3Config(target_modules=["lin1"], feedforward_modules=[]))
    assert isinstance(pm, peft.PeftModel)
    torch.testing.assert_close(pm(x), mlp()(x))  # PEFT's own init: ones
