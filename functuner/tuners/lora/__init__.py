"""LoRA and its variants (DoRA, rsLoRA, LoRA+): config, math, per-sample batches and adapter combination.

* :mod:`.tuner`: the config, the math (``lora_delta``), routes, merge/unmerge: ``tuner = Tuner(...)``.
* :mod:`.mixed`: per-sample adapters in one batch (stacked adapters, pure).
* :mod:`.combine`: ``add_weighted_adapter``'s combination types, pure.
"""

from __future__ import annotations

from .tuner import LoRAConfig, LoraConfig, lora_delta

__all__ = ["LoRAConfig", "LoraConfig", "lora_delta"]
