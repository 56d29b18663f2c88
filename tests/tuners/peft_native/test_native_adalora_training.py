"""AdaLoRA training in the shim against real PEFT: the loss term, ``update_and_allocate``, the saved allocation.

PEFT's AdaLoRA model adds ``orth_reg_weight`` times its orthogonal regulariser to ``outputs.loss`` in its forward
(only for a task-typed ``PeftModel``: ``PeftModel`` itself calls the base model directly), and users call
``model.base_model.update_and_allocate(step)`` after ``optimizer.step()`` and before ``zero_grad()`` (PEFT's
docstring of ``AdaLoraModel.update_and_allocate``).  Here a ``SwiftModel`` and a ``PeftModel`` start from the same
tensors and train side by side with AdamW (same seeds and data) through the budget phase (masking every
``deltaT`` steps), the final allocation at ``total_step - tfinal`` and the fixed phase after it; losses, every
adapter tensor and the rank pattern must agree at every step (fp32, PEFT's tolerances 1e-5), then the checkpoints
load both ways.  Neither transformers nor PEFT runs AdaLoRA's step inside ``Trainer``; functuner's
``TrainingStepCallback`` does, with the step count a hand-written loop passes (checked against that loop).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from native_peft_helpers import MODELS, adapter_params
from safetensors.torch import load_file

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError
from functuner.shim import TrainingStepCallback
from functuner.shim.training import run_step
from functuner.tuners import adalora
from functuner.tuners.adalora import AdaLoraConfig

ATOL = RTOL = 1e-5
CFG: dict[str, Any] = {
    "target_modules": ["q_proj", "v_proj"],
    "init_r": 6,
    "target_r": 2,
    "tinit": 2,
    "tfinal": 3,
    "deltaT": 2,
    "total_step": 10,
    "lora_alpha": 16,
    "task_type": "CAUSAL_LM",
}


def _pair(cfg: dict[str, Any]) -> tuple[torch.nn.Module, ft.SwiftModel, torch.nn.Module, dict[str, torch.Tensor]]:
    """(base model, SwiftModel, PeftModel) holding PEFT's initial tensors, both in train mode; and the inputs."""
    build, inputs = MODELS["llama"]
    model = build()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(**cfg)).train()
    sm = ft.Swift.prepare_model(copy.deepcopy(model), AdaLoraConfig(**cfg)).train()
    theirs = adapter_params(pm)
    live = sm.adapters["default"].tensors
    assert set(live) == set(theirs)
    with torch.no_grad():
        for k, t in live.items():
            t.copy_(theirs[k])
    return model, sm, pm, inputs()


def _close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> None:
    assert set(ours) == set(theirs), what
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{what} {k}: {m}")


def test_shim_trains_like_peft_and_checkpoints_load_both_ways(tmp_path: Path) -> None:
    model, sm, pm, x = _pair(CFG)
    labels = x["input_ids"]
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    opt_s = torch.optim.AdamW([p for p in sm.parameters() if p.requires_grad], lr=2e-2)
    assert isinstance(sm.base_model, type(model))  # SWIFT's base_model is the wrapped model; the step is on it
    edge = CFG["total_step"] - CFG["tfinal"]
    masked_before_edge = False
    for step in range(CFG["total_step"]):
        theirs = pm(**x, labels=labels).loss
        ours = sm(**x, labels=labels).loss
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL, msg=lambda m, step=step: f"loss {step}: {m}")
        theirs.backward()
        ours.backward()
        opt_p.step()
        opt_s.step()
        pm.base_model.update_and_allocate(step)
        (sm.base_model if step % 2 else sm).update_and_allocate(step)  # both ways users reach it
        opt_p.zero_grad()
        opt_s.zero_grad()
        _close({k: v.detach() for k, v in sm.adapters["default"].tensors.items()}, adapter_params(pm), f"step {step}")
        pattern = pm.peft_config["default"].rank_pattern
        mine = sm.adapters["default"].train_state.rank_pattern
        assert (mine is None) == (pattern is None), step
        if pattern is not None:
            assert {k: list(v) for k, v in mine.items()} == {k: list(v) for k, v in pattern.items()}, step
            masked_before_edge |= step < edge and sum(map(sum, pattern.values())) < 6 * 4
    assert masked_before_edge  # the budget phase masked ranks before the final allocation
    final = sm.adapters["default"].train_state.rank_pattern
    assert sum(map(sum, final.values())) == CFG["target_r"] * 4  # target_r x modules (2 layers x q, v)
    assert min(map(sum, final.values())) == 0  # a module lost every rank: the saved tensors have 0 rows

    pm.eval()
    sm.eval()
    with warnings.catch_warnings():  # a module allocated 0 ranks: PEFT's save mistakes it for an ungathered shard
        warnings.filterwarnings("ignore", "Adapter 'default': .* LoRA tensor.* have invalid shape", peft.PeftWarning)
        pm.save_pretrained(tmp_path / "theirs")
    sm.save_pretrained(tmp_path / "ours", peft_format=True)
    cfg_t = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    cfg_o = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg_o["peft_type"] == "ADALORA" and cfg_o["rank_pattern"] == cfg_t["rank_pattern"]
    assert cfg_o["rank_pattern"] == {k.removesuffix(".default"): list(v) for k, v in final.items()}
    _close(
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
        load_file(tmp_path / "theirs" / "adapter_model.safetensors"),
        "saved",
    )
    out = sm(**x).logits
    with warnings.catch_warnings(record=True) as seen:  # PEFT's own note on its saved rank_pattern keys
        warnings.simplefilter("always")
        from_ours = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    assert any("rank_pattern keys did not match any targeted module" in str(w.message) for w in seen)
    torch.testing.assert_close(from_ours(**x).logits, out, atol=ATOL, rtol=RTOL)
    back = ft.load(tmp_path / "theirs", model)  # PEFT's checkpoint, allocated ranks included
    assert back.config.rank_pattern == cfg_t["rank_pattern"]
    torch.testing.assert_close(ft.apply(model, back, kwargs=x).logits, out, atol=ATOL, rtol=RTOL)
    sm.save_pretrained(tmp_path / "swift")  # SWIFT's layout holds the same allocation and reloads into a SwiftModel
    again = ft.SwiftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "swift"))
    torch.testing.assert_close(again(**x).logits, out, atol=ATOL, rtol=RTOL)
    assert again.adapters["default"].config.rank_pattern == cfg_t["rank_pattern"]


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_loss_term_only_where_peft_adds_it(task_type: str | None) -> None:
    cfg = {**CFG, "task_type": task_type, "init_lora_weights": False}
    _, sm, pm, x = _pair(cfg)
    theirs = pm(**x, labels=x["input_ids"]).loss
    ours = sm(**x, labels=x["input_ids"]).loss
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    plain = sm.model(**x, labels=x["input_ids"]).loss  # the wrapped model itself: no term
    assert ((ours - plain).abs() > 1e-3) == (task_type is not None)
    assert sm(**x).loss is None  # no labels: outputs untouched


def test_step_errors_change_nothing_and_copies_keep_their_own_state() -> None:
    _, sm, _, x = _pair({**CFG, "init_lora_weights": False})
    before = {k: v.detach().clone() for k, v in sm.adapters["default"].tensors.items()}
    with pytest.raises(ParamsMismatchError, match=r"no gradient for .*call it after loss.backward\(\)"):
        sm.update_and_allocate(0)
    assert all(torch.equal(v, before[k]) for k, v in sm.adapters["default"].tensors.items())
    assert sm.adapters["default"].train_state is None
    sm(**x, labels=x["input_ids"]).loss.backward()
    sm.update_and_allocate(3)  # after tinit, not a multiple of deltaT: importance EMAs only
    assert sm.adapters["default"].train_state.rank_pattern is None
    sm.update_and_allocate(4)  # masks the least important singular values to the budget
    e = [v for k, v in sm.adapters["default"].tensors.items() if ".lora_E." in k]
    assert sum(int((t == 0).sum()) for t in e) > 0
    twin = copy.deepcopy(sm)
    assert twin.base_model.update_and_allocate.state is twin._state  # the copy's method drives the copy
    torch.testing.assert_close(twin(**x).logits, sm(**x).logits)
    lora = ft.Swift.prepare_model(MODELS["llama"][0](), ft.LoRAConfig(target_modules=["q_proj"]))
    assert not hasattr(lora.base_model, "update_and_allocate")
    with pytest.raises(ConfigError, match=r"no trainable adapter offers this step \(adapters: \['default: LORA'\]\)"):
        run_step(lora._state, "update_and_allocate", 0)


def test_trainer_callback_runs_the_step_as_a_hand_written_loop() -> None:
    import transformers  # a test dependency (pyproject test extra): never skipped

    _, sm, _, x = _pair(CFG)
    twin = copy.deepcopy(sm)
    rows = [{"input_ids": x["input_ids"][0], "labels": x["input_ids"][0]}] * CFG["total_step"]
    args = transformers.TrainingArguments(
        output_dir="unused",
        per_device_train_batch_size=1,
        max_steps=CFG["total_step"],
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
    )
    transformers.Trainer(model=sm, args=args, train_dataset=rows, callbacks=[TrainingStepCallback()]).train()
    opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    twin.train()
    for step in range(CFG["total_step"]):
        twin(input_ids=rows[step]["input_ids"][None], labels=rows[step]["labels"][None]).loss.backward()
        opt.step()
        twin.update_and_allocate(step)
        opt.zero_grad()
    assert sm.adapters["default"].train_state.rank_pattern == twin.adapters["default"].train_state.rank_pattern
    _close(
        {k: v.detach() for k, v in sm.adapters["default"].tensors.items()},
        {k: v.detach() for k, v in twin.adapters["default"].tensors.items()},
        "trainer",
    )


def test_allocated_keeps_the_kept_triplets_and_composes_patterns() -> None:
    model = MODELS["llama"][0]()
    cfg = AdaLoraConfig(target_modules=["q_proj"], init_r=4, total_step=5, init_lora_weights=False)
    p = ft.init(model, cfg, generator=0)
    key = "model.layers.0.self_attn.q_proj.lora_E.default"
    first = {k: (True, False, True, True) if k == key else (True,) * 4 for k in p if ".lora_E." in k}
    once = adalora.allocated(p, first)
    ft.validate(model, once)  # shapes as the config's rank_pattern says (PEFT's saved form)
    torch.testing.assert_close(once[key.replace("lora_E", "lora_B")], p[key.replace("lora_E", "lora_B")][:, [0, 2, 3]])
    twice = adalora.allocated(once, {k: (False, True, True) if k == key else (True,) * 4 for k in first})
    assert twice.config.rank_pattern["model.layers.0.self_attn.q_proj.lora_E"] == [False, False, True, True]
    torch.testing.assert_close(twice[key], p[key][[2, 3]])
    ft.validate(model, twice)
    with pytest.raises(ParamsMismatchError, match=r"rank_pattern\['nope.lora_E.default'\] does not fit"):
        adalora.allocated(p, {"nope.lora_E.default": (True,)})
