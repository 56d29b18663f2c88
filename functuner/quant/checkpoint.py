"""Recognise a quantized base checkpoint from its tensor names and ``config.json`` (no tensor data read).

The streaming shard merge (:mod:`functuner.io.merge_shards`) works on float
tensors; a quantized checkpoint's packed weights would only fail to match the
adapter's shapes.  :func:`quantized_checkpoint` says what makes a checkpoint
quantized (transformers' ``quantization_config`` or a quantization-state tensor
name of bitsandbytes, GPTQ/AWQ, HQQ or optimum-quanto), so the merge can refuse
it with the reason and the way out before writing anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["bnb_dequantizable", "dequantize_bnb_checkpoint", "quantized_checkpoint"]

# tensor-name suffixes that only quantized layers write (bitsandbytes 4/8-bit, GPTQ/AWQ, HQQ, optimum-quanto)
_STATE_SUFFIXES = (
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
    ".SCB",
    ".weight_format",
    ".qweight",
    ".qzeros",
    ".W_q",
    ".weight._data",
)


def quantized_checkpoint(keys: Iterable[str], config: Mapping[str, Any] | None) -> str | None:
    """Why a checkpoint with tensors ``keys`` and ``config.json`` ``config`` is quantized, or ``None`` if it is not."""
    qc = (config or {}).get("quantization_config")
    if isinstance(qc, Mapping):
        method = qc.get("quant_method") or ("bitsandbytes" if qc.get("load_in_4bit") or qc.get("load_in_8bit") else "")
        return f"config.json has quantization_config (quant_method {method!r})"
    for key in keys:
        if key.endswith(_STATE_SUFFIXES):
            return f"tensor {key!r} is quantization state"
    return None


_BNB4_STATE = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


def bnb_dequantizable(keys: Iterable[str]) -> bool:
    """Whether every quantization-state tensor among ``keys`` is bitsandbytes' (4-bit stats or 8-bit ``SCB``)."""
    keys = list(keys)
    weights4 = {k[: -len(s)] for k in keys for s in _BNB4_STATE if k.endswith(s)}
    rows8 = {k[: -len(".SCB")] for k in keys if k.endswith(".SCB")}
    others = [
        k for k in keys if k.endswith(_STATE_SUFFIXES) and not k.endswith((*_BNB4_STATE, ".SCB", ".weight_format"))
    ]
    return bool(weights4 or rows8) and not others


def dequantize_bnb_checkpoint(
    base_dir: Path, out_dir: Path, shards: list[str], index: Mapping[str, Any] | None, dtype: torch.dtype | None
) -> None:
    """Write a float copy of bitsandbytes checkpoint ``base_dir`` into ``out_dir``, one shard at a time.

    4-bit weights (packed ``uint8`` plus ``absmax`` / ``quant_map`` / nested statistics / the packed
    quant-state JSON, which may sit in another shard) are dequantized with bitsandbytes' own
    ``dequantize_4bit`` to ``dtype`` (default: the dtype recorded in the quant state); 8-bit weights
    (``int8`` rows plus ``SCB``) to ``int8 * SCB / 127`` (default fp16).  The state tensors are dropped,
    the index's ``weight_map`` and ``total_size`` follow, ``config.json`` loses its
    ``quantization_config``; every other file is copied.  Memory: one output shard.
    """
    import importlib
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    bf: Any = importlib.import_module("bitsandbytes.functional")
    owner: dict[str, str] = {}
    for shard in shards:
        with safe_open(str(base_dir / shard), "pt") as f:
            owner.update(dict.fromkeys(f.keys(), shard))

    def read(key: str) -> torch.Tensor:
        with safe_open(str(base_dir / owner[key]), "pt") as f:
            tensor: torch.Tensor = f.get_tensor(key)
        return tensor

    weights4 = {k[: -len(s)] for k in owner for s in _BNB4_STATE if k.endswith(s)}
    stats4 = {k for w in weights4 for k in owner if k.startswith(w + ".")}
    rows8 = {k[: -len(".SCB")] for k in owner if k.endswith(".SCB")}
    dropped = stats4 | {f"{r}.SCB" for r in rows8} | {f"{r}.weight_format" for r in rows8}
    total = 0
    weight_map: dict[str, str] = {}
    for shard in shards:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(base_dir / shard), "pt") as f:
            for key in f.keys():
                if key in dropped:
                    continue
                t = f.get_tensor(key)
                if key in weights4:
                    state = bf.QuantState.from_dict(
                        {k[len(key) + 1 :]: read(k) for k in stats4 if k.startswith(key + ".")}, torch.device("cpu")
                    )
                    t = bf.dequantize_4bit(t, state).to(dtype or state.dtype)
                elif key.endswith(".weight") and key[: -len(".weight")] in rows8:
                    scb = read(key[: -len(".weight")] + ".SCB")
                    t = (t.float() * (scb.float().view(-1, 1) / 127.0)).to(dtype or torch.float16)
                elif dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[key] = t.contiguous()
                weight_map[key] = shard
                total += t.numel() * t.element_size()
        save_file(out, str(out_dir / shard), metadata={"format": "pt"})
        del out
    for item in sorted(base_dir.iterdir()):
        if item.name in shards or item.name == "model.safetensors.index.json":
            continue
        if item.name == "config.json":
            config = json.loads(item.read_text(encoding="utf-8"))
            config.pop("quantization_config", None)
            (out_dir / item.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        elif item.is_dir():
            shutil.copytree(item, out_dir / item.name)
        else:
            shutil.copy2(item, out_dir / item.name)
    if index is not None:
        new_index = {**dict(index), "weight_map": weight_map}
        new_index["metadata"] = {**dict(index.get("metadata") or {}), "total_size": total}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")
