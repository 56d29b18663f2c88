"""LoRA's streaming merge plan: which base checkpoint keys change and how, from shapes alone.

The CLI's ``functuner merge`` (:mod:`functuner.io.merge_shards`) folds an adapter
into a safetensors checkpoint shard by shard, never holding the whole model.  It
asks the tuner, through the ``plan_shard_merge`` hook, for a plan built from the
adapter's tensors and the base's key -> shape table only; the plan maps base keys
to pure functions of the old tensor (the same formula :func:`functuner.merge`
uses, :func:`.merge.merged_weight`) and to tensors stored with the adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...errors import ConfigError
from ..base import ShardMergePlan
from .inits.guard import check_unverifiable, check_weight
from .merge import merged_weight
from .tokens import with_rows
from .variants import merge_inputs
from .weight_layout import WeightSite, weight_layout

__all__ = ["plan_shard_merge"]


def _weight_fn(
    site: WeightSite, tensors: Mapping[str, torch.Tensor], config: Any, source: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    magnitude = tensors[site.m] if site.m is not None else None

    def fn(w: torch.Tensor) -> torch.Tensor:
        check_weight(config, f"{site.name}.{site.weight_name}", w, source)  # PiSSA/OLoRA/CorDA: the residual only
        w32, A, B = merge_inputs(site.variant, w, w, tensors[site.a], tensors[site.b], tensors)
        return merged_weight(w32, A, B, site.scaling, site.kind, magnitude)

    return fn


def _bias_fn(lora_b_bias: torch.Tensor, scaling: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(bias: torch.Tensor) -> torch.Tensor:
        return bias.float() + lora_b_bias.float() * scaling

    return fn


def plan_shard_merge(
    tensors: Mapping[str, torch.Tensor],
    config: Any,
    adapter_name: str,
    shapes: Mapping[str, tuple[int, ...]],
    fan_in_fan_out: bool,
    source: str,
) -> ShardMergePlan:
    """The merge plan of one LoRA adapter (functuner names) against base keys with ``shapes``. Pure.

    Raises :class:`~functuner.errors.ParamsMismatchError` for an adapter key whose
    target the base lacks or whose shape does not fit, and
    :class:`~functuner.errors.ConfigError` for ``lora_bias`` on a layer without a bias.
    """
    layout = weight_layout(tensors, config, adapter_name, shapes, fan_in_fan_out=fan_in_fan_out, source=source)
    check_unverifiable(config, source)  # PiSSA/OLoRA/CorDA without base fingerprints: refused before any shard is read
    merges: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for site in layout.sites:
        merges[f"{site.name}.{site.weight_name}"] = _weight_fn(site, tensors, config, source)
        bkey = f"{site.name}.bias"
        if site.bias is not None:
            replacements[bkey] = tensors[site.bias]
        if site.lora_bias is not None:
            if bkey not in shapes:
                raise ConfigError(
                    f"{source}: LoRA on {site.name!r} has lora_bias=True but the base has no bias {bkey!r} to merge"
                    " it into (PEFT refuses this merge too); keep the adapter unmerged"
                )
            merges[bkey] = _bias_fn(tensors[site.lora_bias], site.scaling)
    for full, key in layout.replacements:
        replacements[full] = tensors[key]
    for wkey, key, idx in layout.token_rows:  # trainable tokens: their rows replace the weight's
        merges[wkey] = _rows_fn(tensors[key], idx)
    return ShardMergePlan(merges, replacements)


def _rows_fn(rows: torch.Tensor, indices: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(w: torch.Tensor) -> torch.Tensor:
        return with_rows(w.float(), indices, rows)

    return fn
