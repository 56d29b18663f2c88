"""Native VeRA against real PEFT: parity rows (see ``native_peft_helpers``), checkpoints both ways, torch.func, shim.

Rows: PEFT's own VeRA rows of ``tests/test_custom_models.py`` (huggingface/peft@5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40:
"Vanilla MLP 1-5 VeRA", "Embedding + transformers Conv1D 1 VeRA", on PEFT's toy models with PEFT's default ``r=256``)
plus a transformers Llama built from a config and GPT-2 (``Conv1D``) with a small ``r``.  The frozen projections
must equal PEFT's exactly (same ``projection_prng_key``), not be copied from it.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from native_peft_helpers import MODELS, assert_parity, make_pair, mlp, out_of
from safetensors.torch import load_file

import functuner as ft
from functuner.errors import CheckpointError, ConfigError, ParamsMismatchError, UnsupportedModuleError
from functuner.tuners import vera
from functuner.tuners.vera import VeraConfig

FROZEN = ("vera_A", "vera_B")

ROWS = {
    "peft-mlp-1-regex": ("peft_mlp", {"target_modules": "lin0"}),
    "peft-mlp-2": ("peft_mlp", {"target_modules": ["lin0"]}),
    "peft-mlp-3": ("peft_mlp", {"target_modules": ["lin1"]}),
    "peft-mlp-4": ("peft_mlp", {"target_modules": ["lin0", "lin1"]}),
    "peft-mlp-5-modules_to_save": ("peft_mlp", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    "peft-emb-conv1d": ("peft_emb_conv1d", {"target_modules": ["conv1d"]}),
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4}),
    "gpt2-conv1d": ("gpt2", {"target_modules": ["c_attn", "mlp.c_proj"], "r": 4, "projection_prng_key": 5}),
}


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")  # PEFT's own note on Conv1D
@pytest.mark.parametrize("row", list(ROWS))
def test_vera_parity_with_peft(row: str) -> None:
    model_name, kwargs = ROWS[row]
    build, inputs = MODELS[model_name]
    model = build()
    p, pm = make_pair(
        model, VeraConfig(init_weights=False, **kwargs), peft.VeraConfig(init_weights=False, **kwargs), frozen=FROZEN
    )
    assert_parity(model, inputs(), p, pm)


@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_peft_loads_our_save_and_we_load_peft_save(adapter_name: str, tmp_path) -> None:
    build, inputs = MODELS["llama"]
    model, x = build(), inputs()
    cfg = {"target_modules": ["q_proj", "v_proj"], "r": 4, "init_weights": False}
    p = ft.init(model, VeraConfig(**cfg), generator=3, adapter_name=adapter_name)
    ft.save(p, tmp_path / "ours", format="peft")
    folder = tmp_path / "ours" if adapter_name == "default" else tmp_path / "ours" / adapter_name
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "VERA"
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(load_file(folder / "adapter_model.safetensors"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder, adapter_name=adapter_name).eval()
    torch.testing.assert_close(out_of(pm(**x)), out_of(ft.apply(model, p, kwargs=x)), atol=1e-5, rtol=1e-5)

    theirs = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(**cfg)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = ft.load(tmp_path / "theirs", model)
    assert isinstance(back.config, VeraConfig) and len(back) == len(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    )
    torch.testing.assert_close(out_of(ft.apply(model, back, kwargs=x)), out_of(theirs(**x)), atol=1e-5, rtol=1e-5)


def test_swift_format_round_trip_and_peft_config_init(tmp_path) -> None:
    model = mlp()
    p = ft.init(model, peft.VeraConfig(target_modules=["lin1", "lin2"], r=4, init_weights=False), generator=1)
    assert isinstance(p.config, VeraConfig) and p.config.target_modules == ("lin1", "lin2")
    ft.save(p, tmp_path)
    back = ft.load(tmp_path, model)
    assert back.config == p.config and set(back) == set(p) and all(torch.equal(back[k], p[k]) for k in p)


def test_save_projection_false_checkpoint_is_refused_by_name(tmp_path) -> None:
    model = mlp()
    with pytest.warns(UserWarning, match="to not save vera_A and vera_B"):  # PEFT's own warning
        cfg = peft.VeraConfig(target_modules=["lin1"], r=4, save_projection=False)
        pm = peft.get_peft_model(copy.deepcopy(model), cfg)
        pm.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="base_model.vera_A.*save_projection=False"):
        ft.load(tmp_path, model)


def test_projections_are_frozen_under_grad_and_vmap_works() -> None:
    model = mlp()
    cfg = VeraConfig(target_modules=["lin1", "lin2"], r=4, init_weights=False)
    p1, p2 = ft.init(model, cfg, generator=1), ft.init(model, cfg, generator=2)
    assert torch.equal(p1["vera_A.default"], p2["vera_A.default"])  # from projection_prng_key, not the generator
    x = torch.randn(4, 12)

    def loss(params: ft.TunerParams) -> torch.Tensor:
        return ft.apply(model, params, (x,)).square().mean()

    grads = torch.func.grad(loss)(p1)
    assert not grads["vera_A.default"].any() and not grads["vera_B.default"].any()
    assert grads["lin1.vera_lambda_d.default"].abs().sum() > 0
    assert vera.trainable_keys(p1) == [k for k in p1 if not k.startswith("vera_")]
    stacked = ft.tree_map(lambda a, b: torch.stack([a, b]), p1, p2)
    outs = torch.func.vmap(lambda params: ft.apply(model, params, (x,)))(stacked)
    torch.testing.assert_close(outs[1], ft.apply(model, p2, (x,)))


def test_default_init_is_identity_and_errors_name_the_problem() -> None:
    model = mlp()
    x = torch.randn(3, 12)
    p = ft.init(model, VeraConfig(target_modules=["lin1"], r=4), generator=0)
    torch.testing.assert_close(ft.apply(model, p, (x,)), model(x), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="bias='all'"):
        VeraConfig(target_modules=["lin1"], bias="all")
    with pytest.raises(UnsupportedModuleError, match=r"'0' of type Embedding"):
        ft.init(torch.nn.Sequential(torch.nn.Embedding(4, 3)), VeraConfig(target_modules=["0"], r=2), generator=0)
    bad = p.replace({**dict(p), "vera_A.default": torch.ones(4, 3)})
    with pytest.raises(ParamsMismatchError, match="too small for module 'lin1'"):
        ft.validate(model, bad)


def test_shim_trains_only_the_vectors_and_unmerges_exactly() -> None:
    x = torch.randn(3, 12)
    cfg = VeraConfig(target_modules=["lin1", "lin2"], r=4, init_weights=False)
    model = mlp()
    p = ft.init(model, cfg, generator=0)
    sm = ft.Swift.prepare_model(mlp(), cfg)
    assert isinstance(sm, ft.SwiftModel)
    trained = {k.removeprefix("base_model."): v.detach() for k, v in sm.named_parameters() if v.requires_grad}
    assert set(trained) == set(p)
    torch.testing.assert_close(sm(x), ft.apply(model, p.replace(trained), (x,)))
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    out = sm(x)
    ft.Swift.merge(sm)
    torch.testing.assert_close(sm(x), out, atol=1e-5, rtol=1e-5)
    ft.Swift.unmerge(sm)
    assert all(torch.equal(v, before[k]) for k, v in sm.state_dict().items())
    pm = ft.Swift.prepare_model(mlp(), peft.VeraConfig(target_modules=["lin1"], r=4))
    assert isinstance(pm, peft.PeftModel)
