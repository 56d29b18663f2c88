"""LoRA and DoRA on quantized bases against PEFT on the same quantized model with the same adapter values.

Backends (all run on CPU here): bitsandbytes 4-bit NF4 and 8-bit LLM.int8, torchao int8 weight-only,
optimum-quanto int8 and int4, HQQ 4-bit.  For each, functuner params drawn with ``init_lora_weights=False``
are copied into ``peft.get_peft_model`` of a second, bitwise-identical quantized model
(``tests/quant/quant_models.py``), and compared on: the forward and the adapter gradients, a few AdamW
steps (the loss curves), adapter dtypes (fp32 by default, as PEFT's ``autocast_adapter_dtype=True``;
``lora_dtype`` honoured), and checkpoints in both formats (SWIFT's read back by functuner, PEFT's read by
``peft.PeftModel.from_pretrained`` on the quantized model).
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch

import functuner as ft
from functuner import LoRAConfig, Swift
from tests.quant.quant_models import BACKENDS, TARGETS, ids, quantized_llama

# PEFT warns that a torchao layer built outside transformers' TorchAoConfig cannot be merged by PEFT (its merge
# is not compared here; tests/quant/test_quant_merge.py compares functuner's merge with the float merge instead)
pytestmark = pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated without:UserWarning")

ATOL = 1e-5  # fp32 forward and gradients (measured: <= 2e-7 forward)
LOSS_ATOL = 1e-4  # loss curves after AdamW steps (PEFT's own tests compare losses at 1e-4)


def _pair(backend: str, use_dora: bool = False, **extra):
    model = quantized_llama(backend)
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora)
    p = ft.init(model, LoRAConfig(init_lora_weights=False, **cfg, **extra), generator=0)
    pm = peft.get_peft_model(quantized_llama(backend), peft.LoraConfig(**cfg))
    result = peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(p))
    assert result.unexpected_keys == []
    return model, p, pm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_dora", [False, True])
def test_forward_and_grads_match_peft(backend: str, use_dora: bool) -> None:
    model, p, pm = _pair(backend, use_dora)
    x = ids()
    assert all(t.dtype == torch.float32 for t in p.values())  # fp32 adapters on an integer base
    a = p["model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert tuple(a.shape) == (4, 64)  # the true in-features, not the packed storage's
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    ours = ft.apply(model, p.replace(leaves), kwargs={"input_ids": x}).logits
    theirs = pm(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    with torch.no_grad():
        assert (ours - model(input_ids=x).logits).abs().max() > 1e-2  # the adapter really changes the output
    w = torch.linspace(-1, 1, ours.numel()).reshape(ours.shape)
    g_ours = torch.autograd.grad((ours * w).sum(), list(leaves.values()))
    (theirs * w).sum().backward()
    named = dict(pm.named_parameters())
    for (k, _), g in zip(leaves.items(), g_ours, strict=True):
        peft_name = "base_model.model." + k
        torch.testing.assert_close(g, named[peft_name].grad, atol=ATOL, rtol=1e-4, msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_steps_follow_peft_loss_curve(backend: str) -> None:
    model, p, pm = _pair(backend)
    x = ids()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    opt = torch.optim.AdamW(leaves.values(), lr=1e-2)
    peft_opt = torch.optim.AdamW([t for t in pm.parameters() if t.requires_grad], lr=1e-2)
    assert sum(t.numel() for t in pm.parameters() if t.requires_grad) == sum(t.numel() for t in p.values())
    ours_curve, theirs_curve = [], []
    for _ in range(3):
        loss = ft.apply(model, p.replace(leaves), kwargs={"input_ids": x, "labels": x}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours_curve.append(float(loss.detach()))
        peft_loss = pm(input_ids=x, labels=x).loss
        peft_opt.zero_grad()
        peft_loss.backward()
        peft_opt.step()
        theirs_curve.append(float(peft_loss.detach()))
    assert ours_curve == pytest.approx(theirs_curve, abs=LOSS_ATOL)
    assert ours_curve[-1] < ours_curve[0]  # it trains


@pytest.mark.parametrize("backend", ["bnb4", "hqq4"])
def test_shim_trains_on_a_quantized_base(backend: str) -> None:
    """``Swift.prepare_model`` on a quantized base (the issue's raw RuntimeError before): fp32 adapters, they train."""
    model = quantized_llama(backend)
    sm = Swift.prepare_model(model, LoRAConfig(r=4, target_modules=TARGETS))
    trainable = [t for t in sm.parameters() if t.requires_grad]
    assert trainable and all(t.dtype == torch.float32 for t in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = ids()
    losses = []
    for _ in range(3):
        loss = sm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_lora_dtype_is_honoured_on_a_quantized_base() -> None:
    model = quantized_llama("bnb4")
    p = ft.init(model, LoRAConfig(r=4, target_modules=TARGETS, lora_dtype="bf16"), generator=0)
    assert all(t.dtype == torch.bfloat16 for t in p.values())
    out = ft.apply(model, p, kwargs={"input_ids": ids()}).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_in_both_formats_round_trip(backend: str, tmp_path: Path) -> None:
    model, p, pm = _pair(backend, lora_dtype="fp32")
    x = ids()
    with torch.no_grad():
        want = ft.apply(model, p, kwargs={"input_ids": x}).logits
    ft.save(p, tmp_path / "swift", format="swift")
    back = ft.load(tmp_path / "swift", quantized_llama(backend))
    ft.save(p, tmp_path / "peft", format="peft")  # lora_dtype='fp32' is PEFT's default autocast: no refusal
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "lora_dtype" not in config and config["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(quantized_llama(backend), str(tmp_path / "peft"))
    assert all(t.dtype == torch.float32 for n, t in loaded.named_parameters() if "lora_" in n)
    from_peft = ft.load(tmp_path / "peft", quantized_llama(backend))
    with torch.no_grad():
        torch.testing.assert_close(ft.apply(model, back, kwargs={"input_ids": x}).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(loaded(input_ids=x).logits, want, atol=ATOL, rtol=0)
        torch.testing.assert_close(ft.apply(model, from_peft, kwargs={"input_ids": x}).logits, want, atol=0, rtol=0)


def test_shim_save_to_peft_format_keeps_fp32_lora_dtype(tmp_path: Path) -> None:
    """The issue: ``lora_dtype='fp32'`` was refused by ``save_to_peft_format``; it is PEFT's default autocast."""
    sm = Swift.prepare_model(quantized_llama("bnb4"), LoRAConfig(r=4, target_modules=TARGETS, lora_dtype="fp32"))
    sm.save_pretrained(str(tmp_path / "a"))
    Swift.save_to_peft_format(str(tmp_path / "a"), str(tmp_path / "p"))
    pm = peft.PeftModel.from_pretrained(quantized_llama("bnb4"), str(tmp_path / "p"))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x).logits, sm(input_ids=x).logits, atol=ATOL, rtol=0)
    # a dtype PEFT has no setting for is still refused
    sm16 = Swift.prepare_model(quantized_llama("bnb4"), LoRAConfig(r=4, target_modules=TARGETS, lora_dtype="fp16"))
    sm16.save_pretrained(str(tmp_path / "b"))
    with pytest.raises(ft.errors.CheckpointError, match="lora_dtype"):
        Swift.save_to_peft_format(str(tmp_path / "b"), str(tmp_path / "q"))
    assert not (tmp_path / "q").exists()
