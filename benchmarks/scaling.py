"""Scaling table: how the training step and the merge grow with hidden size and rank, functuner vs PEFT.

For each hidden size (rank fixed at 16) and each rank (hidden fixed at 512),
two ratios: the LoRA training step (``functuner.value_and_grad`` + AdamW vs
PEFT's ``loss.backward()`` + AdamW) and the merge (``functuner.merge`` vs
PEFT's ``merge_and_unload``).  Losses are checked equal before timing.
"""

from __future__ import annotations

import dataclasses

import torch

import functuner as ft

from . import common as C
from .train_step import _functional, _peft


def _point(shape: C.Shape, s: C.Settings) -> tuple[float, float, float]:
    model = C.build_llama(shape)
    ids, labels = C.batch(shape)
    params = ft.init(model, C.lora_config(shape), generator=0)
    f = _functional(model, params, ids, labels, use_torch_func=False)
    p = _peft(model, params, ids, labels, dora=False)
    C.assert_close(f"scaling {shape.hidden}/{shape.rank}: loss", f.step(), p.step(), rtol=1e-5, atol=1e-5)
    t = C.interleaved({"functional": f.step, "peft": p.step}, warmup=1, repeats=s.repeats)
    m = C.interleaved(
        {
            "functuner merge": lambda: ft.merge(model, params),
            "peft merge_and_unload": (lambda: C.peft_lora(model, params), lambda pm: pm.merge_and_unload()),
        },
        warmup=1,
        repeats=s.repeats,
    )
    return (C.ratio(t["functional"], t["peft"]), C.ratio(m["functuner merge"], m["peft merge_and_unload"]), t["peft"])


def run(s: C.Settings) -> C.Report:
    report = C.Report("Scaling: functuner / PEFT by hidden size and rank")
    base = s.shape
    if s.quick:
        points = [dataclasses.replace(base, hidden=16), dataclasses.replace(base, rank=8)]
    else:
        points = [dataclasses.replace(base, hidden=h, heads=max(4, h // 64), rank=16) for h in (256, 512, 1024)]
        points += [dataclasses.replace(base, hidden=512, rank=r) for r in (4, 64)]
    for shape in points:
        step, merge, peft_s = _point(shape, s)
        report.info(
            f"hidden {shape.hidden}, r={shape.rank}: step / merge",
            f"{step:.3f}x / {merge:.3f}x (PEFT step {peft_s * 1e3:.0f} ms)",
        )
        torch.manual_seed(0)
    report.check("every point: functuner and PEFT losses equal")
    report.notes.append(
        f"{base.layers} layers, batch {base.batch} x seq {base.seq}; hidden 512 r=16 is the main table's row"
    )
    return report
