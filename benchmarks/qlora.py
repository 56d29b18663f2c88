"""QLoRA training step: LoRA on an int8 and a 4-bit quantized base, functuner vs PEFT, peak memory.

The base is the suite's Llama with every decoder linear layer quantized by
bitsandbytes (the backend both libraries dispatch to on a quantized model):
LLM.int8 (``Linear8bitLt``) and 4-bit NF4 (``Linear4bit``, fp32 compute),
``lm_head`` kept float as transformers' quantizers do.  Rows per base:

* ``peft``: ``peft.get_peft_model`` (its bitsandbytes LoRA layers) with the same adapter tensors,
  ``loss.backward()`` and ``torch.optim.AdamW``;
* ``functional``: ``functuner.value_and_grad(loss)(params, batch)`` and the same AdamW step;
* ``floor``: the frozen quantized base's forward + backward w.r.t. the input embeddings (no adapter).

Before timing, the first step's loss and every adapter gradient must agree between the two libraries.
Peak memory: torch's own allocations during one step (``common.peak_bytes``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

import functuner as ft

from . import common as C

LR = 1e-4
QUICK_QLORA = C.Shape(hidden=64, layers=1, heads=2, vocab=64, batch=2, seq=8, rank=4)


def quantize(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """``model`` with every linear layer but ``lm_head`` replaced by a bitsandbytes ``bits``-bit layer (in place)."""
    import bitsandbytes as bnb

    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or name == "lm_head":
                continue
            q: torch.nn.Module
            if bits == 4:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    quant_type="nf4",
                    compute_dtype=torch.float32,
                )
            else:
                q = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=child.bias is not None, has_fp16_weights=False
                )
            q.load_state_dict(child.state_dict())
            setattr(parent, name, q.to(C.device()))
    # what transformers sets when it loads with a BitsAndBytesConfig (PEFT dispatches its bnb layers on it)
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = bits == 4, bits == 8
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _functional(model: torch.nn.Module, params: Any, ids: torch.Tensor, labels: torch.Tensor) -> tuple[Any, Any]:
    state = {"p": params.map(lambda t: t.detach().clone())}
    opt = torch.optim.AdamW(list(state["p"].values()), lr=LR)

    def loss_fn(p: Any, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ft.apply(model, p, (ids,), {"labels": labels}).loss

    vg = ft.value_and_grad(loss_fn)

    def step() -> tuple[torch.Tensor, Any]:
        loss, grads = vg(state["p"], ids, labels)
        for k, t in state["p"].items():
            t.grad = grads[k]
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, grads

    return step, state


def _peft(pm: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    trainable = [t for t in pm.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR)

    def step() -> torch.Tensor:
        loss = pm(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _floor(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=emb, labels=labels).loss
        torch.autograd.grad(loss, emb)

    return step


def _check(model: torch.nn.Module, params: Any, pm: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> None:
    """The first step's loss and every adapter gradient agree between functuner and PEFT."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss = ft.apply(model, params.replace(leaves), (ids,), {"labels": labels}).loss
    grads = torch.autograd.grad(loss, list(leaves.values()))
    peft_loss = pm(input_ids=ids, labels=labels).loss
    peft_loss.backward()
    named = dict(pm.named_parameters())
    C.assert_close("QLoRA loss", loss, peft_loss, rtol=1e-4, atol=1e-5)
    for k, g in zip(leaves, grads, strict=True):
        C.assert_close(f"QLoRA grad {k}", g, named["base_model.model." + k].grad, rtol=1e-3, atol=1e-5)
    pm.zero_grad(set_to_none=True)


def run(s: C.Settings) -> C.Report:
    import peft

    shape = QUICK_QLORA if s.quick else C.Shape(hidden=512, layers=2, heads=8, vocab=1024, batch=4, seq=64, rank=16)
    report = C.Report(f"QLoRA training step (LoRA on a bitsandbytes int8 / 4-bit base, hidden {shape.hidden})")
    ids, labels = C.batch(shape)
    for bits, label in ((8, "int8 (LLM.int8)"), (4, "4-bit NF4")):
        model = quantize(C.build_llama(shape), bits)
        cfg = C.lora_config(shape)
        params = ft.init(model, cfg, generator=0)
        pm = peft.get_peft_model(
            copy.deepcopy(model),
            peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules)),
        )
        peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(params))
        kinds = {type(m).__name__ for m in pm.modules() if hasattr(m, "lora_A")}
        _check(model, params, pm, ids, labels)
        report.check(f"{label}: loss and all {len(params)} adapter grads match PEFT ({', '.join(sorted(kinds))})")
        ours, _ = _functional(model, params, ids, labels)
        theirs = _peft(pm, ids, labels)
        floor = _floor(model, ids, labels)
        times = C.interleaved({"functional": ours, "peft": theirs, "floor": floor}, warmup=s.warmup, repeats=s.repeats)
        report.add(f"{label} step: functional / PEFT", C.ratio(times["functional"], times["peft"]), target=1.0)
        report.add(f"{label} step: functional / frozen-base floor", C.ratio(times["functional"], times["floor"]))
        peak_ours, peak_peft = C.peak_bytes(ours), C.peak_bytes(theirs)
        report.info(f"{label} peak memory: functional", C.mib(peak_ours))
        report.info(f"{label} peak memory: PEFT", C.mib(peak_peft))
        report.add(f"{label} peak memory: functional / PEFT", C.ratio(peak_ours, peak_peft), target=1.0)
    report.notes.append(
        "bitsandbytes on CPU: its int8 matmul casts inputs to fp16 and its 4-bit one dequantizes per call; both"
        " libraries call the same base layers, so the ratios compare the adapter paths around them."
    )
    return report
