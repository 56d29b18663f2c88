"""The public face of LoRA's data-driven inits: :func:`lora_init`, :func:`residual_weights`, :func:`to_plain_lora`.

``functuner.init(model, LoRAConfig(init_lora_weights=...))`` returns the params
of every init that needs no data (PiSSA, PiSSA by fast SVD, OLoRA, orthogonal)
and never touches the model.  PiSSA, OLoRA and CorDA split the base weight in
two: the adapter takes ``s B A``, the base keeps the *residual* ``W - s B A``,
and the adapter is only meaningful on that residual base.  PEFT overwrites the
base weights in place; functuner returns them as a new mapping instead:

* :func:`lora_init` returns a :class:`LoraInit` ``(params, base_weights)``:
  ``base_weights`` maps each changed state key (``"lin0.weight"``) to its new
  tensor (empty for inits that leave the base alone).  Run the adapter on them
  with ``torch.func.functional_call(model, {**model.state_dict(), **base_weights}, ...)``
  inside ``functuner.apply``, or copy them into a model you own.  It also takes
  the data EVA (``activations``) and CorDA (``covariances``) need.
* :func:`residual_weights` recomputes ``base_weights`` from a model and freshly
  initialised params (what the shim writes into the model, as PEFT does).
* :func:`to_plain_lora` turns a trained PiSSA/OLoRA/CorDA adapter back into a
  plain LoRA delta against the *original* base weights (PEFT's
  ``save_pretrained(path_initial_model_for_weight_conversion=...)``): rank
  ``2 r``, ``A' = [A; A0]``, ``B' = [B, -B0]``, so ``s' B' A' = s (B A - B0 A0)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ....core.params import TunerParams
from ....errors import ConfigError, ParamsMismatchError
from ....quant.weights import dense_weight
from ..config import LoRAConfig
from ..keys import parse_key
from ..layout import layout_of
from ..tuner import init as lora_tensors
from .from_data import eva
from .guard import checked_residual_weights as residual_weights
from .guard import mark_residual_base
from .loftq import low_rank

__all__ = [
    "LoraInit",
    "lora_init",
    "lora_replace_weights_loftq",
    "lora_mark_residual_base",
    "lora_residual_weights",
    "lora_to_plain",
    "residual_weights",
    "to_plain_lora",
]


class LoraInit(NamedTuple):
    """What :func:`lora_init` returns: the params, and the base weights the adapter runs on (new tensors)."""

    params: TunerParams
    base_weights: dict[str, torch.Tensor]


def _generator(generator: int | torch.Generator) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"lora_init needs generator=<int seed> or a torch.Generator, got {generator!r}")


def lora_init(
    model: nn.Module,
    config: LoRAConfig,
    *,
    generator: int | torch.Generator,
    data: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> LoraInit:
    """LoRA params for ``config`` on ``model`` plus the residual base weights its init needs. Pure.

    ``data`` (module name -> tensor) is what a data-driven init reads:
    ``init_lora_weights="eva"``: each targeted module's input activations
    ``(..., in)``; ``"corda"``: each targeted module's input covariance
    ``(in, in)`` (see :func:`functuner.tuners.lora.inits.data.corda_covariance`).
    Other inits take no data.  For EVA the returned params carry a new config
    whose ``rank_pattern`` / ``alpha_pattern`` / ``target_modules`` record the
    redistributed ranks (as PEFT rewrites its config).  Raises
    :class:`ConfigError` naming the module whose data is missing or malformed.
    """
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"lora_init needs a LoRAConfig, got {type(config).__name__}")
    gen = _generator(generator)
    init = config.init_lora_weights
    if data is not None and init not in ("eva", "corda"):
        raise ConfigError(f"lora_init: init_lora_weights={init!r} takes no data; pass data only for 'eva' or 'corda'")
    if init == "eva":
        if data is None:
            raise ConfigError("init_lora_weights='eva' needs data={module name: input activations (..., in)}")
        config, rows = eva(model, config, data)
        params = lora_tensors(model, config, gen, adapter_name, data=rows)
    else:
        params = lora_tensors(model, config, gen, adapter_name, data=data)
    return LoraInit(params, residual_weights(model, params))


def to_plain_lora(params: TunerParams, initial: TunerParams) -> TunerParams:
    """A trained PiSSA/OLoRA/CorDA adapter as a plain LoRA delta against the original base (PEFT's conversion). Pure.

    ``initial`` holds the adapter's params right after init (``B0``, ``A0``); the
    result has rank ``2 r`` (``A' = [A; A0]``, ``B' = [B, -B0]``), ``lora_alpha``
    doubled (times ``sqrt 2`` with rsLoRA), patterns doubled, and
    ``init_lora_weights=True``, so ``s' B' A' = s (B A - B0 A0)``: it runs on the
    original base weights and saves like any LoRA adapter (``functuner.save``,
    PEFT's format included).  Raises :class:`ConfigError` for rsLoRA with
    rank/alpha patterns (PEFT refuses it too) and :class:`ParamsMismatchError`
    when the two params are not the same adapter.
    """
    cfg = params.config
    if not isinstance(cfg, LoRAConfig):
        raise ConfigError(f"to_plain_lora needs LoRA params, got {type(cfg).__name__}")
    if cfg.use_rslora and (cfg.rank_pattern or cfg.alpha_pattern):
        raise ConfigError("to_plain_lora: use_rslora with rank_pattern/alpha_pattern cannot be converted (as in PEFT)")
    if cfg.init_lora_weights == "loftq":
        raise ConfigError(
            "to_plain_lora: a LoftQ adapter runs on the quantized base Q, and W - Q is not low-rank; it cannot be"
            " turned into a plain LoRA delta on the original weights (PEFT converts only PiSSA/OLoRA/CorDA either)"
        )
    if cfg.use_dora:
        raise ConfigError("to_plain_lora: a DoRA adapter is not a sum of low-rank deltas; it cannot be converted")
    if set(params) != set(initial):
        raise ParamsMismatchError("to_plain_lora: params and initial params have different tensors")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in params.items():
        lk = parse_key(key)
        if lk is None or lk.bias:
            tensors[key] = value
        elif lk.part in ("lora_A", "lora_embedding_A"):
            tensors[key] = torch.cat([value, initial[key].to(value)], dim=0)
        elif lk.part in ("lora_B", "lora_embedding_B"):
            tensors[key] = torch.cat([value, -initial[key].to(value)], dim=1)
        else:
            raise ConfigError(f"to_plain_lora: cannot convert tensor {key!r}")
    factor: Any = math.sqrt(2) if cfg.use_rslora else 2
    new_cfg = dataclasses.replace(
        cfg,
        r=cfg.r * 2,
        lora_alpha=cfg.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in cfg.alpha_pattern.items()},
        init_lora_weights=True,
        base_fingerprint=None,  # a plain delta on the original weights: nothing to guard
    )
    return TunerParams(tensors, new_cfg, params.adapter_name)


def replace_lora_weights_loftq(
    model: nn.Module,
    params: TunerParams,
    original_weights: Mapping[str, torch.Tensor],
    *,
    callback: Callable[[str, TunerParams], bool] | None = None,
) -> TunerParams:
    """PEFT's ``replace_lora_weights_loftq`` as a pure function: LoftQ factors for LoRA on a quantized base.

    For each LoRA layer of ``params`` on a quantized layer of ``model`` (bitsandbytes 4-bit in PEFT; here any
    layer :mod:`functuner.quant` dequantizes), ``A, B`` become the top-``r`` SVD of ``W - Q``: ``W`` the layer's
    original weight from ``original_weights`` (``{state key: tensor}``, e.g. read with
    ``safetensors.torch.load_file`` from the unquantized checkpoint, which PEFT reads itself), ``Q`` the
    dequantized base.  ``callback(module name, candidate params) -> bool`` keeps a layer's replacement only
    when it returns ``True`` (PEFT's greedy check).  Returns new params; ``model`` and ``params`` are not
    written.  Raises :class:`ConfigError` when no LoRA layer sits on a quantized layer (as PEFT) or an original
    weight is missing or misshaped.
    """
    names = {id(m): n for n, m in model.named_modules()}
    current = params
    found = False
    for site in layout_of(model, params).sites:
        deq = dense_weight(site.module)
        if deq is None or site.kind != "linear":
            continue
        found = True
        name = names[id(site.module)]
        key = f"{name}.weight"
        if key not in original_weights:
            raise ConfigError(f"replace_lora_weights_loftq: original_weights has no {key!r} (the unquantized weight)")
        w = original_weights[key].detach().to(deq.device, torch.float32)
        if tuple(w.shape) != tuple(deq.shape):
            raise ConfigError(
                f"replace_lora_weights_loftq: original {key!r} has shape {tuple(w.shape)}, the quantized layer"
                f" {tuple(deq.shape)}"
            )
        r = int(params[site.a].shape[0])
        B, A = low_rank(w - deq, r)
        old_a, old_b = current[site.a], current[site.b]
        candidate = current.replace({site.a: A.to(old_a), site.b: B.to(old_b)})
        if callback is None or callback(name, candidate):
            current = candidate
    if not found:
        raise ConfigError("replace_lora_weights_loftq: no LoRA layer of these params sits on a quantized linear layer")
    return current


lora_residual_weights = residual_weights  # public names (functuner.lora_residual_weights / functuner.lora_to_plain)
lora_to_plain = to_plain_lora
lora_replace_weights_loftq = replace_lora_weights_loftq
lora_mark_residual_base = mark_residual_base  # the caller's statement "these weights are the residual base" (.guard)
