"""Inference forward (issue item 2): one adapter unmerged vs PEFT, merged vs the plain model.

Rows, all under ``torch.inference_mode`` on the same batch:

* ``plain``: the base model itself (a copy that never had functuner slots).
* ``merged``: a copy with ``functuner.merge`` weights loaded (the serving form).
* ``unmerged``: ``functuner.apply(model, params, ...)``.
* ``peft``: PEFT's unmerged LoRA model with the same tensors.
* ``dormant slots``: the base model after ``apply`` installed its slots, called
  without params (what a slotted model costs when no adapter is in use).
"""

from __future__ import annotations

import copy

import torch

import functuner as ft

from . import common as C


def run(s: C.Settings) -> C.Report:
    shape = s.shape
    report = C.Report("Inference forward (item 2)")
    base = C.build_llama(shape)
    plain = copy.deepcopy(base)
    ids, _ = C.batch(shape)
    params = ft.init(base, C.lora_config(shape), generator=0)
    merged = copy.deepcopy(plain)
    weights = ft.merge(base, params)
    merged.load_state_dict({k: weights[k] for k in merged.state_dict()})
    pm = C.peft_lora(base, params)

    def f_plain() -> torch.Tensor:
        return plain(ids).logits

    def f_merged() -> torch.Tensor:
        return merged(ids).logits

    def f_unmerged() -> torch.Tensor:
        return ft.apply(base, params, (ids,)).logits

    def f_peft() -> torch.Tensor:
        return pm(input_ids=ids).logits

    def f_dormant() -> torch.Tensor:
        return base(ids).logits

    fns = {"plain": f_plain, "merged": f_merged, "unmerged": f_unmerged, "peft": f_peft, "dormant slots": f_dormant}
    with torch.inference_mode():
        want = f_peft()
        report.check(f"unmerged == peft (max |diff| {C.assert_close('unmerged vs peft', f_unmerged(), want):.1e})")
        report.check(
            f"merged == peft (max |diff| {C.assert_close('merged vs peft', f_merged(), want, rtol=1e-4, atol=1e-4):.1e})"
        )
        report.check(
            f"dormant slots == plain (max |diff| {C.assert_close('dormant vs plain', f_dormant(), f_plain(), rtol=0, atol=0):.1e})"
        )
        times = C.interleaved(fns, warmup=s.warmup, repeats=s.repeats * 2)
    report.add("merged / plain", C.ratio(times["merged"], times["plain"]), 1.02)
    report.add("unmerged / peft", C.ratio(times["unmerged"], times["peft"]), 1.0)
    report.add("unmerged / plain", C.ratio(times["unmerged"], times["plain"]))
    report.add("peft / plain", C.ratio(times["peft"], times["plain"]))
    report.add("dormant slots / plain", C.ratio(times["dormant slots"], times["plain"]))
    report.info("plain forward (median)", f"{times['plain'] * 1e3:.1f} ms")
    report.notes.append(f"batch {shape.batch} x seq {shape.seq}, r={shape.rank}; {s.repeats * 2} interleaved repeats")
    return report
