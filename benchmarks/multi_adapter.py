"""Many adapters on one model: functuner vs real PEFT, side by side in one process.

Measures (ratios, medians of interleaved runs; see ``benchmarks/common.py``):

1. Mixed-batch forward: 16 samples, each with its own adapter drawn from 8 and
   from 64 adapters, vs a forward where all samples use one adapter;
   functuner's :func:`functuner.tuners.lora.mixed.apply_mixed` (prebuilt stack) and PEFT's
   ``model(..., adapter_names=...)``.  Target: functuner within 1.1x of its
   single-adapter forward at both counts.
2. Switch latency with 1 and with 100 adapters loaded.  functuner has no active
   adapter: a switch is choosing another params value for the next call; we
   also time building that call's routes (``bind_routes``), a per-call cost
   paid whether or not the adapter changed.  PEFT: ``set_adapter``.  Target:
   under 20 us per switch, the same with 1 and 100 adapters.
3. ``add_weighted_adapter`` time per combination type: functuner's pure
   function vs PEFT's method (which also injects the new adapter's layers).

Every timed path is checked for correctness against PEFT first.

Usage::

    python -m benchmarks.multi_adapter            # full: hidden 512, 4 layers, r=16 on all 7 Llama linears
    python -m benchmarks.multi_adapter --quick    # tiny model, few repeats (run by tests/project/test_benchmarks_multi.py)
    python -m benchmarks.multi_adapter --markdown docs/multi_adapter.md
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

import functuner as ft
from benchmarks.common import FULL, LLAMA_TARGETS, QUICK, Report, assert_close, build_llama, ratio, sync
from functuner.tuners.lora.combine import COMBINATION_TYPES, adapter_deltas, add_weighted_adapter
from functuner.tuners.lora.mixed import apply_mixed, stack_adapters

PREFIX = "base_model.model."
SAMPLES = 16


def _progress(msg: str) -> None:
    print(f"[multi_adapter] {msg}", file=sys.stderr, flush=True)


def _load_adapters(
    model: torch.nn.Module, count: int, rank: int, targets: Sequence[str] = LLAMA_TARGETS
) -> tuple[Any, dict[str, ft.TunerParams]]:
    """A PEFT model over a deep copy of ``model`` with ``count`` random adapters, and the same tensors as params."""
    import copy

    import peft

    torch.manual_seed(1)
    pm = None
    ours: dict[str, ft.TunerParams] = {}
    for i in range(count):
        name = f"ad{i}"
        kw: dict[str, Any] = dict(r=rank, lora_alpha=2 * rank, target_modules=list(targets))
        pcfg = peft.LoraConfig(init_lora_weights=False, **kw)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(model), pcfg, adapter_name=name)
        else:
            pm.add_adapter(name, pcfg)
        ours[name] = ft.TunerParams({}, ft.LoRAConfig(init_lora_weights=False, **kw), name)
    assert pm is not None
    state = pm.state_dict()
    for name, p in ours.items():
        tensors = {
            k[len(PREFIX) :]: v.detach() for k, v in state.items() if f".lora_A.{name}." in k or f".lora_B.{name}." in k
        }
        ours[name] = ft.TunerParams(tensors, p.config, name)
    pm.eval()
    for prm in pm.parameters():
        prm.requires_grad_(False)
    return pm, ours


def _timed(fns: dict[str, Any], *, warmup: int, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median and minimum seconds per call of each function, run round-robin with a rotating start.

    On a shared machine the minimum is the least disturbed run; both are reported.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    return ({n: statistics.median(v) for n, v in times.items()}, {n: min(v) for n, v in times.items()})


def _mixed_forward(
    report: Report,
    model: torch.nn.Module,
    pm: Any,
    ours: dict[str, ft.TunerParams],
    shape: Any,
    counts: Sequence[int],
    warmup: int,
    repeats: int,
) -> dict[str, float]:
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, shape.vocab, (SAMPLES, shape.seq), generator=g)
    names_all = list(ours)
    first = names_all[0]
    pm.set_adapter(first)
    results: dict[str, float] = {}
    with torch.no_grad():
        ft_single = ft.apply(model, ours[first], (x,)).logits
        assert_close("single adapter: functuner vs PEFT", ft_single, pm(input_ids=x).logits)
        report.check("single-adapter logits equal PEFT's")
        fns: dict[str, Any] = {
            "functuner single": lambda: ft.apply(model, ours[first], (x,)),
            "PEFT single": lambda: pm(input_ids=x),
        }
        for k in counts:
            chosen = names_all[:k]
            per_sample = [chosen[(b * 7) % k] for b in range(SAMPLES)]  # every adapter used when k <= 16
            t0 = time.perf_counter()
            stack = stack_adapters(model, {n: ours[n] for n in chosen})
            results[f"stack build {k}"] = time.perf_counter() - t0
            got = apply_mixed(model, stack, per_sample, (x,)).logits
            want = pm(input_ids=x, adapter_names=per_sample).logits
            assert_close(f"mixed batch of {k} adapters: functuner vs PEFT", got, want)
            report.check(f"mixed batch with {k} adapters equals PEFT's adapter_names output")
            fns[f"functuner mixed {k}"] = lambda s=stack, n=per_sample: apply_mixed(model, s, n, (x,))
            fns[f"PEFT mixed {k}"] = lambda n=per_sample: pm(input_ids=x, adapter_names=n)
        times, fastest = _timed(fns, warmup=warmup, repeats=repeats)
    results.update(times)
    results.update({f"min {k}": v for k, v in fastest.items()})
    for k in counts:
        report.add(
            f"functuner mixed ({k} adapters) / functuner single",
            ratio(times[f"functuner mixed {k}"], times["functuner single"]),
            1.1,
        )
        report.add(
            f"functuner mixed ({k} adapters) / functuner single, fastest runs",
            ratio(fastest[f"functuner mixed {k}"], fastest["functuner single"]),
            1.1,
        )
        report.add(f"PEFT mixed ({k} adapters) / PEFT single", ratio(times[f"PEFT mixed {k}"], times["PEFT single"]))
        report.add(
            f"PEFT mixed ({k} adapters) / PEFT single, fastest runs",
            ratio(fastest[f"PEFT mixed {k}"], fastest["PEFT single"]),
        )
        report.add(
            f"functuner mixed ({k}) / PEFT mixed ({k})", ratio(times[f"functuner mixed {k}"], times[f"PEFT mixed {k}"])
        )
        report.info(
            f"stack_adapters ({k} adapters), once per adapter set", f"{results[f'stack build {k}'] * 1e3:.1f} ms"
        )
    report.add("functuner single / PEFT single", ratio(times["functuner single"], times["PEFT single"]))
    report.notes.append("Ratios are of median times unless marked 'fastest runs' (ratio of minima).")
    report.info(
        "functuner single-adapter forward (absolute, this machine)", f"{times['functuner single'] * 1e3:.1f} ms"
    )
    return results


def _per_op(fn: Any, n: int) -> float:
    """Median over 5 rounds of the mean seconds per call over ``n`` calls."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        rounds.append((time.perf_counter() - t0) / n)
    return statistics.median(rounds)


def _switch(
    report: Report,
    model: torch.nn.Module,
    peft_models: dict[int, Any],
    ours: dict[str, ft.TunerParams],
    loaded: Sequence[int],
    n: int,
) -> dict[str, float]:
    out: dict[str, float] = {}
    names = list(ours)
    for k in loaded:
        pool = names[:k]
        two = [pool[0], pool[-1]]
        chosen = {nm: ours[nm] for nm in pool}
        # functuner: a switch is picking the params for the next call; the call then builds its routes
        out[f"functuner choose {k}"] = _per_op(lambda i, c=chosen, t=two: c[t[i & 1]], n)
        out[f"functuner bind_routes {k}"] = _per_op(
            lambda i, c=chosen, t=two: ft.functional.bind_routes(model, c[t[i & 1]]), n
        )
        # PEFT: a model with exactly k adapters loaded
        pm = peft_models[k]
        assert len(pm.peft_config) == k
        out[f"PEFT set_adapter {k}"] = _per_op(lambda i, t=two, m=pm: m.set_adapter(t[i & 1]), max(1, n // 250))
    for k in loaded:
        report.add(f"functuner switch (choose params), {k} loaded", out[f"functuner choose {k}"] * 1e6, 20, " us")
    for k in loaded:
        report.add(
            f"functuner per-call route build (bind_routes), {k} loaded",
            out[f"functuner bind_routes {k}"] * 1e6,
            20,
            " us",
        )
    for k in loaded:
        report.add(f"PEFT set_adapter, {k} loaded", out[f"PEFT set_adapter {k}"] * 1e6, None, " us")
    lo, hi = loaded[0], loaded[-1]
    report.add(
        f"functuner bind_routes {hi} loaded / {lo} loaded",
        ratio(out[f"functuner bind_routes {hi}"], out[f"functuner bind_routes {lo}"]),
    )
    report.add(
        f"PEFT set_adapter {hi} loaded / {lo} loaded",
        ratio(out[f"PEFT set_adapter {hi}"], out[f"PEFT set_adapter {lo}"]),
    )
    return out


def _combine(report: Report, pm: Any, ours: dict[str, ft.TunerParams], repeats: int) -> dict[str, float]:
    out: dict[str, float] = {}
    pair = list(ours)[:2]
    weights = [0.7, 1.3]
    for ctype in COMBINATION_TYPES:
        _progress(f"add_weighted_adapter {ctype}")
        kw: dict[str, Any] = {} if ctype in ("svd", "linear", "cat") else {"density": 0.5}
        ft_times, peft_times = [], []
        for r in range(repeats):
            gen = {"generator": r} if ctype.startswith("dare") else {}
            t0 = time.perf_counter()
            new = add_weighted_adapter({n: ours[n] for n in pair}, weights, "mix", ctype, **kw, **gen)
            ft_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pm.base_model.add_weighted_adapter(pair, weights, "mix", combination_type=ctype, **kw)
            peft_times.append(time.perf_counter() - t0)
            if r == 0 and not ctype.startswith("dare"):
                mine = adapter_deltas(new)
                name, delta = next(iter(mine.items()))
                module = pm.base_model.model.get_submodule(name)
                assert_close(
                    f"add_weighted_adapter {ctype}: delta vs PEFT",
                    delta,
                    module.get_delta_weight("mix"),
                    rtol=1e-4,
                    atol=1e-5,
                )
            pm.delete_adapter("mix")
        out[f"functuner {ctype}"] = statistics.median(ft_times)
        out[f"PEFT {ctype}"] = statistics.median(peft_times)
        report.add(f"{ctype}: functuner / PEFT", ratio(out[f"functuner {ctype}"], out[f"PEFT {ctype}"]))
        report.info(f"{ctype}: functuner time", f"{out[f'functuner {ctype}'] * 1e3:.1f} ms")
    report.check("every deterministic type's delta weight equals PEFT's (first module)")
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print markdown tables; return ``{group: {measurement: seconds}}``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and few repeats (for CI)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", help="also write the tables to this file")
    args = ap.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(args.threads)
    shape = dataclasses.replace(QUICK if args.quick else FULL, seq=8 if args.quick else 64)
    # quick mode only keeps the script from rotting: smaller counts, two targets, one repeat
    counts = (4, 8) if args.quick else (8, 64)
    loaded = (1, 8) if args.quick else (1, 100)
    targets = ("q_proj", "v_proj") if args.quick else LLAMA_TARGETS
    warmup, repeats = (1, 1) if args.quick else (2, 9)
    combine_targets = targets if args.quick else ("q_proj", "k_proj", "v_proj", "o_proj")
    model = build_llama(shape)
    _progress(f"loading {max(max(counts), max(loaded))} adapters into PEFT")
    pm, ours = _load_adapters(model, max(max(counts), max(loaded)), shape.rank, targets)

    fwd = Report(f"Mixed-batch forward, {SAMPLES} samples x {shape.seq} tokens (ratios of median times)")
    sw = Report("Adapter switch latency (microseconds per switch)")
    comb = Report(
        f"add_weighted_adapter, 2 adapters r={shape.rank} on {', '.join(combine_targets)} (ratios functuner / PEFT)"
    )
    _progress("mixed-batch forward")
    forward = _mixed_forward(fwd, model, pm, ours, shape, counts, warmup, repeats)
    _progress("switch latency")
    results = {
        "forward": forward,
        "switch": _switch(
            sw,
            model,
            {loaded[0]: _load_adapters(model, loaded[0], shape.rank, targets)[0], loaded[-1]: pm},
            ours,
            loaded,
            100 if args.quick else 5000,
        ),
        "combine": _combine(comb, *_load_adapters(model, 2, shape.rank, combine_targets), 1),
    }
    sw.notes.append(
        "functuner keeps no active adapter: switching is choosing which params value the next call"
        " gets. Every call (switching or not) builds its routes; that cost is listed separately."
    )
    setup = (
        f"Model: transformers LlamaForCausalLM from a config, hidden {shape.hidden}, {shape.layers} layers,"
        f" vocab {shape.vocab}; LoRA r={shape.rank} on {', '.join(targets)}; fp32; "
        f"{torch.get_num_threads()} CPU threads; {'quick' if args.quick else 'full'} mode; torch"
        f" {torch.__version__}."
    )
    text = "\n".join([setup, "", fwd.markdown(), sw.markdown(), comb.markdown()])
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    return results


if __name__ == "__main__":
    main()
