"""LoRA merge / unmerge: new base weights with an adapter folded in (or taken out), computed in fp32.

Pure weight arithmetic: a state mapping in, a new dict out; nothing is written.
The first argument is the model or just its weights (a ``{name: tensor}``
mapping such as a ``state_dict``): merging needs no module, only the layout of
the params on the weights (:mod:`.weight_layout`), which a model merge also
goes through, so both agree bitwise.  :func:`merged_weight` is the per-weight
formula the streaming shard merge (:mod:`functuner.io.merge_shards`) uses too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ...core.params import TunerParams
from ...errors import ConfigError, ParamsMismatchError
from ...quant.weights import densify
from .inits.guard import check_state as check_residual_base
from .math import dora_norm, lora_delta, plus_delta, weight_as_out_in
from .tokens import with_rows
from .variants import merge_inputs
from .weight_layout import WeightLayout, weight_layout, weight_layout_of_model

__all__ = ["ModelOrWeights", "merge", "merged_weight", "unmerge"]

ModelOrWeights = nn.Module | Mapping[str, torch.Tensor]


def _state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    return state


def _layout_and_state(
    model_or_weights: ModelOrWeights, params: TunerParams, base: Mapping[str, torch.Tensor] | None, what: str
) -> tuple[WeightLayout, Mapping[str, torch.Tensor]]:
    """The weight layout of ``params`` and the state it applies to (``base``, else the model's or the mapping)."""
    if isinstance(model_or_weights, nn.Module):
        state = _state_of(model_or_weights) if base is None else base
        layout = weight_layout_of_model(model_or_weights, params)
        # quantized layers (functuner.quant): merge arithmetic runs on their dequantized fp32 weights
        return layout, densify(model_or_weights, state, [s.name for s in layout.sites if s.weight_name == "weight"])
    if not isinstance(model_or_weights, Mapping):
        raise ConfigError(
            f"{what}: expected an nn.Module or a {{name: tensor}} weights mapping, got {type(model_or_weights).__name__}"
        )
    state = model_or_weights if base is None else base
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return weight_layout(params, params.config, params.adapter_name, shapes, source=what), state


def _set_with_aliases(
    out: dict[str, torch.Tensor], base: Mapping[str, torch.Tensor], key: str, value: torch.Tensor
) -> None:
    """Write ``value`` at ``key`` and at every other key that shares the base tensor (tied weights)."""
    old = base[key]
    out[key] = value
    for k, t in base.items():
        if t is old and k != key:
            out[k] = value


def merged_weight(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    kind: str,
    magnitude: torch.Tensor | None = None,
    unmerged_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W + s B A`` in ``W``'s layout, float32 (the caller rounds once to the dtype it wants). Pure.

    DoRA (``magnitude`` given): ``m / ||W0 + s B A||_row * (W + s B A)`` with
    ``W0 = unmerged_weight`` (default ``W``): the weight before any adapter was
    merged, as in the adapter forward and in PEFT.
    """
    if magnitude is None:
        return plus_delta(W, A, B, scaling, kind)
    delta = lora_delta(A, B, scaling, kind)
    w_oi = weight_as_out_in(W.float(), kind)
    d_oi = weight_as_out_in(delta, kind)
    W0 = W if unmerged_weight is None else unmerged_weight
    norm = dora_norm(weight_as_out_in(W0.float(), kind), d_oi, kind)
    factor = magnitude.float() / norm
    if kind == "conv":
        new_oi = factor.transpose(0, 1) * (w_oi + d_oi)
    else:
        new_oi = factor.view(-1, 1) * (w_oi + d_oi)
    return weight_as_out_in(new_oi, kind)  # transposing back is its own inverse


def _lora_bias_base(state: Mapping[str, torch.Tensor], bkey: str, name: str, what: str) -> torch.Tensor:
    """The base bias ``lora_B``'s bias folds into (``lora_bias=True``); :class:`ConfigError` if there is none."""
    if bkey not in state:
        raise ConfigError(
            f"{what}: LoRA on {name!r} has lora_bias=True but the base layer has no bias {bkey!r} to merge it into"
            " (PEFT refuses this merge too); keep the adapter unmerged (functuner.apply)"
        )
    return state[bkey]


def _shift_bias(bias: torch.Tensor, lora_b_bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """``bias + scaling * lora_b_bias`` in fp32, rounded once to ``bias``'s dtype."""
    return (bias.float() + lora_b_bias.float() * scaling).to(bias.dtype)


def _merge_impl(
    layout: WeightLayout,
    params: TunerParams,
    state: Mapping[str, torch.Tensor],
    unmerged: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    norm_state = state if unmerged is None else unmerged
    out = dict(state)
    for site in layout.sites:
        wkey = f"{site.name}.{site.weight_name}"
        if wkey not in state:
            raise ParamsMismatchError(f"merge: base state has no {wkey!r}")
        W = dtype_of = state[wkey]
        M = params[site.m] if site.m is not None else None
        W, A, B = merge_inputs(site.variant, W, norm_state[wkey], params[site.a], params[site.b], params)
        new = merged_weight(W, A, B, site.scaling, site.kind, M, norm_state[wkey])
        _set_with_aliases(out, state, wkey, new.to(dtype_of.dtype))
        bkey = f"{site.name}.bias"
        if site.bias is not None:
            new_bias = params[site.bias]
            if unmerged is not None and bkey in unmerged and state[bkey] is not unmerged[bkey]:
                # an earlier adapter already replaced this bias: add ours as a delta from the unmerged bias,
                # as the forward does when several adapters carry the bias of one adapted module
                new_bias = state[bkey] + (new_bias - unmerged[bkey])
            _set_with_aliases(out, state, bkey, new_bias)
        if site.lora_bias is not None:
            base_bias = _lora_bias_base(state, bkey, site.name, "merge")
            current = out[bkey] if site.bias is not None else base_bias
            _set_with_aliases(out, state, bkey, _shift_bias(current, params[site.lora_bias], site.scaling))
    for full, key in layout.replacements:
        if full not in state:
            raise ParamsMismatchError(f"merge: base state has no {full!r} (for params key {key!r})")
        _set_with_aliases(out, state, full, params[key])
    for wkey, key, idx in layout.token_rows:  # trainable tokens: their rows replace the weight's (tied too)
        _set_with_aliases(out, state, wkey, with_rows(out[wkey], idx, params[key]))
    return out


def merge(
    model_or_weights: ModelOrWeights,
    params: TunerParams,
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    unmerged: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """New base weights with the adapter folded in: ``W + s B A`` computed in fp32, rounded once.

    ``model_or_weights`` is the model, or its weights as a ``{name: tensor}``
    mapping (then the layer kinds come from the params and the weight shapes;
    see :mod:`.weight_layout`).  ``base`` defaults to the model's own parameters
    and buffers (tied weights under every name), or to the mapping itself.  Returns a new dict: merged entries are new tensors,
    every other entry is the same tensor object as in ``base`` (no copies).
    Trainable biases and ``modules_to_save`` copies replace their originals.
    When several adapters are merged in turn (``unmerged`` given), the bias of
    an adapted module that more than one of them carries is summed as deltas
    from the unmerged bias, as the adapter forward does; other biases and
    ``modules_to_save`` copies are replaced (the last adapter wins), as in the
    forward too.

    DoRA: ``m / ||W0 + s B A||_row * (W + s B A)`` where ``W0`` comes from
    ``unmerged`` (default: ``base``), the weights before any adapter was merged.
    When several adapters are merged in turn (``functuner.merge`` with a list),
    ``base`` already holds the earlier ones but the norm must not, exactly as in
    the adapter forward and in PEFT.
    """
    layout, state = _layout_and_state(model_or_weights, params, base, "merge")
    if unmerged is not None and isinstance(model_or_weights, nn.Module):
        unmerged = densify(model_or_weights, unmerged, [s.name for s in layout.sites if s.weight_name == "weight"])
    # PiSSA/OLoRA/CorDA: only into the residual base the adapter was trained on (.inits.guard), checked before merging
    before = state if unmerged is None else unmerged
    keys = [f"{s.name}.{s.weight_name}" for s in layout.sites]
    check_residual_base(params.config, {k: before[k] for k in keys if k in before}, "functuner.merge")
    return _merge_impl(layout, params, state, unmerged)


def unmerge(
    model_or_weights: ModelOrWeights, params: TunerParams, merged: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`merge` for plain LoRA: ``W' - s B A`` in fp32, rounded once.

    Accuracy (measured in ``tests/core/test_properties.py``), elementwise per adapter:
    bf16/fp16 ``|unmerge(merge(W)) - W| <= 0.5 * eps * (|W| + |s B A|)``, half
    an ulp of the merged weight; fp32 up to about ``1.7 * eps * (|W| + |s B A|)``
    (merge and unmerge each use one fused fp32 ``addmm``, whose internal
    roundings differ).  Repeated merge/unmerge cycles do not drift (the weights
    were a fixed point after one cycle in every example).  DoRA raises (the merged weights do not determine the
    original ones); keep the original weights instead, which :func:`merge` never
    overwrites.  Biases / ``modules_to_save`` cannot be restored from the adapter
    and are returned as they are in ``merged``; so are trainable-token rows when ``model_or_weights`` is a
    weights mapping (given the model, whose weights merge never writes, they are restored from it).
    ``model_or_weights`` as in
    :func:`merge`; ``merged`` defaults to the weights mapping itself.
    """
    if merged is None and isinstance(model_or_weights, nn.Module):
        raise ConfigError("unmerge(model, params, merged): pass the merged weights")
    layout, merged = _layout_and_state(model_or_weights, params, merged, "unmerge")
    out = dict(merged)
    for site in layout.sites:
        if site.m is not None:
            raise ConfigError(
                f"unmerge: DoRA ({site.name!r}) is not invertible from merged weights alone; keep the original"
                " weights (functuner.merge never overwrites them)"
            )
        if site.variant is not None and site.variant.name == "kasa":
            raise ConfigError(
                f"unmerge: KaSA ({site.name!r}) is not invertible from merged weights alone (its merge drops singular"
                " components of the base weight); keep the original weights (functuner.merge never overwrites them)"
            )
        wkey = f"{site.name}.{site.weight_name}"
        W = merged[wkey]
        _, A, B = merge_inputs(site.variant, W, W, params[site.a], params[site.b], params)
        new = plus_delta(W, A, B, -site.scaling, site.kind).to(W.dtype)
        _set_with_aliases(out, merged, wkey, new)
        if site.lora_bias is not None:
            bkey = f"{site.name}.bias"
            base_bias = _lora_bias_base(merged, bkey, site.name, "unmerge")
            _set_with_aliases(out, merged, bkey, _shift_bias(base_bias, params[site.lora_bias], -site.scaling))
    if isinstance(model_or_weights, nn.Module):  # trainable tokens: the model still holds the original rows
        for wkey, _key, idx in layout.token_rows:
            original = model_or_weights.get_parameter(wkey).detach()
            _set_with_aliases(out, merged, wkey, with_rows(out[wkey], idx, original[list(idx)]))
    return out
