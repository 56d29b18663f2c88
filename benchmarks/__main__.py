"""``python -m benchmarks [--quick] [--only NAME ...] [--threads N] [--out FILE]``: the whole suite, one process.

Prints one Markdown table per group (ratios, targets, whether met) and the
correctness checks each group passed before timing.  ``--quick`` runs a tiny
model with few repeats (CI: it keeps the suite from rotting; its numbers mean
little); the full mode uses the issue's Llama (hidden 512, 4 layers, batch 4 x
seq 128, r=16).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable

import torch

from . import common as C

GROUPS: dict[str, str] = {
    "train": "train_step:run_lora",
    "dora": "train_step:run_dora",
    "inference": "inference:run",
    "lora_modules": "lora_modules:run",
    "decoding": "decoding:run",
    "many_adapters": "many_adapters:run",
    "merge": "merge:run",
    "load": "load:run",
    "compile": "compile:run",
    "scaling": "scaling:run",
    "galore_lisa": "galore_lisa:run",
    "qlora": "qlora:run",
    "peft_native": "peft_native:run",
}


def _resolve(spec: str) -> Callable[[C.Settings], C.Report]:
    import importlib

    mod, fn = spec.split(":")
    return getattr(importlib.import_module(f"benchmarks.{mod}"), fn)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import os

    cpu = f"{_cpu_name()} ({os.cpu_count()} logical CPUs visible)"
    dev = f"{torch.cuda.get_device_name()}, host {cpu}" if torch.cuda.is_available() else cpu
    return (
        f"{dev}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); Python {platform.python_version()};"
        f" {platform.system()} {platform.release()}"
    )


def run_suite(quick: bool, only: list[str] | None = None, threads: int | None = None) -> list[C.Report]:
    """Run the selected groups (all by default) and return their reports. Raises if a correctness check fails."""
    if threads is not None:
        torch.set_num_threads(threads)
    s = C.settings(quick)
    names = only or list(GROUPS)
    unknown = sorted(set(names) - set(GROUPS))
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; choose from {sorted(GROUPS)}")
    reports = []
    for name in names:
        t0 = time.perf_counter()
        report = _resolve(GROUPS[name])(s)
        report.notes.append(f"group wall time {time.perf_counter() - t0:.0f} s")
        reports.append(report)
        print(report.markdown(), flush=True)
    return reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny model, few repeats (CI)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"groups to run: {', '.join(GROUPS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for every row")
    ap.add_argument("--out", help="also write the Markdown tables to this file")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    header = (
        f"# functuner benchmarks ({'quick' if args.quick else 'full'} mode)\n\nMachine: {machine()}\n"
        f"Command: python -m benchmarks {' '.join(argv if argv is not None else sys.argv[1:])}\n"
    )
    print(header, flush=True)
    reports = run_suite(args.quick, args.only, args.threads)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n" + "\n".join(r.markdown() for r in reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
