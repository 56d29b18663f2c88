"""Trainable tokens: new values for a few rows of an embedding matrix (PEFT's ``TrainableTokens``), as pure functions.

PEFT offers this as LoRA's ``trainable_token_indices`` option and as a tuner of
its own (:mod:`functuner.tuners.trainable_tokens`, which holds the row arithmetic
both use: :func:`with_rows`, :func:`tied_modules`, the forward slot).  Only the chosen rows are trained; the rest of the embedding
stays frozen, which is far smaller than ``modules_to_save=["embed_tokens"]``.

The adapter tensor of a module ``emb`` is ``emb.token_adapter.trainable_tokens_delta.<adapter>``
(PEFT's in-memory name; despite the name it holds the rows' *values*, not a
difference, shape ``(len(indices), dim)``), written ``emb.token_adapter.trainable_tokens_delta``
in PEFT's files.  The forward runs the module with the weight
``W.index_copy(0, indices, values)`` (differentiable in ``values``), as PEFT's
``TrainableTokensLayer`` does; merging writes those rows.  A module whose weight
is the *same* parameter (an ``lm_head`` tied to the input embedding) gets the
same rows, as PEFT's tied token adapter does.

This module holds what only LoRA's option (:mod:`functuner.tuners.lora`) needs:
key names and index resolution.  Everything is pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ...errors import ConfigError, ParamsMismatchError
from ..trainable_tokens import check_token_ids, input_embeddings_name, rows_slot, tied_modules, with_rows

__all__ = [
    "DELTA_PART",
    "TokenKey",
    "check_indices",
    "indices_for",
    "parse_token_key",
    "resolve_token_modules",
    "rows_slot",
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
        check_token_ids(idx, "trainable_token_indices")


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
    spec = dict(value) if isinstance(value, Mapping) else {input_embeddings_name(model): value}
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
