"""Numerical drift of repeated merge/unmerge: functuner's shim vs PEFT, on the same weights, side by side.

For fp32, bf16 and fp16: one Llama, one LoRA adapter (the same tensors in
both libraries: real ``peft`` gets functuner's tensors through
``set_peft_model_state_dict``), then N cycles of

* PEFT: ``merge_adapter()`` + ``unmerge_adapter()`` (adds the fp32 delta to the
  half-precision weight, later subtracts it: each cycle can move each element);
* functuner: ``Swift.merge(model)`` + ``Swift.unmerge(model)`` (keeps the
  original tensors and puts them back);

and prints the max ``|W - W_original|`` over all adapted weights after 1, 10,
100, ... and N cycles, plus the largest original weight for scale.

    python benchmarks/drift.py            # Llama hidden 512, 4 layers, 1,000 cycles
    python benchmarks/drift.py --quick    # tiny model, 20 cycles (run by tests/reliability)
    python benchmarks/drift.py --cycles 5000
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import functuner as ft  # noqa: E402
from benchmarks import common as C  # noqa: E402
from functuner import Swift  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _weights(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {n: sd[n].detach().clone() for n in names}


def _max_err(now: dict[str, torch.Tensor], orig: dict[str, torch.Tensor]) -> float:
    return max(float((now[k].float() - orig[k].float()).abs().max()) for k in orig)


def run_dtype(shape: C.Shape, dtype: torch.dtype, cycles: int) -> tuple[float, list[tuple[int, float, float]]]:
    """Largest original ``|W|`` and ``[(cycle, functuner max error, PEFT max error)]`` at 1, 10, 100, ..., ``cycles``."""
    base = C.build_llama(shape, dtype=dtype)
    cfg = ft.LoRAConfig(
        r=shape.rank, lora_alpha=2 * shape.rank, target_modules=list(C.LLAMA_TARGETS), init_lora_weights=False
    )
    params = ft.init(base, cfg, generator=0)
    # B scaled down to a trained adapter's typical size (deltas ~1e-2 of the weights)
    params = params.replace({k: v * 0.05 for k, v in params.items() if ".lora_B." in k})
    adapted = sorted({k.split(".lora_")[0] + ".weight" for k in params})

    ours_model = copy.deepcopy(base)
    sm = Swift.prepare_model(ours_model, cfg)
    sm.load_state_dict(ft.to_peft_state_dict(params, "default"), adapter_name="default")
    ours_orig = _weights(ours_model, adapted)

    pm = C.peft_lora(base, params)
    inner = pm.base_model.model
    theirs_orig = _weights(inner, [k.replace(".weight", ".base_layer.weight") for k in adapted])
    assert all(torch.equal(ours_orig[k], theirs_orig[k.replace(".weight", ".base_layer.weight")]) for k in adapted)

    marks = sorted({c for c in (1, 10, 100, 1000, 10000, 100000) if c <= cycles} | {cycles})
    rows = []
    for c in range(1, cycles + 1):
        Swift.merge(sm)
        Swift.unmerge(sm)
        pm.merge_adapter()
        pm.unmerge_adapter()
        if c in marks:
            rows.append(
                (
                    c,
                    _max_err(_weights(ours_model, adapted), ours_orig),
                    _max_err(_weights(inner, list(theirs_orig)), theirs_orig),
                )
            )
    return max(float(w.float().abs().max()) for w in ours_orig.values()), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 20 cycles")
    ap.add_argument("--cycles", type=int, default=None)
    args = ap.parse_args(argv)
    shape = C.QUICK if args.quick else C.FULL
    cycles = args.cycles or (20 if args.quick else 1000)
    torch.manual_seed(0)
    print(
        f"merge/unmerge drift: Llama hidden {shape.hidden}, {shape.layers} layers, LoRA r={shape.rank} on "
        f"{len(C.LLAMA_TARGETS)} linears per layer, {cycles} cycles"
    )
    print(f"{'dtype':<6}{'cycles':>8}{'functuner max err':>20}{'PEFT max err':>16}{'max |W|':>10}")
    for name, dtype in DTYPES.items():
        wmax, rows = run_dtype(shape, dtype, cycles)
        for c, ours, theirs in rows:
            print(f"{name:<6}{c:>8}{ours:>20.3e}{theirs:>16.3e}{wmax:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
