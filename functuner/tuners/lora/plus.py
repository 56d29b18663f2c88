"""LoRA+ optimizer param groups (the ``Tuner.optimizer_groups`` hook; SWIFT's ``create_optimizer_param_groups``).

LoRA+ (Hayou et al., 2024) trains ``B`` with a larger learning rate than ``A``.
As in SWIFT, ``lorap_lr_ratio`` defaults to 16 and LoRA+ takes effect only
through these groups: only a caller that builds its optimizer from
``create_optimizer_param_groups`` (SWIFT's ``lorap`` optimizer callback does)
trains with them; ``lorap_lr_ratio=None`` means no groups of its own.
For an adapter whose ``lorap_lr_ratio`` is not ``None``: ``lora_A`` tensors get
``lr``; ``lora_B`` tensors and 1-d tensors (biases, DoRA magnitudes) get
``lr * lorap_lr_ratio``, split by whether transformers' Trainer decays them;
embedding LoRA tensors get ``lorap_emb_lr``.  Pure: reads the tensors' names
and shapes only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError

__all__ = ["optimizer_groups"]


def optimizer_groups(
    config: Any,
    tensors: Mapping[str, nn.Parameter],
    defaults: Mapping[str, Any],
    decayed: Callable[[torch.Tensor], bool],
) -> list[dict[str, Any]] | None:
    """The adapter's LoRA+ groups, or None when ``lorap_lr_ratio`` is unset (no groups of its own)."""
    ratio = getattr(config, "lorap_lr_ratio", None)
    if ratio is None:
        return None
    lr = defaults.get("lr")
    if lr is None:
        raise ConfigError("create_optimizer_param_groups needs lr=... for LoRA+ (lorap_lr_ratio is set)")
    wd = defaults.get("weight_decay", 0.0)
    g: dict[str, list[nn.Parameter]] = {"A": [], "emb": [], "B": [], "B_nd": []}
    for key, p in tensors.items():
        if ".lora_embedding_" in key:
            g["emb"].append(p)
        elif ".lora_B." in key or key.endswith("lora_B") or p.ndim == 1:  # MergedLinear's: <module>.lora_B
            g["B" if decayed(p) else "B_nd"].append(p)
        else:
            g["A"].append(p)
    return [
        {"params": g["A"], "weight_decay": wd, "lr": lr},
        {"params": g["emb"], "weight_decay": wd, "lr": config.lorap_emb_lr},
        {"params": g["B"], "weight_decay": wd, "lr": lr * ratio},
        {"params": g["B_nd"], "weight_decay": 0.0, "lr": lr * ratio},
    ]
