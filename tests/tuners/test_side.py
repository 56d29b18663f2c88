"""Side tuner (SWIFT's SideConfig): init, the sigmoid blend, grads, dtypes, bad configs (mlp and fcn4).

Parity with the real ms-swift 4.6 (outputs, deactivation, checkpoints, shim): tests/tuners/test_swift_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from _swift_tuner_fixtures import load_case
from hypothesis import given, settings
from hypothesis import strategies as st
from models import logits, tiny_toy, tiny_vit

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, TargetError, UnsupportedModuleError
from functuner.tuners.side import SideConfig, side_net_forward

CASES = [("side_vit_mlp", tiny_vit), ("side_toy_fcn4", tiny_toy)]


def swift_params(case, name: str = "default") -> ft.TunerParams:
    files = case.adapters[name]
    return ft.TunerParams(files.state, SideConfig.from_dict(files.config), name)


@pytest.mark.parametrize(("case_name", "build"), CASES)
def test_init_starts_with_alpha_zero(case_name, build):
    # (init's keys and shapes against SWIFT's: test_swift_parity.py::test_init_gives_swifts_keys_and_shapes)
    model = build()
    case = load_case(case_name, model)
    cfg = SideConfig.from_dict(case.adapters["default"].config)
    params = ft.init(model, cfg, generator=0)
    assert float(params[next(k for k in params if k.endswith(".alpha"))]) == 0.0


def test_grad_flows_only_to_side_params_and_matches_autograd():
    model = tiny_vit()
    case = load_case("side_vit_mlp", model)
    params = swift_params(case)
    x = case.io["input_0"]

    def loss(p):
        return logits(ft.apply(model, p, (x,))).pow(2).mean()

    grads = torch.func.grad(loss)(params)
    assert set(grads) == set(params)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters())
    leaves = params.map(lambda t: t.detach().clone().requires_grad_(True))
    loss(leaves).backward()
    for k in params:
        torch.testing.assert_close(grads[k], leaves[k].grad, rtol=1e-4, atol=1e-7)


# -- bad configs ----------------------------------------------------------------------------------------
def test_bad_configs_raise_before_anything_changes():
    model = tiny_vit()
    hooks = [len(m._forward_hooks) for m in model.modules()]
    with pytest.raises(ConfigError, match="source_hidden_pos=3 is out of range"):
        ft.init(
            model,
            SideConfig(dim=32, target_modules=r"vit\.layers\.0", side_module_name="mlp", source_hidden_pos=3),
            generator=0,
        )
    with pytest.raises(UnsupportedModuleError, match="ModuleList"):
        ft.init(model, SideConfig(dim=32, target_modules=r"vit\.layers", side_module_name="mlp"), generator=0)
    with pytest.raises(TargetError, match="matched no module"):
        ft.init(model, SideConfig(dim=32, target_modules=r"vit\.encoder\.layer\.0"), generator=0)
    assert [len(m._forward_hooks) for m in model.modules()] == hooks


def test_dim_mismatch_and_wrong_input_name_the_field():
    model = tiny_vit()
    x = torch.randn(1, 3, 16, 16)
    base = logits(model(x))
    params = ft.init(model, SideConfig(dim=16, target_modules=r"vit\.layers\.0", side_module_name="mlp"), generator=0)
    with pytest.raises(ConfigError, match="dim=16 does not match"):
        ft.apply(model, params, (x,))
    fcn = ft.init(model, SideConfig(dim=32, target_modules=r"vit\.layers\.0"), generator=0)
    with pytest.raises(ConfigError, match="fcn4' needs images"):
        ft.apply(model, fcn, (x,))
    assert torch.equal(logits(model(x)), base)
    with pytest.raises(ParamsMismatchError, match="fc1.weight"):
        ft.validate(model, ft.TunerParams({k: v for k, v in params.items() if "fc1.weight" not in k}, params.config))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=None),
        dict(side_module_name="alexnet"),
        dict(side_module_name="resnet"),
        dict(target_modules=["backbone"]),
        dict(source_hidden_pos=None),
    ],
)
def test_invalid_fields_raise_config_error(kwargs):
    # a set bad value fails at construction, an unset required field (dim=None) at init (as in SWIFT)
    fields = dict(dim=32, target_modules="backbone") | kwargs
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ft.init(tiny_toy(), SideConfig(**fields), generator=0)


@settings(max_examples=10, deadline=None)
@given(st.floats(-6, 6), st.integers(0, 2**31 - 1))
def test_output_is_the_sigmoid_blend(alpha, seed):
    model = tiny_toy()
    cfg = SideConfig(dim=32, target_modules="backbone", side_module_name="fcn4")
    params = ft.init(model, cfg, generator=seed)
    params = params.replace({"backbone.side_default.alpha": torch.tensor(alpha)})
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    feats = {}
    h = model.backbone.register_forward_hook(lambda m, a, o: feats.setdefault("y", o))
    try:
        model(x)
    finally:
        h.remove()
    net = {k.split("side_net.", 1)[1]: v for k, v in params.items() if "side_net." in k}
    a = torch.sigmoid(torch.tensor(alpha))
    blended = a * feats["y"] + (1 - a) * side_net_forward("fcn4", net, x)
    torch.testing.assert_close(ft.apply(model, params, (x,)), model.head(blended))


def test_fp32_side_network_on_a_bf16_model():
    model = tiny_vit().to(torch.bfloat16)
    params = ft.init(model, SideConfig(dim=32, target_modules=r"vit\.layers\.0", side_module_name="mlp"), generator=0)
    assert all(t.dtype == torch.float32 for t in params.values())
    x = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)
    out = logits(ft.apply(model, params, (x,)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert not torch.equal(out, logits(model(x)))
