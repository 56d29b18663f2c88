"""LoRA's ``Tuner.data_init`` hook: which layer inputs EVA and CorDA read, and the init from the recorded inputs.

The shim (:mod:`functuner.shim.data_init`) runs the model on the caller's data
with forward hooks on the modules :func:`targets` names, keeps each call's input
to each module, and hands them to :func:`prepare`, which reduces them to
what :func:`functuner.lora_init` takes (EVA: the rows stacked; CorDA: the
covariance of :func:`.data.corda_covariance`): :func:`prepare`; ``lora.tuner`` then initialises.  Pure: the model
is read, never written; the residual base weights come back as a new mapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ....core.targets import match_name, select_modules
from ....errors import ConfigError
from ..config import LoRAConfig
from . import data as data_inits

__all__ = ["eva", "needs", "prepare", "targets"]


def needs(config: Any) -> str | None:
    """``"activations"`` (EVA), ``"covariances"`` (CorDA), or ``None`` when ``config``'s init reads no data."""
    init = getattr(config, "init_lora_weights", None)
    return "activations" if init == "eva" else "covariances" if init == "corda" else None


def targets(model: nn.Module, config: Any) -> list[str]:
    """The names of the modules whose inputs EVA / CorDA read (LoRA's targets, ``modules_to_save`` left out)."""
    selected = select_modules(
        model,
        config.target_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    return [n for n, _ in selected if not (config.modules_to_save and match_name(n, config.modules_to_save))]


def eva(
    model: nn.Module, config: LoRAConfig, activations: Mapping[str, torch.Tensor]
) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """EVA's new config (ranks redistributed, as PEFT rewrites it) and each kept module's ``A`` rows. Pure."""
    opts = data_inits.options(config.eva_config, data_inits.EVA_DEFAULTS, "eva_config")
    names = targets(model, config)
    missing = [n for n in names if n not in activations]
    if missing:
        raise ConfigError(f"init_lora_weights='eva': no activations for targeted module(s) {missing[:4]}")
    extra = sorted(set(activations) - set(names))
    if extra:
        raise ConfigError(f"init_lora_weights='eva': activations given for modules LoRA does not target: {extra[:4]}")
    rho = float(opts["rho"])
    max_comp = {n: round(config.rank_for(n) * rho) for n in names}
    budget = sum(config.rank_for(n) for n in names)
    comps = {n: data_inits.eva_components(activations[n], max_comp[n], n) for n in names}
    ranks = data_inits.eva_ranks({n: c[2] for n, c in comps.items()}, budget, max_comp)
    rows: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    kept: list[str] = []
    for n in names:
        new_r, r = ranks[n], config.rank_for(n)
        alpha = config.alpha_for(n)
        if new_r == 0:
            continue  # PEFT drops the layer from the adapter
        if new_r != r and opts["adjust_scaling_factors"]:
            alpha *= new_r / r
        u, sv, _ = comps[n]
        u = u[:new_r]
        if opts["whiten"]:
            u = u / sv[:new_r].sqrt().reshape(-1, 1)
        rows[n] = u
        kept.append(n)
        if new_r != config.r:
            rank_pattern[n] = new_r
        if alpha != config.lora_alpha:
            alpha_pattern[n] = alpha
    if not kept:
        raise ConfigError("init_lora_weights='eva': every targeted layer was assigned rank 0")
    new = dataclasses.replace(
        config, target_modules=kept, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, eva_config=opts
    )
    return new, rows


def prepare(
    model: nn.Module, config: Any, inputs: Mapping[str, Sequence[torch.Tensor]]
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(config, data)`` for LoRA's ``init(..., data=data)`` from each targeted module's recorded inputs. Pure.

    EVA: every call's ``(rows, in)`` inputs stacked (flatten and mask them first, as PEFT's
    ``prepare_layer_inputs_fn`` does), then :func:`eva` (new config, ``A`` rows); CorDA: PEFT's covariance
    of the calls' ``(tokens, in)`` inputs (:func:`.data.corda_covariance`), config unchanged.
    """
    kind = needs(config)
    if kind is None:
        raise ConfigError(
            f"init from data: init_lora_weights={getattr(config, 'init_lora_weights', None)!r} reads no data; only"
            " 'eva' and 'corda' do"
        )
    empty = sorted(n for n in targets(model, config) if not inputs.get(n))
    if empty:
        raise ConfigError(
            f"init_lora_weights={config.init_lora_weights!r}: the calibration run never called module(s) {empty[:4]};"
            " run the model on data that reaches every targeted module"
        )
    if kind == "activations":
        acts = {n: torch.cat([c.detach().reshape(-1, c.shape[-1]) for c in calls]) for n, calls in inputs.items()}
        return eva(model, config, acts)
    return config, {n: data_inits.corda_covariance(calls) for n, calls in inputs.items()}
