"""Trainable tokens (PEFT's ``TrainableTokens`` tuner): new values for a few rows of an embedding, as pure functions.

Only the rows ``token_indices`` of each targeted embedding are trained; the rest
stays frozen, which is far smaller than training the whole matrix (PEFT's
``TrainableTokensConfig(target_modules=..., token_indices=...)``).  The adapter
tensor of a module ``emb`` is ``emb.trainable_tokens_delta.<adapter>``, shape
``(len(token_indices), dim)``: despite PEFT's name it holds the rows' *values*
(not a difference).  PEFT's files name it ``base_model.model.emb.trainable_tokens_delta``.

Math: the module runs with the weight ``W.index_copy(0, indices, values)``
(differentiable in ``values``); merging writes those rows; unmerging puts the
model's own rows back.  ``target_modules=None`` targets the model's input
embedding (``get_input_embeddings()``, else a module named ``embed_tokens``), as
PEFT.  A module whose ``weight`` is the *same* parameter (an ``lm_head`` tied to
the input embedding) sees the same rows, as PEFT's tied adapter does; targeting
both ties them to the first.  ``init_weights=False`` draws the rows from a
standard normal (from the explicit generator).

This module is also the home of the row arithmetic LoRA's
``trainable_token_indices`` option uses (:mod:`functuner.tuners.lora.tokens`):
:func:`with_rows`, :func:`tied_modules`, :func:`rows_slot`, :func:`input_embeddings_name`.
Every function is pure.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..core.targets import select_modules
from ..errors import CheckpointError, ConfigError, ParamsMismatchError, TargetError, UnsupportedModuleError
from . import _lycoris as ly
from .base import KeyNaming, ShardMergePlan, Tuner, TunerConfig, module_local, override_slot

__all__ = [
    "NAMES",
    "PEFT_FORMAT",
    "TrainableTokensConfig",
    "init",
    "input_embeddings_name",
    "merge",
    "routes",
    "rows_slot",
    "tied_modules",
    "tuner",
    "unmerge",
    "validate",
    "with_rows",
]

NAMES = ("trainable_tokens_delta",)


# ---------------------------------------------------------------------------
# row arithmetic (shared with LoRA's trainable_token_indices)
# ---------------------------------------------------------------------------
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


def rows_slot(
    owner: nn.Module,
    indices: tuple[int, ...],
    rows: torch.Tensor,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: Any,
) -> Any:
    """A forward slot: re-run ``module`` with ``owner``'s weight (read at call time) with ``rows`` at ``indices``."""
    weight = with_rows(cast(torch.Tensor, owner.weight), indices, rows)
    return override_slot({"weight": weight})(module, args, kwargs, out)


def input_embeddings_name(model: nn.Module) -> str:
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


def check_token_ids(idx: Any, field_name: str) -> None:
    """Refuse anything but a non-empty list of distinct non-negative ints (:class:`ConfigError` naming the field)."""
    if isinstance(idx, (str, bytes)) or not isinstance(idx, Sequence) or not idx:
        raise ConfigError(f"{field_name}: expected a non-empty list of token ids, got {idx!r}")
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ConfigError(f"{field_name}: token ids must be non-negative integers, got {i!r}")
    if len(set(idx)) != len(idx):
        raise ConfigError(f"{field_name}: token ids must be distinct, got {list(idx)!r}")


# ---------------------------------------------------------------------------
# the tuner
# ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TrainableTokensConfig(TunerConfig):
    """PEFT's ``TrainableTokensConfig`` fields and defaults (peft 0.21)."""

    token_indices: Any = field(default_factory=tuple)
    target_modules: Any = None  # None: the model's input embedding (as PEFT)
    init_weights: bool = True
    # bookkeeping fields PEFT writes into adapter_config.json
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    auto_mapping: Any = None
    peft_version: Any = None
    swift_type: str = "TRAINABLE_TOKENS"
    peft_type: str = "TRAINABLE_TOKENS"

    def check(self, *, complete: bool = True) -> None:
        if complete or self.token_indices:
            check_token_ids(self.token_indices, "TrainableTokensConfig.token_indices")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"TrainableTokensConfig.init_weights must be True or False, got {self.init_weights!r}")


def targets(model: nn.Module, config: TrainableTokensConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``config`` targets, one per weight (a module tied to an earlier one follows it)."""
    wanted = config.target_modules if config.target_modules is not None else input_embeddings_name(model)
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, module in select_modules(model, wanted):
        weight = module._parameters.get("weight")
        if weight is not None and id(weight) in seen:
            continue
        expected_shapes(name, module, config)
        if weight is not None:
            seen.add(id(weight))
        out.append((name, module))
    return out


def expected_shapes(name: str, module: nn.Module, config: TrainableTokensConfig) -> dict[str, tuple[int, ...]]:
    """``{"trainable_tokens_delta": (len(token_indices), dim)}``; raises for a module without a 2-D weight."""
    weight = module._parameters.get("weight")
    if weight is None or weight.dim() != 2 or not isinstance(module, (nn.Embedding, nn.Linear)):
        raise UnsupportedModuleError(
            f"TrainableTokens cannot adapt module {name!r} ({type(module).__name__}); it replaces rows of an"
            " nn.Embedding (or of an nn.Linear tied to one), as PEFT"
        )
    idx = config.token_indices
    if max(idx) >= weight.shape[0]:
        raise ConfigError(
            f"TrainableTokensConfig.token_indices: token id {max(idx)} is out of range for {name!r}"
            f" ({weight.shape[0]} rows); resize the embedding first"
        )
    return {"trainable_tokens_delta": (len(idx), int(weight.shape[1]))}


def _layout(model: nn.Module, params: TunerParams) -> ly.Layout:
    return ly.build_layout(model, params, NAMES, expected_shapes, "TrainableTokens")


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`~functuner.errors.ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    _layout(model, params)


def init(
    model: nn.Module, config: TrainableTokensConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """The chosen rows of each targeted weight, copied (``init_weights=True``) or drawn from ``generator``."""
    if not isinstance(config, TrainableTokensConfig):
        raise ConfigError(f"trainable_tokens.init needs a TrainableTokensConfig, got {type(config).__name__}")
    config.check()
    tensors: dict[str, torch.Tensor] = {}
    for name, module in targets(model, config):
        w = cast(torch.Tensor, module.weight).detach()
        idx = list(config.token_indices)
        if config.init_weights:
            rows = w[idx].clone()
        else:
            rows = torch.randn(len(idx), w.shape[1], generator=generator).to(device=w.device, dtype=w.dtype)
        tensors[f"{name}.trainable_tokens_delta.{adapter_name}"] = rows
    return TunerParams(tensors, config, adapter_name)


def routes(model: nn.Module, params: TunerParams, ctx: Any) -> Routes:
    """A slot at each targeted module, and at every module tied to its weight, running it with the new rows."""
    fwd: dict[nn.Module, list[Any]] = {}
    idx = tuple(params.config.token_indices)
    for site in _layout(model, params).sites:
        slot = functools.partial(rows_slot, site.module, idx, params[site.keys["trainable_tokens_delta"]])
        for tied in tied_modules(model, site.module):
            fwd.setdefault(tied, []).insert(0, slot)
    ensure_slots(list(fwd))
    return Routes(forward=fwd)


def _weight_keys(model_or_weights: Any, params: TunerParams) -> list[tuple[str, str]]:
    """``(weight key, params key)`` per adapted module (checked against the model when one is given)."""
    if isinstance(model_or_weights, nn.Module):  # every module tied to an adapted weight gets the rows too
        names = {id(m): n for n, m in model_or_weights.named_modules(remove_duplicate=False)}
        return [
            (f"{names[id(m)]}.weight" if names[id(m)] else "weight", s.keys["trainable_tokens_delta"])
            for s in _layout(model_or_weights, params).sites
            for m in tied_modules(model_or_weights, s.module)
        ]
    suffix = f".trainable_tokens_delta.{params.adapter_name}"
    out = []
    for key in params:
        if not key.endswith(suffix):
            raise ParamsMismatchError(f"params key {key!r} is not a trainable-tokens tensor of this adapter")
        out.append((key[: -len(suffix)] + ".weight", key))
    return out


def merge(
    model_or_weights: nn.Module | Mapping[str, torch.Tensor],
    params: TunerParams,
    base: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """New weights with the rows written (tied names too), as PEFT's ``merge``; nothing is written.

    ``model_or_weights``: the model, or its ``{name: tensor}`` weights (tied names share one tensor object).
    """
    if isinstance(model_or_weights, nn.Module):
        state = ly.base_state(model_or_weights, base)
    else:
        state = base if base is not None else model_or_weights
    out: dict[str, torch.Tensor] = {}
    idx = tuple(params.config.token_indices)
    for wkey, key in _weight_keys(model_or_weights, params):
        if wkey not in state:
            raise ParamsMismatchError(f"merge: the base has no weight {wkey!r} for params key {key!r}")
        ly.set_with_aliases(out, state, wkey, with_rows(state[wkey], idx, params[key]))
    return out


def unmerge(
    model_or_weights: nn.Module | Mapping[str, torch.Tensor],
    params: TunerParams,
    merged: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``merged`` with the model's own rows put back (:func:`merge` never writes the model).

    Rows cannot be recovered from merged weights alone: a weights mapping raises :class:`ConfigError`.
    """
    if not isinstance(model_or_weights, nn.Module) or merged is None:
        raise ConfigError(
            "unmerge of trainable tokens needs the model (its own rows are put back) and the merged weights:"
            " functuner.unmerge(model, params, merged); merged weights alone do not hold the original rows"
        )
    out = dict(merged)
    idx = list(params.config.token_indices)
    for wkey, _key in _weight_keys(model_or_weights, params):
        original = model_or_weights.get_parameter(wkey).detach()[idx]  # tied modules: the same rows
        ly.set_with_aliases(out, merged, wkey, with_rows(merged[wkey], idx, original))
    return out


def plan_shard_merge(
    tensors: Mapping[str, torch.Tensor],
    config: Any,
    adapter_name: str,
    shapes: Mapping[str, tuple[int, ...]],
    fan_in_fan_out: bool,
    source: str,
) -> ShardMergePlan:
    """The streaming merge: each targeted weight of the checkpoint gets its rows replaced."""
    idx = tuple(config.token_indices)
    merges: dict[str, Any] = {}
    suffix = f".trainable_tokens_delta.{adapter_name}"
    for key, rows in tensors.items():
        if not key.endswith(suffix):
            raise CheckpointError(f"{source}: {key!r} is not a trainable-tokens tensor of adapter {adapter_name!r}")
        wkey = key[: -len(suffix)] + ".weight"
        if wkey not in shapes:
            raise CheckpointError(f"{source}: the base checkpoint has no weight {wkey!r} for {key!r}")
        merges[wkey] = _rows_fn(rows, idx)
    return ShardMergePlan(merges=merges, replacements={})


def _rows_fn(rows: torch.Tensor, indices: tuple[int, ...]) -> Any:
    def fn(w: torch.Tensor) -> torch.Tensor:
        return with_rows(w.float(), indices, rows)

    return fn


def _check_model(model: nn.Module, config: Any, source: str) -> None:
    try:
        targets(model, config)
    except TargetError as e:
        raise TargetError(f"{source}: {e}") from None
    except (ConfigError, UnsupportedModuleError) as e:
        raise CheckpointError(f"{source}: {e}") from None


# PEFT's checkpoint layout: ``base_model.model.<module>.trainable_tokens_delta``
PEFT_FORMAT = ly.peft_format("TRAINABLE_TOKENS", NAMES, "TrainableTokens")


tuner = Tuner(
    swift_type="TRAINABLE_TOKENS",
    config_cls=TrainableTokensConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    merges_weights=True,
    plan_shard_merge=plan_shard_merge,
    key_naming=KeyNaming(after=NAMES),
    peft=PEFT_FORMAT,
    check_model=_check_model,
    check_state=ly.state_check(NAMES, "TrainableTokens"),
    sub_batch=module_local,
)
