"""LoRA and its variants (DoRA, rsLoRA, LoRA+): config, math, per-sample batches and adapter combination.

One module per concern:

* :mod:`.config`: :class:`LoRAConfig` (alias ``LoraConfig``) and its checks.
* :mod:`.keys`: LoRA tensor names, built (:func:`param_names`) and parsed (:func:`parse_key`, ``LORA_PARTS``).
* :mod:`.math`: weight arithmetic on plain tensors (:func:`lora_delta`, DoRA norms, weight orientation).
* :mod:`.layout`: layer kinds, expected shapes, the weakly cached per-model layout (:func:`layout_of`).
* :mod:`.forward`: the forward slots (:func:`routes`).
* :mod:`.merge`: :func:`merge` / :func:`unmerge` on a model or on a ``{name: tensor}`` weights mapping.
* :mod:`.tuner`: :func:`init`, :func:`validate` and ``tuner = Tuner(...)``, the registry entry.
* :mod:`.mixed`: per-sample adapters in one batch (stacked adapters, pure).
* :mod:`.combine`: ``add_weighted_adapter``'s combination types, pure.
* :mod:`.variants`: PEFT's variants KaSA, MiCA, VeLoRA and BD-LoRA (:mod:`.monteclora`: MonteCLoRA), pure.
* :mod:`.merged_linear`: SWIFT's MergedLinear LoRA (``use_merged_linear`` / ``enable_lora``) for fused projections.

The submodules ``tuner`` and ``merge`` are not shadowed by same-named attributes here: use
``functuner.tuners.lora.tuner.tuner`` for the registry entry and :func:`functuner.merge` to merge.
"""

from __future__ import annotations

from .config import LoRAConfig, LoraConfig
from .keys import LORA_PARTS, LoraKey, param_names, parse_key
from .math import lora_delta
from .tuner import init, validate

__all__ = [
    "LORA_PARTS",
    "LoRAConfig",
    "LoraConfig",
    "LoraKey",
    "init",
    "lora_delta",
    "param_names",
    "parse_key",
    "validate",
]
