"""Where LoRA params land in a ``{name: tensor}`` weights mapping: merging without a model.

Merging is weight arithmetic, so :func:`functuner.merge` also takes a weights
mapping (a ``state_dict``, a safetensors file's tensors) instead of a model, and
the streaming shard merge (:mod:`functuner.io.merge_shards`) has only tensor
headers.  This module finds, from the params' keys (:mod:`.keys`), the config
and the base weight shapes, what :mod:`.layout` finds from the modules:

* the layer kind: ``lora_embedding_*`` keys are embeddings, ``A`` with more than
  two dims a conv (1-3 spatial dims; a grouped conv, whose ``A`` reads more
  input channels than its weight has, cannot be merged: :class:`ConfigError`); a 2-D weight is a Linear ``(out, in)`` or a GPT-2 Conv1D
  ``(in, out)``, whichever its shape fits; a square weight fits both and the
  config's ``fan_in_fan_out`` (or the caller's hint) decides, as in PEFT;
* where each trainable bias and ``modules_to_save`` copy goes;
* that every tensor fits its base weight (else :class:`ParamsMismatchError`
  naming the params key, the weight key and both shapes).

:func:`weight_layout_of_model` gives the same :class:`WeightLayout` from a model,
so merge has one code path and a model merge and a weights merge agree bitwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from ...core.params import TunerParams
from ...errors import ConfigError, ParamsMismatchError
from .config import LoRAConfig
from .keys import EMBEDDING_PARTS, lora_b_bias_name, param_names, parse_key
from .layout import conv_groups, layout_of, shapes_for_weight
from .math import PARAM_KINDS
from .tokens import indices_for, parse_token_key, tied_modules
from .variants import (
    VariantSite,
    check_site_variant,
    effective_factors,
    extra_shapes,
    factor_shapes,
    site_variant,
)

__all__ = ["WeightLayout", "WeightSite", "weight_layout", "weight_layout_of_model"]


class WeightSite(NamedTuple):
    """One adapted weight: module name, layer kind, the params keys of its tensors, and the scaling."""

    name: str  # module name; the base weight is ``<name>.weight``
    kind: str  # linear | conv1d_gpt2 | embedding | conv
    a: str
    b: str
    m: str | None  # DoRA magnitude key
    bias: str | None  # trainable bias key (``<name>.bias``)
    scaling: float
    lora_bias: str | None = None  # lora_B's own bias key (lora_bias=True): merged into ``<name>.bias``
    weight_name: str = "weight"  # the adapted parameter (target_parameters: any name)
    variant: VariantSite | None = None  # KaSA / MiCA / VeLoRA / BD-LoRA (:mod:`.variants`)


class WeightLayout(NamedTuple):
    """Adapted weights plus replaced tensors: ``((weight key, params key), ...)`` for biases and modules_to_save."""

    sites: tuple[WeightSite, ...]
    replacements: tuple[tuple[str, str], ...]
    # trainable tokens: ((weight key, params key, row indices), ...): those rows of the weight are replaced
    token_rows: tuple[tuple[str, str, tuple[int, ...]], ...] = ()


def weight_layout_of_model(model: nn.Module, params: TunerParams) -> WeightLayout:
    """The :class:`WeightLayout` of LoRA ``params`` on ``model``, from its validated (cached) layout."""
    layout = layout_of(model, params)
    for s in layout.sites:
        if conv_groups(s.module) != 1:
            raise _grouped_conv_error("merge", s.name, conv_groups(s.module))
    sites = tuple(
        # the weight key is ``<name>.<leaf>``: an MHA's out_proj site is "<mha>.out_proj" with "out_proj.weight"
        WeightSite(
            s.name, s.kind, s.a, s.b, s.m, s.bias, s.scaling, s.lora_bias, s.weight_name.rpartition(".")[2], s.variant
        )
        for s in layout.sites
    )
    names: dict[int, str] = {}
    if layout.overrides or layout.tokens:
        for n, mod in model.named_modules():
            names.setdefault(id(mod), n)
    replacements = tuple(
        (f"{names[id(module)]}.{pname}" if names[id(module)] else pname, key)
        for module, pairs in layout.overrides
        for pname, key in pairs
    )
    # trainable tokens: the rows go into every module sharing the weight (a tied lm_head), each under its own name
    token_rows = tuple(
        (f"{names[id(m)]}.weight", t.key, t.indices) for t in layout.tokens for m in tied_modules(model, t.module)
    )
    return WeightLayout(sites, replacements, token_rows)


def _targeted_param(name: str, shapes: Mapping[str, tuple[int, ...]], targets: tuple[str, ...]) -> str | None:
    """The parameter of module ``name`` that ``target_parameters`` adapts (PEFT's suffix match), else ``None``."""
    if targets:
        prefix = f"{name}." if name else ""
        for key in shapes:
            leaf = key[len(prefix) :]
            if key.startswith(prefix) and "." not in leaf and any(key == t or key.endswith("." + t) for t in targets):
                return leaf
    return None


def _grouped_conv_error(source: str, name: str, groups: int) -> ConfigError:
    return ConfigError(
        f"{source}: LoRA on {name!r}, a grouped convolution (groups={groups}), cannot be merged: its B A is a dense"
        " kernel and the base weight a grouped one (PEFT refuses this merge too); keep the adapter unmerged"
        " (functuner.apply)"
    )


def _kind_of(
    key: str,
    part: str,
    A: torch.Tensor,
    B: torch.Tensor,
    wkey: str,
    wshape: tuple[int, ...],
    fan_in_fan_out: bool,
    source: str,
) -> str:
    if part in EMBEDDING_PARTS:
        return "embedding"
    if A.dim() > 2:
        return "conv"
    r = int(A.shape[0])
    got = (tuple(A.shape), tuple(B.shape))
    fits = [k for k in ("linear", "conv1d_gpt2") if len(wshape) == 2 and shapes_for_weight(wshape, k, r)[:2] == got]
    if not fits:
        raise ParamsMismatchError(
            f"{source}: params key {key!r} (A {list(A.shape)}, B {list(B.shape)}) does not fit weight {wkey!r} of"
            f" shape {list(wshape)}; a Linear weight (out, in) needs A (r, in) and B (out, r), a GPT-2 Conv1D"
            " weight (in, out) the same with in/out swapped"
        )
    if len(fits) == 2:  # square weight: only the config can tell Linear from GPT-2 Conv1D
        return "conv1d_gpt2" if fan_in_fan_out else "linear"
    return fits[0]


def weight_layout(
    params: Mapping[str, torch.Tensor],
    config: LoRAConfig,
    adapter_name: str,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    fan_in_fan_out: bool | None = None,
    source: str = "merge",
) -> WeightLayout:
    """Match LoRA ``params`` (functuner names) to the base weights of shapes ``shapes``; no model needed. Pure.

    ``fan_in_fan_out`` decides square 2-D weights (default: ``config.fan_in_fan_out``;
    set it for GPT-2 ``Conv1D`` weights, as PEFT requires).  ``source`` starts
    every error message (a file path, or ``"merge"``).  Raises
    :class:`ParamsMismatchError` naming the first key that does not fit.
    """
    hint = bool(config.fan_in_fan_out) if fan_in_fan_out is None else fan_in_fan_out
    targets = tuple(getattr(config, "target_parameters", None) or ())
    ad = adapter_name
    sites: list[WeightSite] = []
    replacements: list[tuple[str, str]] = []
    claimed: set[str] = set()

    def base_shape(wkey: str, from_key: str) -> tuple[int, ...]:
        if wkey not in shapes:
            raise ParamsMismatchError(
                f"{source}: params key {from_key!r} targets weight {wkey!r}, which the base does not have"
            )
        return tuple(int(d) for d in shapes[wkey])

    for key in params:
        parsed = parse_key(key)
        if parsed is None or parsed.part not in ("lora_A", "lora_embedding_A") or parsed.adapter != ad:
            continue
        name = parsed.module
        targeted = _targeted_param(name, shapes, targets)
        if targeted is None and f"{name}.weight" not in shapes and f"{name}.in_proj_weight" in shapes:
            targeted = "in_proj_weight"  # nn.MultiheadAttention's fused q/k/v projection, a raw (out, in) parameter
        weight_name = targeted or "weight"
        wkey = f"{name}.{weight_name}"
        wshape = base_shape(wkey, key)
        b_guess = param_names(name, "embedding" if parsed.part in EMBEDDING_PARTS else "linear", ad)[1]
        if b_guess not in params:
            raise ParamsMismatchError(f"{source}: params has {key!r} but not its partner {b_guess!r}")
        A, B = params[key], params[b_guess]
        if targeted is not None:
            # target_parameters: a 3-D fused-experts weight (E, p, q) has A (r E, q), or (r E, p) when transposed
            kind = "param_t" if len(wshape) == 3 and A.dim() == 2 and A.shape[1] != wshape[2] else "param"
        else:
            if config.use_bdlora is not None:  # the kind from the dense factors the stored blocks stand for
                A, B = effective_factors(site_variant(config, name, "linear", ad), A, B, params)
            kind = _kind_of(key, parsed.part, A, B, wkey, wshape, hint, source)
        variant = site_variant(config, name, kind, ad) if targeted is None else None
        a, b, m = param_names(name, kind, ad)
        if a != key:
            raise ParamsMismatchError(f"{source}: params key {key!r}: {wkey!r} is a {kind} weight, expected {a!r}")
        r = int(A.shape[0]) if A.dim() > 0 else -1
        if kind in PARAM_KINDS and len(wshape) == 3:
            r //= wshape[0]  # fused experts: A holds r rows per expert
        if kind == "conv" and len(wshape) == A.dim() and wshape[1] != A.shape[1] and A.shape[1] % wshape[1] == 0:
            raise _grouped_conv_error(source, name, int(A.shape[1]) // wshape[1])
        want_r = config.rank_for(name)
        if r != want_r:
            raise ParamsMismatchError(
                f"{source}: params[{a!r}] has rank {r}, but the config says r={want_r} for module {name!r}"
                " (the scaling lora_alpha/r depends on it; fix r or rank_pattern)"
            )
        has_m = m in params
        if has_m != bool(config.use_dora):
            raise ParamsMismatchError(
                f"{source}: params for {name!r}: use_dora={config.use_dora} but {m!r} is"
                f" {'present' if has_m else 'missing'}"
            )
        ea, eb, em = shapes_for_weight(wshape, kind, r)
        extra: tuple[tuple[str | None, tuple[int, ...]], ...] = ()
        if variant is not None:
            check_site_variant(variant, name, wshape, r, kind)
            extra = extra_shapes(variant, r, ea[1])
            ea, eb = factor_shapes(variant, ea, eb)
            for vkey in variant.keys:
                if vkey not in params:
                    raise ParamsMismatchError(
                        f"{source}: params for {name!r}: the {variant.name} variant needs {vkey!r}"
                    )
        for k, expect in ((a, ea), (b, eb), (m, em), *extra):
            if k is None:
                continue
            if k in params and tuple(params[k].shape) != expect:
                raise ParamsMismatchError(
                    f"{source}: params[{k!r}] has shape {tuple(params[k].shape)}, but weight {wkey!r}"
                    f" {list(wshape)} ({kind}) needs {expect}"
                )
        bias = f"{name}.bias" if f"{name}.bias" in params else None
        if bias is not None and (bias not in shapes or tuple(shapes[bias]) != tuple(params[bias].shape)):
            raise ParamsMismatchError(f"{source}: params[{bias!r}] does not fit the base bias {bias!r}")
        lb = lora_b_bias_name(name, ad)
        has_lb = lb in params
        if has_lb != bool(config.lora_bias):
            raise ParamsMismatchError(
                f"{source}: params for {name!r}: lora_bias={config.lora_bias} but {lb!r} is"
                f" {'present' if has_lb else 'missing'}"
            )
        if has_lb and tuple(params[lb].shape) != (shapes_for_weight(wshape, kind, r)[1][0],):
            raise ParamsMismatchError(
                f"{source}: params[{lb!r}] has shape {tuple(params[lb].shape)}, but weight {wkey!r} {list(wshape)}"
                f" needs ({shapes_for_weight(wshape, kind, r)[1][0]},)"
            )
        sites.append(
            WeightSite(
                name,
                kind,
                a,
                b,
                m if has_m else None,
                bias,
                config.scaling_for(name),
                lb if has_lb else None,
                weight_name,
                variant,
            )
        )
        claimed.update(k for k in (a, b, m if has_m else None, bias, lb if has_lb else None) if k)
        claimed.update(variant.keys if variant is not None else ())
    token_rows: list[tuple[str, str, tuple[int, ...]]] = []
    for key in params:
        tk = parse_token_key(key)
        if key in claimed or tk is None or tk.adapter != ad:
            continue
        idx = indices_for(config.trainable_token_indices, tk.module, source)
        wkey = f"{tk.module}.weight"
        wshape = base_shape(wkey, key)
        if len(wshape) != 2 or tuple(params[key].shape) != (len(idx), wshape[1]) or max(idx) >= wshape[0]:
            raise ParamsMismatchError(
                f"{source}: params[{key!r}] has shape {tuple(params[key].shape)}; {len(idx)} trainable tokens of"
                f" {wkey!r} {list(wshape)} need ({len(idx)}, {wshape[1] if len(wshape) == 2 else '?'})"
            )
        token_rows.append((wkey, key, idx))
        claimed.add(key)
    for key in params:
        if key in claimed:
            continue
        if ".modules_to_save." in key:
            mname, _, rest = key.partition(".modules_to_save.")
            if not rest.startswith(ad + "."):
                raise ParamsMismatchError(f"{source}: params key {key!r} does not carry adapter name {ad!r}")
            target = f"{mname}.{rest[len(ad) + 1 :]}"
        elif key.rpartition(".")[2] == "bias":
            target = key
        else:
            raise ParamsMismatchError(f"{source}: params key {key!r} is not a LoRA, bias or modules_to_save tensor")
        wshape = base_shape(target, key)
        if wshape != tuple(params[key].shape):
            raise ParamsMismatchError(
                f"{source}: params[{key!r}] has shape {tuple(params[key].shape)}, but {target!r} has {list(wshape)}"
            )
        replacements.append((target, key))
    return WeightLayout(tuple(sites), tuple(replacements), tuple(token_rows))
