"""How one call's keyword arguments are rewritten for the virtual tokens: task types, KV caches, generation.

PEFT spreads this over ``PeftModelFor<Task>.forward`` and ``PeftModelForCausalLM.prepare_inputs_for_generation``
(peft 0.21); here it is two pure functions of the call's keywords, run by the tuners' pre slots.

**Task types** (``task_type``), for prompt tuning and P-tuning (virtual tokens prepended to the embeddings):

* ``CAUSAL_LM``: ``labels`` get ``-100`` in front; ``token_type_ids`` refused (PEFT drops them with a warning).
* ``SEQ_CLS``: ``labels`` unchanged (one per sequence); ``token_type_ids`` get zeros in front (PEFT's).
* ``TOKEN_CLS``: ``token_type_ids`` get zeros in front; ``labels`` get ``-100`` in front.  (PEFT 0.21 leaves
  them as they are, so its loss fails on a shape mismatch: ``n + L`` logits per row against ``L`` labels.)
* ``FEATURE_EXTRACTION``: no labels; ``token_type_ids`` refused (PEFT drops them with a warning).

``position_ids`` are refused (PEFT drops them with a warning), except under :func:`generating` where, as
PEFT's ``prepare_inputs_for_generation``, the ones ``generate`` passes are not used (positions follow the cache).
Prefix tuning shifts ``position_ids`` by ``num_virtual_tokens`` and keeps ``token_type_ids`` for ``SEQ_CLS`` /
``TOKEN_CLS`` (refused otherwise).  ``attention_mask`` (2-D) always gets ``num_virtual_tokens`` ones in front
(PEFT's float ones).

**Caches** (``CAUSAL_LM`` only): a call with an empty cache (or none) is a *prefill*: prompt tuning and
P-tuning prepend the virtual tokens, prefix tuning writes its prefixes into the given cache (a fresh
``DynamicCache`` without one).  A call whose cache already holds tokens is a *decoding step*: the virtual
tokens are in the cache, so only ``attention_mask`` grows.  This is PEFT's generation, and it is what
``generate`` (through the shim) runs step by step.  Prefix tuning with ``use_cache=False`` ignores a cache in
the call (``generate(use_cache=False)`` hands back the prefix cache the model returned; PEFT 0.21.2 on
transformers 5 reuses that stale cache and departs from its own forward).
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError

__all__ = ["GENERATING", "cache_param", "generating", "prefix_call", "prompt_call"]

GENERATING: contextvars.ContextVar[bool] = contextvars.ContextVar("functuner_prompt_generating", default=False)
_CLS = ("SEQ_CLS", "TOKEN_CLS")


@contextmanager
def generating() -> Iterator[None]:
    """Calls inside run as PEFT's ``generate`` runs them (``position_ids`` from ``generate`` are not used).

    The shim's ``SwiftModel.generate`` enters it (the ``generation`` hook of these tuners); a functional user
    running ``transformers``' ``generate`` under :func:`functuner.core.routing.routed` enters it too.
    """
    token = GENERATING.set(True)
    try:
        yield
    finally:
        GENERATING.reset(token)


def cache_param(module: nn.Module) -> str | None:
    """The name of the model forward's cache argument (transformers 5: ``cache``; before: ``past_key_values``)."""
    params = inspect.signature(module.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def _take_cache(kw: dict[str, Any]) -> Any:
    cache, legacy = kw.pop("cache", None), kw.pop("past_key_values", None)
    if cache is not None and legacy is not None:
        raise ConfigError("prompt learning: the call has both cache= and past_key_values=; pass one")
    return cache if cache is not None else legacy


def _seen(cache: Any, what: str) -> int:
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise ConfigError(
            f"{what}: the cache is a {type(cache).__name__}; pass a transformers Cache (DynamicCache), not legacy tuples"
        )
    return int(cache.get_seq_length())


def _common(kw: dict[str, Any], n: int, task: str, what: str, cache: Any) -> int:
    """Checks and the ``attention_mask`` shared by both forms; returns the batch size."""
    if cache is not None and task != "CAUSAL_LM":
        raise ConfigError(
            f"{what}: a cache (generation) is PEFT's CAUSAL_LM path; task_type={task!r} calls take no cache"
        )
    first = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    if first is None:
        raise ConfigError(f"{what}: the call has neither input_ids nor inputs_embeds")
    batch = int(first.shape[0])
    mask = kw.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ConfigError(
                f"{what}: attention_mask must be a 2-D (batch, length) tensor (a 4-D or per-layer mask cannot get"
                " the virtual tokens' columns); use a DynamicCache, not a static one"
            )
        kw["attention_mask"] = torch.cat((torch.ones(batch, n).to(mask.device), mask), dim=1)  # PEFT's float ones
    tt = kw.get("token_type_ids")
    if tt is not None and task not in _CLS:
        raise ConfigError(
            f"{what}: token_type_ids are not supported with task_type={task!r} (PEFT drops them with a warning);"
            " call without them"
        )
    return batch


def prompt_call(
    module: nn.Module,
    kw: dict[str, Any],
    n: int,
    task: str,
    prompts_of: Callable[[], torch.Tensor],
    embeddings: Callable[[nn.Module], nn.Module],
    what: str,
) -> dict[str, Any]:
    """Prompt tuning / P-tuning: the call's keywords with ``prompts_of()`` ``(n, dim)`` prepended (or cached);
    ``embeddings(model)``: the model's word embeddings (embed ``input_ids``)."""
    cache = _take_cache(kw)
    seen = _seen(cache, what)
    if kw.get("position_ids") is not None:
        if not (GENERATING.get() and task == "CAUSAL_LM"):
            raise ConfigError(
                f"{what}: position_ids are not supported with virtual tokens (PEFT drops them with a warning);"
                " call without them"
            )
        kw["position_ids"] = None  # PEFT's prepare_inputs_for_generation: the positions follow the cache
    batch = _common(kw, n, task, what, cache)
    tt = kw.get("token_type_ids")
    if tt is not None:
        kw["token_type_ids"] = torch.cat((torch.zeros(batch, n, dtype=torch.long, device=tt.device), tt), dim=1)
    if seen == 0:  # prefill (or a call without a cache): the virtual tokens go in front
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = embeddings(module)(kw["input_ids"])
        labels = kw.get("labels")
        if labels is not None and task in ("CAUSAL_LM", "TOKEN_CLS"):
            kw["labels"] = torch.cat((torch.full((batch, n), -100).to(labels.device), labels), dim=1)
        prompts = prompts_of().to(embeds.device, embeds.dtype)
        kw["inputs_embeds"] = torch.cat((prompts.unsqueeze(0).expand(batch, -1, -1), embeds), dim=1)
        kw["input_ids"] = None
    if cache is not None:
        kw[cache_param(module) or "cache"] = cache
    return kw


def _fill(cache: Any, layers: list[tuple[torch.Tensor, torch.Tensor]], what: str) -> Any:
    from transformers import DynamicCache

    if not isinstance(cache, DynamicCache):
        raise ConfigError(
            f"{what}: an empty {type(cache).__name__} cannot take the prefixes; use a DynamicCache"
            " (generate's default cache_implementation)"
        )
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)  # the caller's cache object holds the prefixes, as the model's own updates do
    return cache


def prefix_call(
    module: nn.Module,
    kw: dict[str, Any],
    n: int,
    task: str,
    layers_of: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]],
    what: str,
) -> dict[str, Any]:
    """Prefix tuning: the call's keywords with the prefixes (``layers_of(batch)``: each layer's keys and values) in
    the cache; a decoding step (the cache holds tokens already) only extends ``attention_mask``."""
    name = cache_param(module)
    if name is None:
        raise ConfigError(
            f"{what}: {type(module).__name__}.forward takes no cache (cache= / past_key_values=), so it cannot take"
            " prefixes; PEFT 0.21 runs such a model's backbone and head by hand, which functuner does not: use a model"
            " class whose forward takes a cache (e.g. LlamaForSequenceClassification)"
        )
    cache = _take_cache(kw)
    if kw.get("use_cache") is False:
        # the model returns the prefix cache even so, and generate(use_cache=False) hands it back on the next
        # step: with use_cache=False a cache in the call is not this call's (each call starts from the prefixes)
        cache = None
    seen = _seen(cache, what)
    batch = _common(kw, n, task, what, cache)
    if kw.get("position_ids") is not None:
        kw["position_ids"] = kw["position_ids"] + n
    if seen == 0:
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(layers_of(batch), config=getattr(module, "config", None))
        else:
            cache = _fill(cache, layers_of(batch), what)
    kw[name] = cache
    return kw
