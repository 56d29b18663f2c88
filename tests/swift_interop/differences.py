"""The differences from ms-swift 4.6 that the side-by-side scenarios (``scenarios.py``) expect, each stated exactly.

Every one is a case where ms-swift is demonstrably wrong and functuner keeps its own behaviour
(docs/swift.md, "Remaining differences"): :data:`DIFFERENCES` maps ``(case, item)`` to why and to a
predicate on (SWIFT's value, functuner's value) that holds only for exactly that difference, so a
check still fails if the two libraries differ in any other way.  :data:`REVERSE_REFUSED` names the
checkpoints ms-swift writes that functuner refuses to load, and the word its error must contain.
Imported by ``scenarios.py`` in both venvs, so it imports neither library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["DIFFERENCES", "OUT_TOL", "REVERSE_REFUSED"]


def _no_part(names: Any) -> Any:
    """``names`` (a list, a set or optimizer groups) without the Part adapter ``p``'s entries."""
    if isinstance(names, dict):
        return {k: v for k, v in names.items() if not k.startswith("p/")}
    if names and isinstance(names[0], dict):
        groups = [{**g, "params": [n for n in g["params"] if "_part_" not in n]} for g in names]
        return [g for g in groups if g["params"]]
    return type(names)(n for n in names if "_part_" not in n and not n.startswith("p/"))


def _lora_grouping(groups: list[dict[str, Any]]) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """``({LoRA parameter: (lr, weight decay)}, every parameter)`` of optimizer groups."""
    flat = {n: (g.get("lr"), g["weight_decay"]) for g in groups for n in g["params"]}
    return {n: v for n, v in flat.items() if ".lora_" in n}, sorted(flat)


OUT_TOL = 1e-5
_PART_AFTER_LORA = (
    "SWIFT's Part skips a module another tuner already wrapped (its `plugin` check), so a Part added after a LoRA"
    " on the same modules silently trains, saves and loads nothing; functuner applies it"
)
_LORA_PLUS_CLAIMS_ALL = (
    "SWIFT's LoRA+ groups (lorap_lr_ratio, default 16) take every trainable parameter of the model, other"
    " adapters' included (Part's biases get 16x the learning rate); functuner's take LoRA's own tensors"
)
_LORA_OF_LORA = (
    "SWIFT's second LoRA also matches the first LoRA's own modules (lora_A.a, lora_B.a, base_layer) with a"
    " regex target and wraps them in LoRA (LoRA of LoRA: 80 tensors saved instead of 16, and"
    " create_optimizer_param_groups raises); functuner's targets never include its own modules"
)
#: Differences kept on purpose: ``{(case, item): (why, holds(SWIFT's value, functuner's value))}``, each a
#: precise statement of the difference (docs/swift.md, "Remaining differences").  Values: outputs are tensors
#: (functuner's side is ``{adapter: output with only that adapter active, "all": output}``), files are
#: ``{path:key: tensor}``, the rest as recorded.
DIFFERENCES: dict[tuple[str, str], tuple[str, Callable[[Any, Any], bool]]] = {
    **{
        ("part_then_lora", item): (
            _LORA_PLUS_CLAIMS_ALL,
            lambda sw, ft: (
                _lora_grouping(sw)[0] == _lora_grouping(ft)[0] and _lora_grouping(sw)[1] == _lora_grouping(ft)[1]
            ),
        )
        for item in ("groups", "groups after prepare")
    },
    **{
        ("lora_then_part", item): (_PART_AFTER_LORA, lambda sw, ft: sw == _no_part(ft) and sw != ft)
        for item in ("trainable", "groups", "bin_files", "trainable after prepare", "groups after prepare")
    },
    **{
        ("lora_then_part", item): (
            _PART_AFTER_LORA,
            lambda sw, ft: sw.keys() == _no_part(ft).keys() and all(torch.equal(sw[k], ft[k]) for k in sw),
        )
        for item in (".bin tensors", "re-saved tensors", "tensors of the same calls")
    },
    ("lora_then_part", "saved keys"): (_PART_AFTER_LORA, lambda sw, ft: sw == {k for k in ft if ".lora_" in k}),
    **{
        ("lora_then_part", item): (
            _PART_AFTER_LORA,
            lambda sw, ft: float((sw - ft["l"]).abs().max()) <= OUT_TOL < float((sw - ft["all"]).abs().max()),
        )
        for item in ("outputs", "outputs of the same calls")
    },
    **{
        ("lora_then_regex_lora", item): (
            _LORA_OF_LORA,
            lambda sw, ft: any(".lora_A.a.lora_A.b." in n for n in sw) and set(_no_nested(ft)) < set(sw),
        )
        for item in ("trainable", "trainable after prepare")
    },
    **{
        ("lora_then_regex_lora", item): (
            _LORA_OF_LORA,
            lambda sw, ft: (
                sw == [{"raises": "ValueError: Cannot set one parameter to different param groups"}]
                and "raises" not in ft[0]
            ),
        )
        for item in ("groups", "groups after prepare")
    },
    **{
        ("lora_then_regex_lora", item): (
            _LORA_OF_LORA,
            lambda sw, ft: _nested(sw) and not _nested(ft) and len(sw) > len(ft),
        )
        for item in (".bin tensors", "re-saved tensors", "tensors of the same calls", "saved keys")
    },
    **{  # the outputs differ (LoRA applied to LoRA's own matrices); the keys above show why
        ("lora_then_regex_lora", item): (_LORA_OF_LORA, lambda sw, ft: float((sw - ft["all"]).abs().max()) > OUT_TOL)
        for item in ("outputs", "outputs of the same calls")
    },
}


#: SWIFT checkpoints functuner refuses to load: ``{case: (a word of the error, why)}``.
REVERSE_REFUSED = {
    "lora_then_part": ("missing", _PART_AFTER_LORA + "; SWIFT's checkpoint has Part's config without its tensors"),
    "lora_then_regex_lora": ("unexpected", _LORA_OF_LORA + "; those nested keys fit no module functuner has"),
}


def _nested(keys: Any) -> bool:
    """Whether some key is a LoRA inside a LoRA (``...lora_A.a.lora_A.b.weight``)."""
    return any(k.count(".lora_") > 1 for k in keys)


def _no_nested(names: list[str]) -> list[str]:
    return [n for n in names if n.count(".lora_") == 1]
