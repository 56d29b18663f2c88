"""The residual-base guard: a PiSSA/OLoRA/CorDA adapter is only merged into (or loaded onto) the base it belongs to.

PiSSA, OLoRA and CorDA split each adapted weight ``W`` into ``s B0 A0`` (the
adapter) and the residual ``W - s B0 A0`` (the base the adapter trains on).
Folding such an adapter into the *original* ``W`` counts ``s B0 A0`` twice,
and nothing in the numbers shows it.  So when the residual is made
(:func:`record`, called by ``lora.init``) the config records, per adapted
weight, a fingerprint of the original and of the residual weight
(``base_fingerprint``: ``{state key: {"original": [...], "residual": [...]}}``);
every merge (:func:`functuner.merge`, the streaming ``functuner merge``, the
shim) compares the base it is given (:func:`check_weight`):

* residual -> proceed;
* original -> :class:`~functuner.errors.ConfigError` naming the weight and the fix;
* neither, or no fingerprint (an adapter saved by PEFT, which records only
  ``init_lora_weights``) -> :class:`ConfigError` too: the base cannot be
  verified; :func:`mark_residual_base` is the caller's explicit statement
  "these weights are the residual base" (it fingerprints them).

A fingerprint is the Frobenius norm plus ``u_k^T W v_k`` for ``K`` fixed
pseudo-random Gaussian probe pairs (float32, from a fixed seed and the shape):
one pass over the weight, 17 floats on disk.  Each probe of ``W + D`` differs
from ``W``'s by about ``||D||``, so the probes' RMS difference estimates
``||D|| / ||W||``; two weights match below ``TOLERANCE`` (1%).  bf16 rounding
gives about 0.2%; the rank-``r`` part PiSSA moves is ``sqrt`` of its share of
``||W||^2``: 2% even for ``r = 1`` of a random 8192-wide matrix, far more for
trained weights, whose energy sits in the top singular directions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ....core.params import TunerParams
from ....errors import ConfigError
from ..config import LoRAConfig
from ..layout import layout_of
from .factors import moves_base, residual_weight, residual_weights

__all__ = [
    "PROBES",
    "TOLERANCE",
    "check_state",
    "check_unverifiable",
    "check_weight",
    "check_model_base",
    "checked_residual_weights",
    "fingerprint",
    "mark_residual_base",
    "needs_guard",
    "record",
]

PROBES = 16
TOLERANCE = 1e-2  # relative to the reference norm
_SEED = 0x5EED


def _probes(n: int, salt: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_SEED + 7919 * n + salt)
    return torch.randn(n, PROBES, generator=gen).to(device)


def fingerprint(weight: torch.Tensor) -> list[float]:
    """``[||W||, u_1^T W v_1, ..., u_K^T W v_K]`` of a weight in its stored layout (rows = first dim). Pure."""
    with torch.no_grad():
        m = weight.detach().reshape(weight.shape[0], -1).float()
        v = _probes(m.shape[1], 0, m.device)
        u = _probes(m.shape[0], 1, m.device)
        sketch = ((m @ v) * u).sum(0)
        values = [float(m.norm()), *(float(x) for x in sketch.cpu())]
    return [float(f"{x:.9g}") for x in values]


def _distance(fp: list[float], ref: list[float], entry: Mapping[str, list[float]]) -> float:
    """The norms' difference or the probes' RMS difference, whichever is larger, relative to the larger
    recorded norm (a residual can be ~0: PiSSA at full rank).  Each probe of a weight perturbed by ``D`` moves
    by about ``||D||`` (standard deviation), so the RMS over the probes estimates ``||D|| / ||W||`` closely."""
    scale = max([abs(v[0]) for v in entry.values()] + [1e-30])
    diffs = [a - b for a, b in zip(fp, ref, strict=True)]
    rms = math.sqrt(sum(d * d for d in diffs[1:]) / max(len(diffs) - 1, 1))
    return max(abs(diffs[0]), rms) / scale


def needs_guard(config: Any) -> bool:
    """Whether ``config``'s adapter only fits a residual base (PiSSA, fast PiSSA, OLoRA, CorDA)."""
    return isinstance(config, LoRAConfig) and moves_base(config)


def _with_fingerprints(config: LoRAConfig, fps: dict[str, dict[str, list[float]]]) -> LoRAConfig:
    new = dataclasses.replace(config, base_fingerprint=fps)
    # bookkeeping a config read from a file carries (functuner.tuners.config_json): kept for a faithful re-save
    for attr in ("_kept_json_fields", "_absent_json_fields"):
        if attr in config.__dict__:
            value = config.__dict__[attr]
            if attr == "_absent_json_fields":
                value = frozenset(value) - {"base_fingerprint"}
            object.__setattr__(new, attr, value)
    return new


def _site_keys(model: nn.Module, params: TunerParams) -> list[tuple[str, torch.Tensor, Any]]:
    names = {id(m): n for n, m in model.named_modules()}
    out: list[tuple[str, torch.Tensor, Any]] = []
    for s in layout_of(model, params).sites:
        mname = names[id(s.module)]
        out.append((f"{mname}.{s.weight_name}" if mname else s.weight_name, s.module.get_parameter(s.weight_name), s))
    return out


def record(model: nn.Module, params: TunerParams) -> TunerParams:
    """``params`` (fresh from init on ``model``'s original weights) with the fingerprints in its config. Pure.

    A config that already has fingerprints (read from a checkpoint) is kept: the
    checkpoint knows which base it was trained on; init must not guess again.
    """
    cfg = params.config
    if not needs_guard(cfg) or cfg.base_fingerprint is not None:
        return params
    fps: dict[str, dict[str, list[float]]] = {}
    for key, weight, s in _site_keys(model, params):
        res = residual_weight(weight, params[s.a], params[s.b], s.scaling, s.kind, cfg)
        fps[key] = {"original": fingerprint(weight), "residual": fingerprint(res)}
    return params.replace(config=_with_fingerprints(cfg, fps))


def mark_residual_base(params: TunerParams, base: nn.Module | Mapping[str, torch.Tensor]) -> TunerParams:
    """``params`` declared to belong on ``base`` (a model or ``{state key: tensor}``): its residual fingerprints. Pure.

    The explicit statement for an adapter whose base cannot be verified (saved by
    PEFT with ``init_lora_weights="pissa"``...; or after ``base_fingerprint``
    was lost): ``base`` must hold the residual weights the adapter was trained on.
    Raises :class:`ConfigError` for a non-PiSSA/OLoRA/CorDA adapter or a missing weight.
    """
    cfg = params.config
    if not needs_guard(cfg):
        raise ConfigError(
            "mark_residual_base: only PiSSA/OLoRA/CorDA adapters (init_lora_weights='pissa'/'pissa_niter_N'/'olora'/"
            f"'corda') run on a residual base; got init_lora_weights={getattr(cfg, 'init_lora_weights', None)!r}"
        )
    state: Mapping[str, torch.Tensor]
    if isinstance(base, nn.Module):
        state = {**dict(base.named_parameters(remove_duplicate=False)), **dict(base.named_buffers())}
    else:
        state = base
    fps: dict[str, dict[str, list[float]]] = {}
    for key in _weight_keys(params):
        if key not in state:
            raise ConfigError(f"mark_residual_base: the base has no weight {key!r} that the adapter adapts")
        fps[key] = {"residual": fingerprint(state[key])}
    stripped = dataclasses.replace(cfg, base_fingerprint=None)
    return params.replace(config=_with_fingerprints(stripped, fps))


def _weight_keys(params: TunerParams) -> list[str]:
    from ..keys import parse_key

    keys = []
    for k in params:
        lk = parse_key(k)
        if lk is not None and lk.part in ("lora_A", "lora_embedding_A") and not lk.bias:
            keys.append(f"{lk.module}.weight" if lk.module else "weight")
    return keys


def _fix() -> str:
    return (
        "use the residual base instead ({**state, **functuner.lora_residual_weights(original_model, initial_params)},"
        " or the model the adapter was trained in), or convert the adapter to a plain LoRA delta"
        " on the original weights first (functuner.lora_to_plain(trained, initial_params))"
    )


def check_unverifiable(config: Any, what: str) -> None:
    """:class:`ConfigError` if ``config`` needs a residual base but records no fingerprint to verify one."""
    if needs_guard(config) and not config.base_fingerprint:
        raise ConfigError(
            f"{what}: this adapter has init_lora_weights={config.init_lora_weights!r}, so it only fits the residual"
            " base W - s B0 A0 it was trained on, and it records no base_fingerprint to verify the base it is given"
            " (an adapter saved by PEFT, or in PEFT's format). If these weights are that residual base, say so:"
            " params = functuner.lora_mark_residual_base(params, residual_weights_or_model) (functuner.save(params,"
            " dir) keeps that in SWIFT's format, for the CLI too); otherwise " + _fix()
        )


def check_weight(config: Any, key: str, weight: torch.Tensor, what: str) -> None:
    """Refuse (:class:`ConfigError`) to merge ``config``'s adapter into ``weight`` (state key ``key``) unless it
    is the residual base the adapter was trained on.  No-op for adapters that leave the base alone."""
    if not needs_guard(config):
        return
    check_unverifiable(config, what)
    entry = config.base_fingerprint.get(key)
    if entry is None:
        raise ConfigError(
            f"{what}: the adapter's base_fingerprint has no entry for {key!r}; the base cannot be verified. If it"
            " is the residual base, mark it: functuner.lora_mark_residual_base(params, residual_weights_or_model)"
        )
    fp = fingerprint(weight)
    if "residual" in entry and _distance(fp, entry["residual"], entry) <= TOLERANCE:
        return
    if "original" in entry and _distance(fp, entry["original"], entry) <= TOLERANCE:
        raise ConfigError(
            f"{what}: {key!r} holds the ORIGINAL base weight, but this {config.init_lora_weights!r} adapter was"
            " trained on the residual W - s B0 A0; merging it into (or running it on) this weight counts s B0 A0 twice; "
            + _fix()
        )
    raise ConfigError(
        f"{what}: {key!r} matches neither the original nor the residual base weight this"
        f" {config.init_lora_weights!r} adapter was initialised from (relative distance"
        f" {_distance(fp, entry.get('residual', entry.get('original', fp)), entry):.3g} > {TOLERANCE}). Use the base it was"
        " trained on; if these weights are that residual base, mark them:"
        " functuner.lora_mark_residual_base(params, residual_weights_or_model)"
    )


def check_state(config: Any, weights: Mapping[str, torch.Tensor], what: str) -> None:
    """:func:`check_weight` for every ``{state key: weight}`` of ``weights``, all before anything is merged."""
    if not needs_guard(config):
        return
    check_unverifiable(config, what)
    for key, weight in weights.items():
        check_weight(config, key, weight, what)


def checked_residual_weights(model: nn.Module, params: TunerParams) -> dict[str, torch.Tensor]:
    """:func:`.factors.residual_weights` after checking that ``model`` holds the *original* weights. Pure.

    Decomposing weights that already are the residual (a model saved after the
    shim wrote it, then given an adapter of the same config again) would move
    ``s B0 A0`` out twice; :class:`ConfigError` names the weight instead.
    """
    out = residual_weights(model, params)
    fps = params.config.base_fingerprint if needs_guard(params.config) else None
    if not fps:
        return out
    what = f"LoRA init_lora_weights={params.config.init_lora_weights!r}"
    for key, weight, _ in _site_keys(model, params):
        entry = fps.get(key) or {}
        fp = fingerprint(weight)
        if "original" in entry and _distance(fp, entry["original"], entry) <= TOLERANCE:
            continue
        if "residual" in entry and _distance(fp, entry["residual"], entry) <= TOLERANCE:
            raise ConfigError(
                f"{what}: the model's {key!r} already holds the residual base of this adapter; decomposing it again"
                " would take s B0 A0 out twice. Give the original base weights (the residual is made from them), or"
                " run the adapter on this model functionally (functuner.load + functuner.apply)"
            )
        raise ConfigError(
            f"{what}: the model's {key!r} is not the original base weight this adapter was initialised from"
            " (its base_fingerprint does not match); give the base model the adapter was made for"
        )
    return out


def check_model_base(model: nn.Module, params: TunerParams, what: str) -> None:
    """:func:`check_weight` for each weight ``params`` adapts on ``model``, when the config records fingerprints.

    ``functuner.validate`` (and so ``functuner.load(dir, model)``) runs it: a PiSSA/OLoRA/CorDA adapter loaded
    onto, or checked against, a model holding the original weights is refused before it runs there.  An
    adapter without fingerprints (saved by PEFT) passes here, as in PEFT; its merges are refused instead.
    """
    if not needs_guard(params.config) or not params.config.base_fingerprint:
        return
    for key, weight, _ in _site_keys(model, params):
        check_weight(params.config, key, weight, what)
