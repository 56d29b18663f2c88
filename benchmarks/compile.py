"""``torch.compile`` of the functional LoRA training step (issue item 6).

The step ``functuner.value_and_grad(loss)(params, batch)`` is compiled with
``fullgraph=True`` (under Dynamo it is ``torch.func.grad_and_value``, traced
into one graph with the slot hooks).  Measured:

* correctness: compiled loss and grads equal eager ones, for two adapters, one
  with an equal but distinct config, and one with the same tensors but another
  ``lora_alpha`` (a graph reused for it would be silently wrong);
* recompilations (``torch._dynamo.utils.counters``) over ``SWITCHES`` switches
  between three adapters of one shape and one config object, for an equal but
  distinct config object, and for a config change (another ``lora_alpha``);
* speed: compiled step vs the eager step (interleaved medians), and the
  one-off compile time.
"""

from __future__ import annotations

import dataclasses
import time

import torch

import functuner as ft

from . import common as C

SWITCHES = 10


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
    p5 = ft.init(model, cfg, generator=3)  # a third adapter of the same config object, for the switches
    # same tensors and shapes as p1, another scaling: a graph reused for it would be silently wrong
    p4 = ft.TunerParams(dict(p1), dataclasses.replace(cfg, lora_alpha=cfg.lora_alpha * 3), "default")

    def loss_fn(p: ft.TunerParams, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ft.apply(model, p, (ids,), {"labels": labels}).loss

    eager = ft.value_and_grad(loss_fn)
    want = {
        n: eager(p, ids, labels) for n, p in (("p1", p1), ("p2", p2), ("p3", p3), ("p4", p4))
    }  # also builds layouts/slots
    eager(p5, ids, labels)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(eager, fullgraph=True)
    t0 = time.perf_counter()
    got1 = compiled(p1, ids, labels)
    compile_s = time.perf_counter() - t0
    after_first = _graphs()
    got2 = compiled(p2, ids, labels)
    for i in range(SWITCHES - 1):  # p2 -> p5 -> p1 -> p2 ...: SWITCHES switches in all
        compiled((p5, p1, p2)[i % 3], ids, labels)
    switch_recompiles = _graphs() - after_first
    got3 = compiled(p3, ids, labels)
    distinct_recompiles = _graphs() - after_first - switch_recompiles
    got4 = compiled(p4, ids, labels)
    config_recompiles = _graphs() - after_first - switch_recompiles - distinct_recompiles
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
    report.check(f"fullgraph=True compiled; {SWITCHES} switches between 3 adapters recompiled 0 times")

    times = C.interleaved(
        {"eager": lambda: eager(p1, ids, labels), "compiled": lambda: compiled(p1, ids, labels)},
        warmup=s.warmup,
        repeats=s.repeats * 2,
    )
    report.add("compiled / eager step time", C.ratio(times["compiled"], times["eager"]), 1.0)
    report.info("speedup (eager / compiled)", f"{C.ratio(times['eager'], times['compiled']):.2f}x")
    report.info("recompiles switching adapters (one config object)", str(switch_recompiles))
    report.info("recompiles for an equal but distinct config object", str(distinct_recompiles))
    report.info("recompiles for a config change (lora_alpha x3)", str(config_recompiles))
    report.info("first compile (one-off)", f"{compile_s:.1f} s")
    report.notes.append(
        "step = loss + grads (value_and_grad), optimiser excluded in both rows; params must have been applied"
        " once eagerly before compiling (functuner finds their layout by identity while Dynamo traces);"
        f" switches: {SWITCHES} calls cycling through 3 adapters of one config object after the first compile"
    )
    return report
