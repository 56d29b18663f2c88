"""``torch.compile`` of the functional LoRA training step (issue item 6).

The step ``functuner.value_and_grad(loss)(params, batch)`` is compiled with
``fullgraph=True`` (under Dynamo it is ``torch.func.grad_and_value``, traced
into one graph with the slot hooks).  Measured:

* correctness: compiled loss and grads equal eager ones, for two adapters, one
  with an equal but distinct config, and one with the same tensors but another
  ``lora_alpha`` (a graph reused for it would be silently wrong);
* recompilations when switching between two adapters of the same shape
  (``torch._dynamo.utils.counters``): with one shared config object, and with
  equal but distinct config objects;
* speed: compiled step vs the eager step (interleaved medians), and the
  one-off compile time.
"""

from __future__ import annotations

import dataclasses
import time

import torch

import functuner as ft

from . import common as C


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def run(s: C.Settings) -> C.Report:
    import torch._dynamo

    shape = s.shape
    report = C.Report("torch.compile of the functional step (item 6)")
    model = C.build_llama(shape)
    ids, labels = C.batch(shape)
    cfg = C.lora_config(shape)
    p1 = ft.init(model, cfg, generator=0)
    p2 = ft.init(model, cfg, generator=1)
    p3 = ft.init(model, dataclasses.replace(cfg), generator=2)  # equal config, distinct object
    # same tensors and shapes as p1, another scaling: a graph reused for it would be silently wrong
    p4 = ft.TunerParams(dict(p1), dataclasses.replace(cfg, lora_alpha=cfg.lora_alpha * 3), "default")

    def loss_fn(p: ft.TunerParams, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ft.apply(model, p, (ids,), {"labels": labels}).loss

    eager = ft.value_and_grad(loss_fn)
    want = {
        n: eager(p, ids, labels) for n, p in (("p1", p1), ("p2", p2), ("p3", p3), ("p4", p4))
    }  # also builds layouts/slots

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(eager, fullgraph=True)
    t0 = time.perf_counter()
    got1 = compiled(p1, ids, labels)
    compile_s = time.perf_counter() - t0
    after_first = _graphs()
    got2 = compiled(p2, ids, labels)
    compiled(p1, ids, labels)
    switch_recompiles = _graphs() - after_first
    got3 = compiled(p3, ids, labels)
    distinct_recompiles = _graphs() - after_first - switch_recompiles
    got4 = compiled(p4, ids, labels)
    if torch.equal(want["p4"][0], want["p1"][0]):
        raise AssertionError("compile check is vacuous: lora_alpha did not change the eager loss")
    for name, got in (("p1", got1), ("p2", got2), ("p3", got3), ("p4 (other lora_alpha)", got4)):
        v, g = got
        wv, wg = want[name.split()[0]]
        C.assert_close(f"compiled loss {name}", v, wv, rtol=1e-4, atol=1e-5)
        worst = max(C.assert_close(f"compiled grad {k} {name}", g[k], wg[k], rtol=1e-3, atol=1e-5) for k in wg)
        report.check(f"compiled loss and {len(wg)} grads == eager for adapter {name} (max |diff| {worst:.1e})")
    if switch_recompiles != 0:
        raise AssertionError(f"switching adapters of one config recompiled {switch_recompiles} time(s)")
    report.check("fullgraph=True compiled; switching p1 -> p2 -> p1 recompiled 0 times")

    times = C.interleaved(
        {"eager": lambda: eager(p1, ids, labels), "compiled": lambda: compiled(p1, ids, labels)},
        warmup=s.warmup,
        repeats=s.repeats * 2,
    )
    report.add("compiled / eager step time", C.ratio(times["compiled"], times["eager"]), 1.0)
    report.info("speedup (eager / compiled)", f"{C.ratio(times['eager'], times['compiled']):.2f}x")
    report.info("recompiles switching adapters (one config object)", str(switch_recompiles))
    report.info("recompiles for an equal but distinct config object", str(distinct_recompiles))
    report.info("first compile (one-off)", f"{compile_s:.1f} s")
    report.notes.append(
        "step = loss + grads (value_and_grad), optimiser excluded in both rows; params must have been applied"
        " once eagerly before compiling (functuner finds their layout by identity while Dynamo traces)"
    )
    return report
