"""Native AdaLoRA against real PEFT: parity rows, the rank allocator step by step, checkpoints both ways, torch.func.

Rows: PEFT's AdaLoRA rows of ``tests/test_custom_models.py`` (huggingface/peft@5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40:
"Vanilla MLP 1/2 AdaLoRA", "Conv2d 1/2 AdaLoRA") plus a transformers Llama and GPT-2 (``Conv1D``) built from configs.
PEFT adds ``orth_reg_weight * regulariser`` to the loss inside its forward; the functional side adds
``adalora.orth_regularization`` to its loss to compare.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from native_peft_helpers import MODELS, adapter_params, assert_parity, make_pair, mlp, out_of

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners import adalora
from functuner.tuners.adalora import AdaLoraConfig, allocator

ROWS = {
    "peft-mlp-1": ("peft_mlp", {"target_modules": ["lin0"], "total_step": 1, "orth_reg_weight": 0}),
    "peft-mlp-2": ("peft_mlp", {"target_modules": ["lin0", "lin1"], "total_step": 1}),
    "peft-conv2d-1": ("peft_conv2d", {"target_modules": ["conv2d"], "total_step": 1}),
    "peft-conv2d-2": ("peft_conv2d", {"target_modules": ["conv2d", "lin0"], "total_step": 1}),
    "llama": ("llama", {"target_modules": ["q_proj", "v_proj"], "init_r": 6, "lora_alpha": 16, "total_step": 5}),
    "gpt2-conv1d": ("gpt2", {"target_modules": ["c_attn"], "init_r": 4, "total_step": 5}),
}


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")  # PEFT's own note on Conv1D
@pytest.mark.parametrize("row", list(ROWS))
def test_adalora_parity_with_peft(row: str) -> None:
    model_name, kwargs = ROWS[row]
    build, inputs = MODELS[model_name]
    model = build()
    cfg = {"init_lora_weights": False, **kwargs}
    p, pm = make_pair(model, AdaLoraConfig(**cfg), peft.AdaLoraConfig(**cfg))
    assert_parity(model, inputs(), p, pm)


def test_orth_regularization_is_peft_loss_term() -> None:
    build, inputs = MODELS["llama"]
    model, x = build(), inputs()
    cfg = {"target_modules": ["q_proj", "v_proj"], "init_r": 4, "total_step": 4, "init_lora_weights": False}
    # PEFT adds the term in AdaLoraModel.forward, which only a task-typed PeftModel (here CAUSAL_LM) calls
    p, pm = make_pair(model, AdaLoraConfig(**cfg), peft.AdaLoraConfig(task_type="CAUSAL_LM", **cfg))
    theirs = pm(**x, labels=x["input_ids"]).loss
    plain = ft.apply(model, p, kwargs={**x, "labels": x["input_ids"]}).loss
    assert (theirs - plain).abs() > 1e-3
    ours = ft.apply(model, p, kwargs={**x, "labels": x["input_ids"]}).loss + 0.5 * adalora.orth_regularization(p)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_rank_allocator_matches_peft_step_by_step() -> None:
    build, inputs = MODELS["llama"]
    model, x = build(), inputs()
    cfg = {
        "target_modules": ["q_proj", "v_proj"],
        "init_r": 6,
        "target_r": 2,
        "tinit": 1,
        "tfinal": 2,
        "deltaT": 2,
        "total_step": 7,
        "init_lora_weights": False,
    }
    p, pm = make_pair(model, AdaLoraConfig(**cfg), peft.AdaLoraConfig(task_type="CAUSAL_LM", **cfg))
    pm.train()
    theirs = adapter_params(pm)
    state = allocator.init_state()
    labels = x["input_ids"]
    for step in range(7):
        loss = pm(**x, labels=labels).loss
        loss.backward()
        leaves = p.map(lambda t: t.detach().requires_grad_(True))
        our_loss = ft.apply(model, leaves, kwargs={**x, "labels": labels}).loss + 0.5 * adalora.orth_regularization(
            leaves
        )
        torch.testing.assert_close(our_loss, loss, atol=1e-5, rtol=1e-5)
        grads = dict(zip(leaves, torch.autograd.grad(our_loss, list(leaves.values())), strict=True))
        with torch.no_grad():  # the same plain SGD step on both sides
            for t in theirs.values():
                t -= 0.5 * t.grad
        p = p.replace({k: p[k] - 0.5 * grads[k] for k in p})
        pm.base_model.update_and_allocate(step)
        p, state = allocator.update_and_allocate(p, grads, state, step)
        pm.zero_grad()
        for k in p:
            torch.testing.assert_close(
                p[k], theirs[k].detach(), atol=1e-5, rtol=1e-5, msg=lambda m, k=k, step=step: f"{step} {k}: {m}"
            )
    pattern = pm.peft_config["default"].rank_pattern
    assert state.rank_pattern is not None
    assert {k: list(v) for k, v in state.rank_pattern.items()} == {k: list(v) for k, v in pattern.items()}
    kept = sum(sum(v) for v in state.rank_pattern.values())
    assert kept == 2 * 4  # target_r x modules (2 layers x 2 targets)


def test_peft_loads_our_save_and_we_load_peft_trained_save(tmp_path) -> None:
    build, inputs = MODELS["llama"]
    model, x = build(), inputs()
    cfg = {
        "target_modules": ["q_proj", "v_proj"],
        "init_r": 4,
        "target_r": 2,
        "total_step": 3,
        "init_lora_weights": False,
    }
    p = ft.init(model, AdaLoraConfig(**cfg), generator=3)
    ft.save(p, tmp_path / "ours", format="peft")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(out_of(pm(**x)), out_of(ft.apply(model, p, kwargs=x)), atol=1e-5, rtol=1e-5)

    theirs = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(**cfg))
    theirs.train()
    for step in range(3):  # PEFT's allocation runs, so its checkpoint holds a rank_pattern and truncated tensors
        theirs(**x, labels=x["input_ids"]).loss.backward()
        theirs.base_model.update_and_allocate(step)
        theirs.zero_grad()
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = ft.load(tmp_path / "theirs", model)
    assert isinstance(back.config, AdaLoraConfig) and back.config.rank_pattern
    assert any(back[k].shape[0] < 4 for k in back if ".lora_A." in k)
    # PEFT warns about its own saved rank_pattern keys (they name lora_E tensors, not modules), then applies them
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "theirs").eval()
    assert any("rank_pattern keys did not match any targeted module" in str(w.message) for w in seen)
    torch.testing.assert_close(out_of(ft.apply(model, back, kwargs=x)), out_of(reloaded(**x)), atol=1e-5, rtol=1e-5)


def test_swift_round_trip_peft_config_init_grad_and_vmap(tmp_path) -> None:
    model = mlp()
    pc = peft.AdaLoraConfig(target_modules=["lin1", "lin2"], init_r=4, total_step=10, init_lora_weights=False)
    p1 = ft.init(model, pc, generator=1)
    assert isinstance(p1.config, AdaLoraConfig)
    ft.save(p1, tmp_path)
    back = ft.load(tmp_path, model)
    assert back.config == p1.config and all(torch.equal(back[k], p1[k]) for k in p1)
    p2 = ft.init(model, p1.config, generator=2)
    x = torch.randn(4, 12)

    def loss(params: ft.TunerParams) -> torch.Tensor:
        return ft.apply(model, params, (x,)).square().mean() + 0.5 * adalora.orth_regularization(params)

    grads = torch.func.grad(loss)(p1)
    leaves = p1.map(lambda t: t.detach().requires_grad_(True))
    for g, e in zip(grads.values(), torch.autograd.grad(loss(leaves), list(leaves.values())), strict=True):
        torch.testing.assert_close(g, e)
    stacked = ft.tree_map(lambda a, b: torch.stack([a, b]), p1, p2)
    outs = torch.func.vmap(lambda params: ft.apply(model, params, (x,)))(stacked)
    torch.testing.assert_close(outs[1], ft.apply(model, p2, (x,)))


def test_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="total_step is None"):
        ft.init(mlp(), AdaLoraConfig(target_modules=["lin1"]), generator=0)
    with pytest.raises(ConfigError, match="no budgeting"):
        AdaLoraConfig(target_modules=["lin1"], total_step=4, tinit=2, tfinal=2)
    with pytest.raises(ConfigError, match="use_rslora=True is not supported"):
        AdaLoraConfig(target_modules=["lin1"], total_step=4, use_rslora=True)


def test_shim_merges_and_unmerges_and_peft_configs_still_go_to_peft() -> None:
    x = torch.randn(3, 12)
    cfg = AdaLoraConfig(target_modules=["lin1", "lin2"], init_r=4, total_step=5, init_lora_weights=False)
    sm = ft.Swift.prepare_model(mlp(), cfg)
    assert isinstance(sm, ft.SwiftModel)
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    out = sm(x)
    ft.Swift.merge(sm)
    torch.testing.assert_close(sm(x), out, atol=1e-5, rtol=1e-5)
    ft.Swift.unmerge(sm)
    assert all(torch.equal(v, before[k]) for k, v in sm.state_dict().items())
    pm = ft.Swift.prepare_model(mlp(), peft.AdaLoraConfig(target_modules=["lin1"], total_step=5))
    assert isinstance(pm, peft.PeftModel)
