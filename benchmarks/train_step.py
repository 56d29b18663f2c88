"""Training-step benchmarks: LoRA (issue items 1 and 7) and DoRA (item 5) vs real PEFT and the frozen floor.

Every row does the same work on the same model, dtype, threads, rank and
targets: forward, causal-LM loss, backward, and (except the floor) one
``torch.optim.AdamW`` step with the same settings on the tuner tensors.

* ``floor``: the frozen base model's own forward + backward (gradient w.r.t.
  the input embeddings, so every layer's backward runs), no adapter, no optimiser.
* ``peft``: ``peft.get_peft_model`` with the same tensors, ``loss.backward()``.
* ``functional``: ``functuner.value_and_grad(loss)(params, batch)``, a pure call.
* ``torch.func.grad``: ``torch.func.grad_and_value`` on the same loss (reported, not a target).
* ``shim``: ``functuner.SwiftModel`` with ``loss.backward()`` when it exists,
  else the same slot routing with leaf tensors and ``loss.backward()``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

import functuner as ft

from . import common as C

LR = 1e-4


def _swift_model_class() -> Any:
    return getattr(ft, "SwiftModel", None)


class _Variant:
    """One way to run the step: ``step()`` returns the loss; ``grads()`` the tuner grads after one step, by name."""

    def __init__(self, name: str, step: Callable[[], torch.Tensor], grads: Callable[[], dict[str, torch.Tensor]]):
        self.name, self.step, self.grads = name, step, grads


def _functional(
    model: torch.nn.Module, params: ft.TunerParams, ids: torch.Tensor, labels: torch.Tensor, use_torch_func: bool
) -> _Variant:
    state = {"p": params.map(lambda t: t.detach().clone()), "g": None}
    opt = torch.optim.AdamW(list(state["p"].values()), lr=LR)

    def loss_fn(p: ft.TunerParams, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ft.apply(model, p, (ids,), {"labels": labels}).loss

    if use_torch_func:
        gv = torch.func.grad_and_value(loss_fn)

        def value_grads(p: Any) -> tuple[torch.Tensor, Any]:
            g, v = gv(p, ids, labels)
            return v, g
    else:
        vg = ft.value_and_grad(loss_fn)

        def value_grads(p: Any) -> tuple[torch.Tensor, Any]:
            return vg(p, ids, labels)

    def step() -> torch.Tensor:
        loss, grads = value_grads(state["p"])
        for t, g in zip(state["p"].values(), grads.values(), strict=True):
            t.grad = g
        opt.step()
        state["g"] = grads
        for t in state["p"].values():
            t.grad = None
        return loss

    return _Variant("torch.func.grad" if use_torch_func else "functional", step, lambda: dict(state["g"].items()))


def _shim(model: torch.nn.Module, params: ft.TunerParams, ids: torch.Tensor, labels: torch.Tensor) -> _Variant:
    swift_model = _swift_model_class()
    if swift_model is not None:
        sm = swift_model(copy.deepcopy(model), params.config)
        named = dict(sm.base_model.named_parameters())
        with torch.no_grad():
            for k, v in params.items():
                named[k].copy_(v)
        leaves = {k: named[k] for k in params}

        def forward() -> torch.Tensor:
            return sm(input_ids=ids, labels=labels).loss
    else:  # the shim's mechanism without its bookkeeping: slot routing with leaf tensors
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        lp = ft.TunerParams(leaves, params.config, params.adapter_name)

        def forward() -> torch.Tensor:
            with ft.core.routing.routed(ft.functional.bind_routes(model, lp)):
                return model(ids, labels=labels).loss

    opt = torch.optim.AdamW(list(leaves.values()), lr=LR)
    last: dict[str, torch.Tensor] = {}

    def step() -> torch.Tensor:
        loss = forward()
        loss.backward()
        opt.step()
        last.clear()
        last.update({k: v.grad for k, v in leaves.items()})
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return _Variant("shim", step, lambda: dict(last))


def _peft(
    model: torch.nn.Module, params: ft.TunerParams, ids: torch.Tensor, labels: torch.Tensor, dora: bool
) -> _Variant:
    pm = C.peft_lora(model, params, use_dora=dora)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR)
    last: dict[str, torch.Tensor] = {}

    def step() -> torch.Tensor:
        loss = pm(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        last.clear()
        named = {n: p for n, p in pm.named_parameters() if p.requires_grad}
        last.update({n: p.grad for n, p in named.items()})
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def grads() -> dict[str, torch.Tensor]:
        # PEFT's in-memory names are functuner's names under the "base_model.model." prefix
        return {n.removeprefix(ft.io.keys.PEFT_PREFIX): g for n, g in last.items()}

    return _Variant("peft", step, grads)


def _floor(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> _Variant:
    emb = model.get_input_embeddings()

    def step() -> torch.Tensor:
        e = emb(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=e, labels=labels).loss
        loss.backward()
        return loss.detach()

    return _Variant("floor", step, dict)


def _check_same(report: C.Report, variants: list[_Variant], ref: str) -> None:
    losses = {v.name: v.step() for v in variants}
    grads = {v.name: v.grads() for v in variants if v.name != "floor"}
    base = losses[ref]
    for name, loss in losses.items():
        C.assert_close(f"{report.group}: loss of {name} vs {ref}", loss, base, rtol=1e-5, atol=1e-5)
    want = grads[ref]
    for name, g in grads.items():
        if set(g) != set(want):
            missing = sorted(set(want) ^ set(g))[:3]
            raise AssertionError(f"{report.group}: {name} grads cover other tensors than {ref}: {missing}")
        worst = 0.0
        for k in want:
            worst = max(
                worst, C.assert_close(f"{report.group}: grad {k} of {name}", g[k], want[k], rtol=1e-3, atol=1e-5)
            )
        report.check(f"{name} loss and all {len(want)} grads match {ref} (max |diff| {worst:.1e})")


def _step_group(group: str, s: C.Settings, dora: bool) -> C.Report:
    shape = s.shape
    report = C.Report(group)
    model = C.build_llama(shape)
    ids, labels = C.batch(shape)
    params = ft.init(model, C.lora_config(shape, dora=dora), generator=0)
    variants = [
        _peft(model, params, ids, labels, dora),
        _functional(model, params, ids, labels, use_torch_func=False),
        _functional(model, params, ids, labels, use_torch_func=True),
        _shim(model, params, ids, labels),
    ]
    if not dora:
        variants.append(_floor(model, ids, labels))
    _check_same(report, [v for v in variants if v.name != "floor"], "peft")
    times = C.interleaved({v.name: v.step for v in variants}, warmup=s.warmup, repeats=s.repeats)
    peft_t = times["peft"]
    ftgt = 0.9 if dora else 0.95
    report.add("functional / peft (time)", C.ratio(times["functional"], peft_t), ftgt)
    report.add("shim / peft (time)", C.ratio(times["shim"], peft_t), None if dora else 1.0)
    report.add("torch.func.grad / peft (time)", C.ratio(times["torch.func.grad"], peft_t))
    if not dora:
        fl = times["floor"]
        report.add("functional / floor (time)", C.ratio(times["functional"], fl), 1.15)
        report.add("shim / floor (time)", C.ratio(times["shim"], fl), 1.15)
        report.add("peft / floor (time)", C.ratio(peft_t, fl))
    report.info("peft step (median)", f"{peft_t * 1e3:.1f} ms")
    mem = {v.name: C.peak_bytes(v.step) for v in variants}
    report.add("functional / peft (peak memory)", C.ratio(mem["functional"], mem["peft"]), 1.0)
    report.add("shim / peft (peak memory)", C.ratio(mem["shim"], mem["peft"]), 1.0)
    report.add("torch.func.grad / peft (peak memory)", C.ratio(mem["torch.func.grad"], mem["peft"]))
    report.info("peak memory of one step", ", ".join(f"{k} {C.mib(v)}" for k, v in mem.items()))
    shim_kind = "SwiftModel" if _swift_model_class() is not None else "slot routing + loss.backward()"
    report.notes.append(
        f"shape: Llama hidden {shape.hidden}, {shape.layers} layers, batch {shape.batch} x seq {shape.seq},"
        f" r={shape.rank}{' DoRA' if dora else ''} on {len(C.LLAMA_TARGETS)} linear kinds per layer;"
        f" shim row = {shim_kind}; {s.repeats} interleaved repeats, medians"
    )
    return report


def run_lora(s: C.Settings) -> C.Report:
    return _step_group("LoRA training step (items 1, 7)", s, dora=False)


def run_dora(s: C.Settings) -> C.Report:
    return _step_group("DoRA training step (item 5)", s, dora=True)
