"""Many adapters on one model (performance round 2): 1,000 LoRA adapters of r=8, functuner vs real PEFT.

Every adapter is written to disk first (functuner's SWIFT layout and PEFT's own layout; untimed), then:

* **load**: each adapter read from its folder into one model: functuner's functional ``functuner.load`` (to
  ``TunerParams``), the shim's ``SwiftModel.load_adapter``, and PEFT's ``PeftModel.load_adapter``; seconds per
  adapter (mean over all of them).  The shim and PEFT each get ``BUDGET_S`` seconds; when it runs out the row
  says how many adapters were loaded, and the shim's row gives the time of its first and last loads (a load
  that grows with the number already loaded shows there).
* **memory**: the process's resident set growth while loading, per adapter, minus the adapter's raw tensor
  bytes: the bookkeeping each library keeps per adapter (a rough figure: RSS also moves with the allocator).
* **switch**: making another adapter the active one with all of them loaded: the shim's
  ``set_active_adapters``, PEFT's ``set_adapter``; and the functional API's per-call route build
  (``bind_routes``), with 1 and with all adapters loaded (targets: < 20 us, the same at both counts).
* **mixed batch**: 16 samples, each with an adapter drawn from all of them: the shim's
  ``model(..., adapter_names=...)`` and PEFT's, as a ratio of a forward with one adapter for every sample.

Checks before timing: the shim's, the functional API's and PEFT's outputs agree for a single adapter and for
the mixed batch.
"""

from __future__ import annotations

import copy
import gc
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import functuner as ft

from . import common as C

TARGETS = ["q_proj", "v_proj"]
RANK = 8
SAMPLES = 16
BUDGET_S = 150.0  # full mode: seconds each of the shim and PEFT may spend loading before its row is cut short


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _time_each(fn: Callable[[int], Any], count: int) -> float:
    """Seconds per call of ``fn(i)`` for ``i`` in ``range(count)``, timed one by one (median)."""
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(s: C.Settings) -> C.Report:
    shape = s.shape
    count = 24 if s.quick else 1000
    budget = 30.0 if s.quick else BUDGET_S
    report = C.Report(f"Many adapters ({count} LoRA adapters, r={RANK})")
    base = C.build_llama(shape)
    cfg = ft.LoRAConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
    names = [f"ad{i}" for i in range(count)]
    gen = torch.Generator().manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    raw_bytes = 0
    first: ft.TunerParams | None = None
    for name in names:
        p = ft.init(base, cfg, generator=gen, adapter_name=name)
        p = ft.TunerParams({k: v * 0.3 for k, v in p.items()}, p.config, name)  # visible effect on the outputs
        ft.save(p, root / "swift" / name)
        ft.save(p, root / "peft" / name, format="peft")
        raw_bytes = sum(t.numel() * t.element_size() for t in p.values())
        first = first or p
    assert first is not None

    # -- load: functional --------------------------------------------------------
    loaded: dict[str, ft.TunerParams] = {}
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    for name in names:
        loaded[name] = ft.load(root / "swift" / name, base, adapter_name=name)
    t_func = (time.perf_counter() - t0) / count
    gc.collect()
    mem_func = (_rss() - rss0) / count - raw_bytes

    # -- load: shim ----------------------------------------------------------------
    sm = ft.Swift.prepare_model(copy.deepcopy(base), {names[0]: cfg})
    named = dict(sm.base_model.named_parameters())
    with torch.no_grad():
        for k, v in loaded[names[0]].items():
            named[k].copy_(v)
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    shim_times: list[float] = []
    for name in names[1:]:
        t1 = time.perf_counter()
        sm.load_adapter(str(root / "swift" / name), adapter_name=name)
        shim_times.append(time.perf_counter() - t1)
        if time.perf_counter() - t0 > budget:
            break
    shim_loaded = 1 + len(shim_times)
    shim_total = time.perf_counter() - t0
    t_shim = shim_total / max(shim_loaded - 1, 1)
    gc.collect()
    mem_shim = (_rss() - rss0) / max(shim_loaded - 1, 1) - raw_bytes
    sm.eval()

    # -- load: PEFT (time-boxed) ---------------------------------------------------------
    import peft

    pm = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), str(root / "peft" / names[0] / names[0]), adapter_name=names[0]
    )
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    peft_loaded = 1
    for name in names[1:]:
        pm.load_adapter(str(root / "peft" / name / name), adapter_name=name)
        peft_loaded += 1
        if time.perf_counter() - t0 > budget:
            break
    t_peft = (time.perf_counter() - t0) / max(peft_loaded - 1, 1)
    gc.collect()
    mem_peft = (_rss() - rss0) / max(peft_loaded - 1, 1) - raw_bytes
    pm.eval()
    peft_names = names[: min(peft_loaded, shim_loaded)]  # adapters both hold

    # -- correctness -----------------------------------------------------------------------
    ids, _ = C.batch(C.Shape(**{**shape.__dict__, "batch": SAMPLES}))
    rng = random.Random(0)
    mixed = [rng.choice(peft_names) for _ in range(SAMPLES)]
    last = peft_names[-1]
    with torch.inference_mode():
        sm.set_active_adapters([last])
        pm.set_adapter(last)
        want = pm(input_ids=ids).logits
        report.check(
            f"shim == peft, one adapter (max |diff| {C.assert_close('shim', sm(input_ids=ids).logits, want):.1e})"
        )
        got = ft.apply(base, loaded[last], (ids,)).logits
        report.check(f"functional == peft, one adapter (max |diff| {C.assert_close('functional', got, want):.1e})")
        want_mixed = pm(input_ids=ids, adapter_names=mixed).logits
        got_mixed = sm(input_ids=ids, adapter_names=mixed).logits
        report.check(f"shim mixed batch == peft (max |diff| {C.assert_close('mixed', got_mixed, want_mixed):.1e})")

        # -- switch -------------------------------------------------------------------------
        order = [rng.choice(peft_names) for _ in range(50 if not s.quick else 8)]
        t_switch_shim = _time_each(lambda i: sm.set_active_adapters([order[i]]), len(order))
        t_switch_peft = _time_each(lambda i: pm.set_adapter(order[i]), len(order))
        one_model = copy.deepcopy(base)
        only = ft.load(root / "swift" / names[0], one_model, adapter_name=names[0])
        ft.functional.bind_routes(one_model, only)
        for name in order:  # first calls build each adapter's cached layout
            ft.functional.bind_routes(base, loaded[name])
        t_route_1 = _time_each(lambda i: ft.functional.bind_routes(one_model, only), len(order))
        t_route_n = _time_each(lambda i: ft.functional.bind_routes(base, loaded[order[i]]), len(order))

        # -- mixed batch --------------------------------------------------------------------------
        sm.set_active_adapters([last])
        times = C.interleaved(
            {
                "shim one": lambda: sm(input_ids=ids),
                "shim mixed": lambda: sm(input_ids=ids, adapter_names=mixed),
                "peft one": lambda: pm(input_ids=ids),
                "peft mixed": lambda: pm(input_ids=ids, adapter_names=mixed),
            },
            warmup=s.warmup,
            repeats=s.repeats,
        )

    report.info("functional load per adapter", f"{t_func * 1e3:.2f} ms")
    report.info("shim load_adapter per adapter", f"{t_shim * 1e3:.2f} ms ({shim_loaded} of {count} loaded)")
    k = max(1, min(10, len(shim_times) // 2))
    report.info(
        "shim load_adapter: first / last adapters",
        f"{statistics.median(shim_times[:k]) * 1e3:.1f} ms / {statistics.median(shim_times[-k:]) * 1e3:.1f} ms",
    )
    report.info("peft load_adapter per adapter", f"{t_peft * 1e3:.2f} ms ({peft_loaded} of {count} loaded)")
    report.add("shim / peft (load per adapter)", C.ratio(t_shim, t_peft), 1.0)
    report.info("raw tensor bytes per adapter", f"{raw_bytes / 1024:.1f} KiB")
    report.info("functional: RSS per adapter over its tensors", f"{mem_func / 1024:.1f} KiB")
    report.info("shim: RSS per adapter over its tensors", f"{mem_shim / 1024:.1f} KiB")
    report.info("peft: RSS per adapter over its tensors", f"{mem_peft / 1024:.1f} KiB")
    report.add(f"shim set_active_adapters, {shim_loaded} loaded", t_switch_shim * 1e6, 20.0, unit=" us")
    report.info(f"peft set_adapter, {peft_loaded} loaded", f"{t_switch_peft * 1e6:.0f} us")
    report.add("functional route build, 1 adapter loaded", t_route_1 * 1e6, 20.0, unit=" us")
    report.add(f"functional route build, {count} loaded", t_route_n * 1e6, 20.0, unit=" us")
    report.add(
        f"shim mixed batch ({SAMPLES} samples) / one adapter", C.ratio(times["shim mixed"], times["shim one"]), 1.1
    )
    report.add(f"peft mixed batch ({SAMPLES} samples) / one adapter", C.ratio(times["peft mixed"], times["peft one"]))
    report.add("shim / peft (mixed batch)", C.ratio(times["shim mixed"], times["peft mixed"]), 1.0)
    report.notes.append(
        f"LoRA r={RANK} on {'/'.join(TARGETS)} of every layer; switch and route times are medians of single calls;"
        f" mixed batch: {s.repeats} interleaved repeats, medians"
    )
    tmp.cleanup()
    return report
