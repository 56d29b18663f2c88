"""Trainable tokens: new values for a few rows of an embedding matrix (PEFT's ``TrainableTokens``), as pure functions.

PEFT offers this as LoRA's ``trainable_token_indices`` option (and as a tuner of
its own, which functuner does not implement yet: a ``TRAINABLE_TOKENS`` directory
is refused by type).  Only the chosen rows are trained; the rest of the embedding
stays frozen, which is far smaller than ``modules_to_save=["embed_tokens"]``.

The adapter tensor of a module ``emb`` is ``emb.token_adapter.trainable_tokens_delta.<adapter>``
(PEFT's in-memory name; despite the name it holds the rows' *values*, not a
difference, shape ``(len(indices), dim)``), written ``emb.token_adapter.trainable_tokens_delta``
in PEFT's files.  The forward runs the module with the weight
``W.index_copy(0, indices, values)`` (differentiable in ``values``), as PEFT's
``TrainableTokensLayer`` does; merging writes those rows.  A module whose weight
is the *same* parameter (an ``lm_head`` tied to the input embedding) gets the
same rows, as PEFT's tied token adapter does.

This module holds the parts LoRA's option (:mod:`functuner.tuners.lora`) uses:
key names, index resolution, the row arithmetic.  Everything is pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ...errors import ConfigError, ParamsMismatchError

__all__ = [
    "DELTA_PART",
    "TokenKey",
    "check_indices",
    "indices_for",
    "parse_token_key",
    "resolve_token_modules",
    "token_key",
    "tied_modules",
    "with_rows",
]

DELTA_PART = "token_adapter.trainable_tokens_delta"


class TokenKey(NamedTuple):
    """A parsed trainable-tokens key: ``<module>.token_adapter.trainable_tokens_delta[.<adapter>]``."""

    module: str
    adapter: str | None  # None in PEFT's on-disk spelling


def token_key(module_name: str, adapter_name: str) -> str:
    """The in-memory key of the trainable rows of ``module_name`` for ``adapter_name``."""
    return f"{module_name}.{DELTA_PART}.{adapter_name}"


def parse_token_key(key: str) -> TokenKey | None:
    """Split a trainable-tokens key (in-memory or PEFT's on-disk spelling); ``None`` for any other key. Pure."""
    marker = f".{DELTA_PART}"
    head, sep, tail = key.partition(marker)
    if not sep or not head:
        return None
    if tail == "":
        return TokenKey(head, None)
    if tail.startswith(".") and "." not in tail[1:]:
        return TokenKey(head, tail[1:])
    return None


def check_indices(value: Any) -> None:
    """Refuse a malformed ``trainable_token_indices`` (:class:`ConfigError` naming the field)."""
    if value is None:
        return
    lists = value.values() if isinstance(value, Mapping) else [value]
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, str) or not k:
                raise ConfigError(f"trainable_token_indices: keys must be module names, got {k!r}")
    for idx in lists:
        if isinstance(idx, (str, bytes)) or not isinstance(idx, Sequence) or not idx:
            raise ConfigError(
                f"trainable_token_indices: expected a non-empty list of token ids (or {{module: list}}), got {idx!r}"
            )
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ConfigError(f"trainable_token_indices: token ids must be non-negative integers, got {i!r}")
        if len(set(idx)) != len(idx):
            raise ConfigError(f"trainable_token_indices: token ids must be distinct, got {list(idx)!r}")


def _input_embeddings_name(model: nn.Module) -> str:
    """The module name of ``model.get_input_embeddings()``, else ``embed_tokens`` (PEFT's fallback)."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            for name, module in model.named_modules():
                if module is emb:
                    return str(name)
    return "embed_tokens"


def resolve_token_modules(model: nn.Module, value: Any) -> dict[str, tuple[int, ...]]:
    """``{full module name: indices}`` that ``trainable_token_indices`` names on ``model``.

    A list targets the model's input embedding (``get_input_embeddings()``, else a
    module named ``embed_tokens``), as PEFT; a dict maps module names (exact or
    ``.``-suffix match) to indices.  :class:`ConfigError` naming the entry when it
    matches no module, a module without a 2-D ``weight``, or an index past the
    weight's rows.
    """
    if value is None:
        return {}
    spec = dict(value) if isinstance(value, Mapping) else {_input_embeddings_name(model): value}
    out: dict[str, tuple[int, ...]] = {}
    for key, idx in spec.items():
        found = [n for n, _ in model.named_modules() if n and (n == key or n.endswith("." + key))]
        if not found:
            raise ConfigError(
                f"trainable_token_indices: {key!r} matches no module of the model (name the embedding module, e.g."
                " {'embed_tokens': [...]})"
            )
        for name in found:
            weight = getattr(model.get_submodule(name), "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ConfigError(
                    f"trainable_token_indices: module {name!r} has no 2-D weight; trainable tokens adapt embedding"
                    " (or tied linear) layers"
                )
            if max(idx) >= weight.shape[0]:
                raise ConfigError(
                    f"trainable_token_indices: token id {max(idx)} is out of range for {name!r}"
                    f" ({weight.shape[0]} rows)"
                )
            out[name] = tuple(int(i) for i in idx)
    return out


def indices_for(value: Any, module_name: str, source: str = "trainable_token_indices") -> tuple[int, ...]:
    """The indices ``trainable_token_indices`` gives ``module_name`` (a list: any module; a dict: its entry)."""
    if isinstance(value, Mapping):
        for key, idx in value.items():
            if module_name == key or module_name.endswith("." + key):
                return tuple(int(i) for i in idx)
        raise ParamsMismatchError(
            f"{source}: params hold trainable tokens of {module_name!r}, which trainable_token_indices"
            f" ({sorted(value)!r}) does not name"
        )
    if value is None:
        raise ParamsMismatchError(
            f"{source}: params hold trainable tokens of {module_name!r} but the config has no trainable_token_indices"
        )
    return tuple(int(i) for i in value)


def with_rows(weight: torch.Tensor, indices: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    """``weight`` with rows ``indices`` replaced by ``rows`` (a new tensor, differentiable in both). Pure."""
    index = torch.tensor(list(indices), dtype=torch.long, device=weight.device)
    return weight.index_copy(0, index, rows.to(device=weight.device, dtype=weight.dtype))


def tied_modules(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    """Modules of ``model`` (``module`` first) whose ``weight`` is the same parameter object as ``module``'s."""
    weight = module._parameters.get("weight")
    out = [module]
    if weight is None:
        return out
    for _, other in model.named_modules():
        if other is not module and other._parameters.get("weight") is weight:
            out.append(other)
    return out
