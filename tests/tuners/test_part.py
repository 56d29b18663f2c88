"""Part tuner (SWIFT's PartConfig): weight copies, merge, grads, renaming, composition toggles, bad configs.

Parity with the real ms-swift 4.6 (outputs, deactivation, checkpoints, shim): tests/tuners/test_swift_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from _swift_tuner_fixtures import SWIFT_OUTPUT_TOL, load_case
from hypothesis import given, settings
from hypothesis import strategies as st
from models import logits, tiny_bert

import functuner as ft
from functuner.errors import CheckpointError, ConfigError, ParamsMismatchError, TargetError
from functuner.io import checkpoint as ckpt
from functuner.io.keys import rename_adapter, to_swift_state_dict
from functuner.tuners.adapter import AdapterConfig
from functuner.tuners.part import PartConfig, part_from_swift_state_dict
from functuner.tuners.prompt import PromptConfig

TARGET = r".*layer\.0\.output\.dense"


def swift_params(case, name: str = "default") -> ft.TunerParams:
    """SWIFT's Part copies (saved at the original keys), read by functuner's checkpoint reader."""
    read = ckpt.read_adapter_dir(case.folder, name)[name]
    assert isinstance(read.config, PartConfig)
    return ft.TunerParams(read.state, read.config, name)


def test_init_copies_the_weights_so_the_model_is_unchanged_at_first():
    # (init's keys as SWIFT saves them: test_swift_parity.py::test_init_gives_swifts_keys_and_shapes[part_bert])
    model = tiny_bert()
    params = ft.init(model, PartConfig(target_modules=TARGET), generator=0)
    dense = model.encoder.layer[0].output.dense
    assert torch.equal(params["encoder.layer.0.output.dense._part_default.weight"], dense.weight)
    assert params["encoder.layer.0.output.dense._part_default.weight"].data_ptr() != dense.weight.data_ptr()
    x = load_case("part_bert").io["input_0"]
    assert torch.equal(logits(ft.apply(model, params, (x,))), logits(model(x)))


def test_merge_is_the_weight_replacement_and_leaves_the_model_alone():
    model = tiny_bert()
    case = load_case("part_bert", model)
    params = swift_params(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = ft.merge(model, params)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    key = "encoder.layer.0.output.dense.weight"
    assert torch.equal(merged[key], params["encoder.layer.0.output.dense._part_default.weight"])
    assert (
        merged["encoder.layer.1.output.dense.weight"]
        is dict(model.named_parameters())["encoder.layer.1.output.dense.weight"]
    )
    x = case.io["input_0"]
    out = logits(torch.func.functional_call(model, merged, (x,)))
    torch.testing.assert_close(out, case.io["output"], **SWIFT_OUTPUT_TOL)  # recorded by ms-swift on another CPU
    with pytest.raises(ConfigError, match="part has no unmerge"):
        ft.unmerge(model, params, merged)


def test_grad_flows_only_to_the_part_and_matches_autograd():
    model = tiny_bert()
    case = load_case("part_bert", model)
    params = swift_params(case)
    x = case.io["input_0"]

    def loss(p):
        return logits(ft.apply(model, p, (x,))).pow(2).mean()

    grads = torch.func.grad(loss)(params)
    assert set(grads) == set(params) and all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters())
    leaves = params.map(lambda t: t.detach().clone().requires_grad_(True))
    loss(leaves).backward()
    for k in params:
        torch.testing.assert_close(grads[k], leaves[k].grad, rtol=1e-5, atol=1e-8)


def test_renaming_the_adapter_renames_the_part_component():
    # (the checkpoint's SWIFT keys and the shim loading SWIFT's directory: test_swift_parity.py, row part_bert)
    params = swift_params(load_case("part_bert"))
    assert set(rename_adapter(params, "default", "other")) == {
        k.replace("_part_default", "_part_other") for k in params
    }


def test_composition_each_tuner_toggles_independently():
    # (the composed output against SWIFT's: test_swift_parity.py, row compose_bert)
    model = tiny_bert()
    case = load_case("compose_bert", model)
    plist = [
        swift_params(case, "part"),
        ft.TunerParams(case.adapters["ad"].state, AdapterConfig.from_dict(case.adapters["ad"].config), "ad"),
        ft.TunerParams(case.adapters["pr"].state, PromptConfig.from_dict(case.adapters["pr"].config), "pr"),
    ]
    x = case.io["input_0"]
    base = logits(model(x))
    out = logits(ft.apply(model, plist, (x,)))
    # each tuner on its own toggles independently: dropping one changes the output, the base model stays exact
    for i in range(3):
        rest = plist[:i] + plist[i + 1 :]
        assert not torch.allclose(logits(ft.apply(model, rest, (x,)))[:, -x.shape[1] :], out[:, -x.shape[1] :])
    assert torch.equal(logits(model(x)), base)


def test_nested_matches_keep_only_the_outermost_module():
    model = tiny_bert()
    params = ft.init(model, PartConfig(target_modules=r".*layer\.0\.output(\.dense)?"), generator=0)
    assert {k.split("._part_")[0] for k in params} == {"encoder.layer.0.output"}


def test_bad_configs_and_params():
    model = tiny_bert()
    with pytest.raises(ConfigError, match="target_modules must be a regex"):
        PartConfig(target_modules=["dense"])
    with pytest.raises(ConfigError, match="not a valid regex"):
        PartConfig(target_modules="(")
    with pytest.raises(TargetError, match="matched no module"):
        ft.init(model, PartConfig(target_modules=r"nothing"), generator=0)
    params = ft.init(model, PartConfig(target_modules=TARGET), generator=0)
    key = "encoder.layer.0.output.dense._part_default.weight"
    with pytest.raises(ParamsMismatchError, match="has shape"):
        ft.validate(model, ft.TunerParams({**params, key: torch.zeros(3, 3)}, params.config))
    with pytest.raises(CheckpointError, match="lies under no module"):
        part_from_swift_state_dict({"pooler.dense.weight": torch.zeros(1)}, TARGET)


_SHARED_BERT: list = []


@settings(max_examples=10, deadline=None)
@given(st.floats(-0.5, 0.5), st.integers(0, 2**31 - 1))
def test_merged_weights_compute_what_apply_computes(scale, seed):
    if not _SHARED_BERT:  # built once: every example only reads it
        _SHARED_BERT.append(tiny_bert())
    model = _SHARED_BERT[0]
    params = ft.init(model, PartConfig(target_modules=r".*layer\.1\.attention\.self\.(query|value)"), generator=0)
    g = torch.Generator().manual_seed(seed)
    params = params.map(lambda t: t + scale * torch.randn(t.shape, generator=g))
    x = torch.randint(0, 64, (2, 5), generator=g)
    merged = ft.merge(model, params)
    torch.testing.assert_close(
        logits(torch.func.functional_call(model, merged, (x,))),
        logits(ft.apply(model, params, (x,))),
        rtol=1e-5,
        atol=1e-6,
    )


def test_switching_parts_in_the_shim_swaps_the_weights():
    model = tiny_bert()
    case = load_case("part_bert", model)
    first = swift_params(case, "default")
    second = first.map(lambda t: t * -1.0).replace(adapter_name="p2")
    second = ft.TunerParams({k.replace("_part_default", "_part_p2"): v for k, v in second.items()}, first.config, "p2")
    x = case.io["input_0"]
    base = logits(model(x))
    want = {"default": logits(ft.apply(model, first, (x,))), "p2": logits(ft.apply(model, second, (x,)))}
    sm = ft.Swift.prepare_model(model, {"default": first.config})
    sm = ft.Swift.prepare_model(sm, {"p2": first.config})  # its copy must not include the first part's tensors
    sm.load_state_dict(case.adapters["default"].state, adapter_name="default")
    sm.load_state_dict(to_swift_state_dict(second, "p2"), adapter_name="p2")
    with torch.no_grad():
        for name in ("default", "p2", "default"):
            sm.set_active_adapters([name])
            torch.testing.assert_close(logits(sm(x)), want[name], rtol=0, atol=1e-6)
        sm.set_active_adapters([])
        assert torch.equal(logits(sm(x)), base)
