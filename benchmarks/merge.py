"""Merge / unmerge (issue item 3): ``functuner.merge``/``unmerge`` vs PEFT's in-place merges.

* ``functuner.merge(model, params)`` (returns new weights, model untouched) vs
  ``peft_model.merge_and_unload()`` on a fresh PEFT model each time (its
  construction is untimed setup).
* merge + unmerge: ``functuner.unmerge(model, params, functuner.merge(...))`` vs
  PEFT's ``merge_adapter()`` + ``unmerge_adapter()``.
* Allocation: peak bytes allocated during ``functuner.merge`` divided by the
  bytes of the merged weights it returns (1.0 means it allocates nothing else).
"""

from __future__ import annotations

import copy

import torch

import functuner as ft

from . import common as C


def run(s: C.Settings) -> C.Report:
    shape = s.shape
    report = C.Report("Merge / unmerge (item 3)")
    model = C.build_llama(shape)
    params = ft.init(model, C.lora_config(shape), generator=0)

    merged = ft.merge(model, params)
    peft_merged = C.peft_lora(model, params).merge_and_unload().state_dict()
    worst = 0.0
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    new_keys = [k for k, v in merged.items() if own.get(k) is not v]
    for k in new_keys:
        worst = max(worst, C.assert_close(f"merged {k}", merged[k], peft_merged[k], rtol=1e-5, atol=1e-6))
    report.check(
        f"functuner.merge == PEFT merge_and_unload on all {len(new_keys)} merged weights (max |diff| {worst:.1e})"
    )
    back = ft.unmerge(model, params, merged)
    worst = max(C.assert_close(f"unmerge {k}", back[k], own[k], rtol=1e-5, atol=1e-5) for k in new_keys)
    report.check(f"unmerge restores the base weights (max |diff| {worst:.1e})")

    def ft_merge() -> None:
        ft.merge(model, params)

    def ft_cycle() -> None:
        ft.unmerge(model, params, ft.merge(model, params))

    def shim_model() -> ft.SwiftModel:
        sm = ft.Swift.prepare_model(copy.deepcopy(model), params.config)
        named = dict(sm.base_model.named_parameters())
        with torch.no_grad():
            for k, v in params.items():
                named[k].copy_(v)
        return sm

    check = shim_model()
    ft.Swift.merge(check)
    merged_shim = dict(check.base_model.named_parameters())
    worst = max(C.assert_close(f"Swift.merge {k}", merged_shim[k], merged[k], rtol=1e-5, atol=1e-6) for k in new_keys)
    report.check(f"Swift.merge == functuner.merge (max |diff| {worst:.1e})")

    fns = {
        "functuner merge": ft_merge,
        "shim Swift.merge": (shim_model, ft.Swift.merge),
        "peft merge_and_unload": (lambda: C.peft_lora(model, params), lambda pm: pm.merge_and_unload()),
        "functuner merge+unmerge": ft_cycle,
        "peft merge+unmerge": (
            lambda: C.peft_lora(model, params),
            lambda pm: (pm.merge_adapter(), pm.unmerge_adapter()),
        ),
    }
    times = C.interleaved(fns, warmup=s.warmup, repeats=s.repeats * 3)
    report.add(
        "functuner merge / peft merge_and_unload",
        C.ratio(times["functuner merge"], times["peft merge_and_unload"]),
        0.5,
    )
    report.add(
        "shim Swift.merge / peft merge_and_unload",
        C.ratio(times["shim Swift.merge"], times["peft merge_and_unload"]),
        0.5,
    )
    report.add(  # what the shim adds to the functional merge: bookkeeping, undo record, fresh pages it keeps
        "shim Swift.merge / functuner merge (no target)",
        C.ratio(times["shim Swift.merge"], times["functuner merge"]),
    )
    report.add(
        "functuner merge+unmerge / peft merge_adapter+unmerge_adapter (in place; no target)",
        C.ratio(times["functuner merge+unmerge"], times["peft merge+unmerge"]),
    )
    merged_bytes = sum(merged[k].numel() * merged[k].element_size() for k in new_keys)
    peak = C.peak_bytes(ft_merge)
    report.add("functuner merge peak allocation / merged weights' bytes", C.ratio(peak, merged_bytes), 1.0)
    report.info("merged weights", f"{len(new_keys)} tensors, {C.mib(merged_bytes)}; merge peak {C.mib(peak)}")
    report.info("functuner merge (median)", f"{times['functuner merge'] * 1e3:.2f} ms")
    return report
