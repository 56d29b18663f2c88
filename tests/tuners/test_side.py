"""Side tuner (SWIFT's SideConfig): parity with real SWIFT 4.6 (mlp and fcn4), grads, checkpoints, bad configs."""

from __future__ import annotations

import pytest
import torch
from _swift_tuner_fixtures import builders, load_case, logits
from hypothesis import given, settings
from hypothesis import strategies as st

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, TargetError, UnsupportedModuleError
from functuner.io import checkpoint as ckpt
from functuner.tuners.side import SideConfig, side_net_forward

CASES = [("side_vit_mlp", builders.tiny_vit), ("side_toy_fcn4", builders.tiny_toy)]


def swift_params(case, name: str = "default") -> ft.TunerParams:
    files = case.adapters[name]
    return ft.TunerParams(files.state, SideConfig.from_dict(files.config), name)


@pytest.mark.parametrize(("case_name", "build"), CASES)
def test_outputs_match_swift_and_deactivation_is_exact(case_name, build):
    model = build()
    case = load_case(case_name, model)
    x = case.io["input_0"]
    base = logits(model(x))
    assert torch.equal(base, case.io["base_output"])
    params = swift_params(case)
    out = logits(ft.apply(model, params, (x,)))
    torch.testing.assert_close(out, case.io["output"], rtol=0, atol=1e-6)
    assert not torch.allclose(out, base)
    assert torch.equal(logits(model(x)), base)
    assert torch.equal(logits(ft.apply(model, params, (x,))), out)


@pytest.mark.parametrize(("case_name", "build"), CASES)
def test_init_keys_and_shapes_match_swift(case_name, build):
    model = build()
    case = load_case(case_name, model)
    cfg = SideConfig.from_dict(case.adapters["default"].config)
    params = ft.init(model, cfg, generator=0)
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        k: tuple(v.shape) for k, v in case.adapters["default"].state.items()
    }
    assert float(params[next(k for k in params if k.endswith(".alpha"))]) == 0.0


def test_grad_flows_only_to_side_params_and_matches_autograd():
    model = builders.tiny_vit()
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


def test_checkpoint_round_trip_into_a_fresh_model(tmp_path):
    model = builders.tiny_vit()
    case = load_case("side_vit_mlp", model)
    params = swift_params(case)
    sm = ft.Swift.prepare_model(model, params.config)
    sm.load_state_dict(case.adapters["default"].state, adapter_name="default")
    sm.save_pretrained(str(tmp_path))
    assert set(ckpt.read_tensors(tmp_path / "default")) == set(case.adapters["default"].state)
    fresh = ft.Swift.from_pretrained(builders.tiny_vit(), str(tmp_path))
    x = case.io["input_0"]
    with torch.no_grad():
        torch.testing.assert_close(logits(fresh(x)), case.io["output"], rtol=0, atol=1e-6)
    got, want = fresh.state_dict(), sm.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


# -- bad configs ----------------------------------------------------------------------------------------
def test_bad_configs_raise_before_anything_changes():
    model = builders.tiny_vit()
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
    model = builders.tiny_vit()
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
    fields = dict(dim=32, target_modules="backbone") | kwargs
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        SideConfig(**fields)


@settings(max_examples=10, deadline=None)
@given(st.floats(-6, 6), st.integers(0, 2**31 - 1))
def test_output_is_the_sigmoid_blend(alpha, seed):
    model = builders.tiny_toy()
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
    model = builders.tiny_vit().to(torch.bfloat16)
    params = ft.init(model, SideConfig(dim=32, target_modules=r"vit\.layers\.0", side_module_name="mlp"), generator=0)
    assert all(t.dtype == torch.float32 for t in params.values())
    x = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)
    out = logits(ft.apply(model, params, (x,)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert not torch.equal(out, logits(model(x)))
