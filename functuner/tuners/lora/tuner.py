"""LoRA (and its DoRA / rsLoRA variants) as a config plus pure functions: ``init``, ``validate``, ``tuner``.

This module holds ``init`` and ``validate`` and assembles ``tuner = Tuner(...)``
from the other modules of the package: the config (:mod:`.config`), tensor
names (:mod:`.keys`), math (:mod:`.math`), layout (:mod:`.layout`), forward
(:mod:`.forward`) and merge (:mod:`.merge`).

Math, per adapted module with base weight ``W`` and scaling
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA):

* ``nn.Linear`` / GPT-2 ``Conv1D``:  ``y = base(x) + s * B(A(dropout(x)))`` with
  ``A: (r, in)``, ``B: (out, r)``.  The product ``B @ A`` is never formed in
  the forward, so training never pays for a full-size weight gradient.
* ``nn.Embedding``: ``y = base(x) + s * embedding(x, A.T) @ B.T`` with
  ``A: (r, num_embeddings)``, ``B: (embedding_dim, r)``.
* ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: ``A`` is a conv with the base
  kernel, stride and padding (``(r, in, *k)``), ``B`` a 1x1 conv (``(out, r, 1...)``).
  Grouped convolutions (as PEFT): ``B`` is grouped like the base layer
  (``(out, r / groups, 1...)``); they run and train but cannot be merged
  (``B A`` is a dense kernel, the base weight a grouped one; PEFT refuses too).
* DoRA: ``y = m / ||W + s B A||_row * (W x + s B A x) + bias``, the norm detached
  from the graph (DoRA paper, section 4.3), as PEFT does.

Parameter names match PEFT/SWIFT in-memory names relative to the original
model: ``<module>.lora_A.<adapter>.weight``, ``<module>.lora_B.<adapter>.weight``,
``<module>.lora_embedding_A.<adapter>``, ``<module>.lora_embedding_B.<adapter>``,
``<module>.lora_magnitude_vector.<adapter>.weight``, ``<module>.lora_B.<adapter>.bias``
(``lora_bias=True``: ``y = base(x) + s (B A x + b)``, folded into the base bias on merge); trainable biases
(``bias='all'|'lora_only'``) keep the model's own name (``<module>.bias``);
``modules_to_save`` copies live at ``<module>.modules_to_save.<adapter>.<param>``.

Every function here is pure: it reads the model and the params and returns new
tensors; nothing is written to either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn

from ...core.params import TunerParams
from ...core.targets import match_name, own_named_modules, own_named_parameters, select_modules
from ...errors import ConfigError
from ..base import Tuner, module_local, resolve_dtype
from ..spec import DataInit
from . import merged_linear, peft_format
from .combine import add_weighted_adapter
from .config import LoRAConfig, LoraConfig
from .forward import needs_generator, routes
from .inits import from_data
from .inits.factors import init_factors, moves_base, residual_weight
from .inits.guard import check_model_base
from .inits.guard import checked_residual_weights as residual_weights
from .inits.guard import record as record_fingerprints
from .keys import lora_b_bias_name, param_names
from .layout import base_weight, check_site, expected_shapes, layer_kind, layout_of, param_targets, shapes_for_weight
from .math import dora_conv_delta, dora_norm, lora_delta, weight_as_out_in
from .merge import merge, unmerge
from .mixed import PER_SAMPLE
from .plus import optimizer_groups
from .streaming import plan_shard_merge
from .tokens import resolve_token_modules, token_key
from .variants import init_variant, site_variant

__all__ = [
    "LoRAConfig",
    "LoraConfig",
    "init",
    "lora_delta",
    "merge",
    "needs_generator",
    "routes",
    "tuner",
    "unmerge",
    "validate",
]


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` if ``params`` does not fit ``model``. Pure.

    PiSSA/OLoRA/CorDA params with base fingerprints also need ``model`` to hold their residual base
    (:class:`ConfigError` otherwise, :mod:`.inits.guard`).
    """
    layout_of(model, params)
    check_model_base(model, params, "functuner.validate")


def _lora_b_bias(
    name: str, kind: str, out_features: int, r: int, config: LoRAConfig, generator: torch.Generator
) -> torch.Tensor:
    """``lora_B``'s bias (``lora_bias=True``): zero, or ``nn.Linear``'s default draw when ``init_lora_weights=False``."""
    if kind == "embedding":
        raise ConfigError(f"LoRA on {name!r}: lora_bias=True is not supported on embeddings (as in PEFT)")
    bias = torch.zeros(out_features, dtype=torch.float32)
    if config.init_lora_weights is False:
        bound = 1.0 / math.sqrt(r)
        bias.uniform_(-bound, bound, generator=generator)
    return bias


def _init_param_site(
    module: nn.Module,
    name: str,
    pname: str,
    kind: str,
    config: LoRAConfig,
    generator: torch.Generator,
    adapter_name: str,
    lora_dtype: torch.dtype | None,
    tensors: dict[str, torch.Tensor],
) -> None:
    """``A``, ``B`` for a raw parameter (``target_parameters``), drawn as PEFT's ``ParamWrapper`` draws them."""
    weight = module.get_parameter(pname)
    r = config.rank_for(name)
    a_shape, b_shape, _ = shapes_for_weight(tuple(weight.shape), kind, r)
    A, B = torch.empty(a_shape, dtype=torch.float32), torch.empty(b_shape, dtype=torch.float32)
    if config.init_lora_weights == "gaussian":
        torch.nn.init.normal_(A, std=1.0 / r, generator=generator)
    else:
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    if config.init_lora_weights is False:
        torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=generator)
    else:
        torch.nn.init.zeros_(B)
    a_key, b_key, _ = param_names(name, kind, adapter_name)
    dtype = lora_dtype or weight.dtype
    tensors[a_key] = A.to(device=weight.device, dtype=dtype)
    tensors[b_key] = B.to(device=weight.device, dtype=dtype)


def init(
    model: nn.Module,
    config: LoRAConfig,
    generator: torch.Generator,
    adapter_name: str = "default",
    *,
    data: Mapping[str, torch.Tensor] | None = None,
) -> TunerParams:
    """Fresh LoRA params for ``model`` (pure: the model is read, never written).

    A is drawn like PEFT (``kaiming_uniform_(a=sqrt(5))`` for ``True``, normal with
    std ``1/r`` for ``'gaussian'``), B is zero, so the adapted model starts equal
    to the base model; ``init_lora_weights=False`` draws both randomly (for
    tests).  Embeddings: A zero, B normal.  DoRA magnitudes are the row norms of
    the base weights.  Tensors are created on the base weight's device with
    ``lora_dtype`` (default: the base weight's dtype).  Random draws use only
    ``generator`` (on CPU, so results do not depend on the device).
    """
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"lora.init needs a LoRAConfig, got {type(config).__name__}")
    if config.use_merged_linear:  # the LoRA tuner's hooks send these to .merged_linear; other callers (LongLoRA) cannot
        raise ConfigError("use_merged_linear=True (MergedLinear LoRA) is supported by LoRAConfig adapters only")
    ptargets = param_targets(model, config)
    selected = (
        select_modules(
            model,
            config.target_modules,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
        )
        if config.target_modules is not None or not ptargets
        else []
    )
    if config.modules_to_save:
        selected = [(n, m) for n, m in selected if not match_name(n, config.modules_to_save)]
    lora_dtype = resolve_dtype(config.lora_dtype, "lora_dtype")
    tensors: dict[str, torch.Tensor] = {}
    for name, _module in selected:
        if name in ptargets:
            raise ConfigError(
                f"LoRA on {name!r}: the module is selected by target_modules and its parameter"
                f" {ptargets[name][0]!r} by target_parameters; functuner adapts a module one way (PEFT nests"
                " wrappers there): drop it from one of the two"
            )
    for name, (pname, kind) in ptargets.items():
        _init_param_site(
            model.get_submodule(name), name, pname, kind, config, generator, adapter_name, lora_dtype, tensors
        )
    for name, module in selected:
        kind = layer_kind(module, name)
        r = config.rank_for(name)
        check_site(module, name, kind, r, bool(config.use_dora))
        if kind == "mha":  # as PEFT: LoRA on in_proj_weight and on out_proj (both read by the attention's forward)
            if config.lora_bias:
                raise ConfigError(f"LoRA on {name!r}: lora_bias=True is not supported on nn.MultiheadAttention")
            for sub, pname in ((module, "in_proj_weight"), (module.get_submodule("out_proj"), "weight")):
                sub_name = name if sub is module else f"{name}.out_proj" if name else "out_proj"
                _init_param_site(sub, sub_name, pname, "param", config, generator, adapter_name, lora_dtype, tensors)
            continue
        # r larger than the module's fan-in/out is wasteful but valid (PEFT accepts it too)
        base_w = base_weight(module)
        dtype = lora_dtype or base_w.dtype
        a_shape, b_shape, m_shape = expected_shapes(module, kind, r)
        A = torch.empty(a_shape, dtype=torch.float32)
        B = torch.empty(b_shape, dtype=torch.float32)
        special = (  # PiSSA, OLoRA, EVA... (.inits); MiCA is a variant (.variants.init_variant)
            init_factors(config, name, kind, base_w, r, generator, data) if config.init_lora_weights != "mica" else None
        )
        if special is not None:
            A, B = special
        elif kind == "embedding":
            if config.init_lora_weights is False:
                torch.nn.init.normal_(A, generator=generator)
            else:
                torch.nn.init.zeros_(A)
            torch.nn.init.normal_(B, generator=generator)
        else:
            if config.init_lora_weights == "gaussian":
                torch.nn.init.normal_(A, std=1.0 / r, generator=generator)
            else:
                torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            if config.init_lora_weights is False:
                torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=generator)
            else:
                torch.nn.init.zeros_(B)
        a_key, b_key, m_key = param_names(name, kind, adapter_name)
        A, B = A.to(device=base_w.device, dtype=dtype), B.to(device=base_w.device, dtype=dtype)
        tensors[a_key], tensors[b_key] = A, B
        variant = site_variant(config, name, kind, adapter_name)
        if variant is not None:  # KaSA / MiCA / VeLoRA / BD-LoRA
            init_variant(variant, name, kind, base_w, r, generator, tensors, a_key, b_key)
        if config.lora_bias:
            tensors[lora_b_bias_name(name, adapter_name)] = _lora_b_bias(
                name, kind, b_shape[0], r, config, generator
            ).to(device=base_w.device, dtype=dtype)
        if config.use_dora:
            with torch.no_grad():
                s = config.scaling_for(name)
                delta = (
                    dora_conv_delta(A, B, s, tuple(base_w.shape))
                    if kind == "conv"
                    else weight_as_out_in(lora_delta(A, B, s, kind), kind)
                )
                # PiSSA/OLoRA/CorDA: the adapter runs on the residual base W - s B A, and so does its norm
                norm_w = (
                    residual_weight(base_w, A, B, s, kind, config)
                    if special is not None and moves_base(config)
                    else base_w
                )
                norm = dora_norm(weight_as_out_in(norm_w, kind), delta, kind)
            tensors[m_key] = norm.reshape(m_shape).to(device=base_w.device, dtype=dtype)
        if config.bias in ("all", "lora_only") and getattr(module, "bias", None) is not None:
            tensors[f"{name}.bias"] = cast(torch.Tensor, module.bias).detach().clone()
    if config.bias == "all":
        adapted = {n for n, _ in selected}
        for mname, module in own_named_modules(model):
            b = module._parameters.get("bias")
            if (
                b is not None
                and mname not in adapted
                and not (config.modules_to_save and match_name(mname, config.modules_to_save))
            ):
                tensors[f"{mname}.bias" if mname else "bias"] = b.detach().clone()
    if config.modules_to_save:
        found = False
        for mname, module in own_named_modules(model):
            if mname and match_name(mname, config.modules_to_save):
                found = True
                for pname, p in own_named_parameters(module):
                    tensors[f"{mname}.modules_to_save.{adapter_name}.{pname}"] = p.detach().clone()
        if not found:
            raise ConfigError(f"modules_to_save={list(config.modules_to_save)!r} matched no module of the model")
    _init_tokens(model, config, adapter_name, {n for n, _ in selected} | set(ptargets), tensors)
    # PiSSA/OLoRA/CorDA: fingerprint the original and residual base weights, which merges check (.inits.guard)
    return record_fingerprints(model, TunerParams(tensors, config, adapter_name))


def _init_tokens(
    model: nn.Module, config: LoRAConfig, adapter_name: str, adapted: set[str], tensors: dict[str, torch.Tensor]
) -> None:
    """Trainable tokens (``trainable_token_indices``): each named embedding's chosen rows, copied (as PEFT)."""
    for tname, idx in resolve_token_modules(model, config.trainable_token_indices).items():
        if tname in adapted or (config.modules_to_save and match_name(tname, config.modules_to_save)):
            raise ConfigError(
                f"trainable_token_indices: {tname!r} is also adapted by LoRA or listed in modules_to_save; train"
                " it one way (PEFT refuses the same)"
            )
        weight = cast(torch.Tensor, model.get_submodule(tname).weight)
        tensors[token_key(tname, adapter_name)] = weight.detach()[list(idx)].clone()


def _init_from_inputs(
    model: nn.Module,
    config: LoRAConfig,
    generator: torch.Generator,
    adapter_name: str,
    inputs: Mapping[str, Sequence[torch.Tensor]],
) -> tuple[TunerParams, dict[str, torch.Tensor]]:
    """EVA / CorDA from each targeted module's recorded inputs (``Tuner.data_init``): params and base weights."""
    cfg, data = from_data.prepare(model, config, inputs)
    params = init(model, cfg, generator, adapter_name, data=data)
    return params, residual_weights(model, params)


_ml = merged_linear  # SWIFT's MergedLinear (use_merged_linear=True): its own functions, picked by the config
tuner = Tuner(
    swift_type="LORA",
    config_cls=LoRAConfig,
    init=_ml.by_config(init, _ml.init),
    routes=_ml.by_config(routes, _ml.routes),
    validate=_ml.by_config(validate, _ml.validate),
    merge=_ml.by_config(merge, _ml.merge),
    unmerge=_ml.by_config(unmerge, _ml.unmerge),
    plan_shard_merge=_ml.by_config(plan_shard_merge, _ml.plan_shard_merge),
    merges_weights=True,
    needs_generator=_ml.by_config(needs_generator, _ml.needs_generator),
    to_swift_keys=peft_format.to_swift_keys,
    from_swift_keys=peft_format.from_swift_keys,
    key_naming=peft_format.KEY_NAMING,
    peft=peft_format.PEFT_FORMAT._replace(config_to_json=_ml.refuse_peft(peft_format.PEFT_FORMAT.config_to_json)),
    check_model=_ml.by_config(peft_format.check_model, _ml.check_model),
    check_state=_ml.by_config(peft_format.check_state, _ml.check_state, where=0),
    per_sample=PER_SAMPLE._replace(unsupported=_ml.refuse_per_sample(PER_SAMPLE.unsupported)),
    sub_batch=module_local,
    optimizer_groups=optimizer_groups,
    combine=_ml.refuse_combine(add_weighted_adapter),
    init_base_weights=_ml.by_config(residual_weights, lambda model, params: {}),
    data_init=DataInit(from_data.needs, from_data.targets, _init_from_inputs),
)
