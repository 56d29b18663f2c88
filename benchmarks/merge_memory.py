"""Peak memory of ``functuner merge`` (shard by shard) vs the in-memory PEFT path, on a multi-shard checkpoint.

The base checkpoint is generated here (a Llama-shaped model, random weights,
written tensor by tensor into safetensors shards with transformers' index
layout, so ``from_pretrained`` loads it); the adapter is a PEFT LoRA
(``LoraConfig.save_pretrained`` + PEFT's on-disk key names).  Each path runs
in its own subprocess; its peak resident set size comes from ``wait4``
(``ru_maxrss``), so nothing from this driver process is counted.

* functuner: ``functuner merge --base B --adapter A --out O --quiet``
* in memory: ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained``
  + ``merge_and_unload`` + ``save_pretrained`` (same shard size)

Target (issue 7): functuner's peak <= largest shard + adapter + 300 MB.  The
two outputs are compared tensor by tensor (max abs difference printed).

Usage::

    python benchmarks/merge_memory.py            # ~1.08 GB fp32 base in 4 shards (needs ~5 GB disk)
    python benchmarks/merge_memory.py --quick    # tiny base: checks the script runs (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20

IN_MEMORY = r"""
import sys, torch, transformers, peft
base, adapter, out, shard = sys.argv[1:5]
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size=shard)
"""

IMPORTS_ONLY = "import torch, safetensors.torch"

# A fresh small interpreter starts each measured command and reports its peak RSS.  Measuring from this driver
# directly would be wrong: a forked child is charged the parent's resident pages until it execs, and this
# driver holds torch, transformers and peft (about 400 MiB).
LAUNCHER = r"""
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
"""


def _config(quick: bool):
    import transformers

    if quick:
        return transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    return transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def make_base(folder: Path, quick: bool, shard_bytes: int) -> int:
    """Write a Llama checkpoint shard by shard (never the whole model in memory); return its size in bytes."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = _config(quick)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    gen = torch.Generator().manual_seed(0)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in shapes:
        n = 4 * int(torch.tensor(shape).prod()) if shape else 4
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, shape))
        size += n
    folder.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key, shape in group:
            t = torch.ones(shape) if key.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
            tensors[key] = t
            weight_map[key] = name
            total += t.numel() * 4
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    cfg.save_pretrained(str(folder))
    return total


def make_adapter(folder: Path, quick: bool, r: int) -> int:
    """A PEFT LoRA on every attention and MLP projection; returns the weights file size."""
    import peft
    import torch
    from safetensors.torch import save_file

    cfg = _config(quick)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    h, inter = cfg.hidden_size, cfg.intermediate_size
    dims = {
        "q_proj": (h, h),
        "k_proj": (h, h),
        "v_proj": (h, h),
        "o_proj": (h, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for name in targets:
            fan_in, fan_out = dims[name]
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.02
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets).save_pretrained(str(folder))
    return (folder / "adapter_model.safetensors").stat().st_size


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """Run ``cmd`` (through :data:`LAUNCHER`); return (its peak RSS in bytes, wall seconds). Exits if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    try:
        code, rss = map(int, res.stdout.split())
    except ValueError:
        code, rss = -1, 0
    if res.returncode != 0 or code != 0:
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return rss, wall


def compare(a: Path, b: Path) -> float:
    """Max abs difference between two checkpoints, read one tensor at a time."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        raise SystemExit(f"outputs hold different keys: {sorted(set(ia) ^ set(ib))[:5]}")
    worst = 0.0
    for key in sorted(ia):
        with safe_open(str(ia[key]), "pt") as ha, safe_open(str(ib[key]), "pt") as hb:
            worst = max(worst, float((ha.get_tensor(key).float() - hb.get_tensor(key).float()).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny checkpoint: check that the benchmark runs")
    ap.add_argument("--workdir", default=None, help="where to build checkpoints (default: a temporary folder)")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    shard_bytes = 100_000 if args.quick else 300 * 10**6
    shard_arg = "100KB" if args.quick else "300MB"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, adapter = work / "base", work / "adapter"
        total = make_base(base, args.quick, shard_bytes)
        adapter_bytes = make_adapter(adapter, args.quick, args.rank)
        shards = sorted(base.glob("model-*.safetensors"))
        largest = max(p.stat().st_size for p in shards)
        functuner = shutil.which("functuner")
        if functuner is None:
            raise SystemExit("the functuner console script is not installed (pip install -e .)")
        imports_rss, _ = peak_rss([sys.executable, "-c", IMPORTS_ONLY])
        ours, ours_s = peak_rss(
            [
                functuner,
                "merge",
                "--base",
                str(base),
                "--adapter",
                str(adapter),
                "--out",
                str(work / "out_functuner"),
                "--quiet",
            ]
        )
        theirs, theirs_s = peak_rss(
            [sys.executable, "-c", IN_MEMORY, str(base), str(adapter), str(work / "out_in_memory"), shard_arg]
        )
        diff = compare(work / "out_functuner", work / "out_in_memory")
        budget = largest + adapter_bytes + 300 * MiB
        print(
            f"base checkpoint: {total / MiB:.1f} MiB in {len(shards)} shards (largest {largest / MiB:.1f} MiB);"
            f" adapter {adapter_bytes / MiB:.1f} MiB (LoRA r={args.rank} on 7 projections x"
            f" {_config(args.quick).num_hidden_layers} layers)"
        )
        print(f"peak RSS of a process that only imports torch + safetensors: {imports_rss / MiB:.1f} MiB")
        print(f"functuner merge peak RSS: {ours / MiB:.1f} MiB  (wall {ours_s:.1f} s)")
        print(
            f"in-memory peak RSS: {theirs / MiB:.1f} MiB  (PeftModel.merge_and_unload + save_pretrained;"
            f" wall {theirs_s:.1f} s)"
        )
        print(f"ratio functuner / in-memory: peak RSS {ours / theirs:.2f}, wall {ours_s / theirs_s:.2f}")
        verdict = "met" if ours <= budget else "NOT met"
        if args.quick:
            verdict += " (quick mode: shards of 0.1 MiB make this target meaningless; run without --quick)"
        print(f"target peak <= largest shard + adapter + 300 MiB = {budget / MiB:.1f} MiB: {verdict}")
        print(f"max |functuner - in-memory| over all merged tensors: {diff:.3e}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
