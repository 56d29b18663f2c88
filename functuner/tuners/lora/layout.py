"""Where LoRA params sit on a model: layer kinds, shapes, and the cached per-model layout.

* :func:`layer_kind`, :func:`in_out_features`, :func:`expected_shapes`: what a
  module is to LoRA and which tensor shapes fit it (:func:`in_out_of_shape`,
  :func:`shapes_for_weight`: the same from a weight shape alone).
* :func:`layout_of`: the adapted modules (:class:`Site`) and parameter
  overrides of ``params`` on ``model``, validated once per model and params
  structure and cached weakly (a deleted model is never kept alive).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from ...core.params import TunerParams
from ...core.targets import is_conv1d_gpt2
from ...errors import ConfigError, ParamsMismatchError, UnsupportedModuleError
from ...quant.registry import check_supported
from ...quant.weights import dense_weight, weight_shape
from .config import LoRAConfig
from .keys import lora_b_bias_name, param_names, parse_key
from .math import PARAM_KINDS
from .tokens import indices_for, parse_token_key
from .variants import VariantSite, check_site_variant, extra_shapes, factor_shapes, site_variant

__all__ = [
    "Layout",
    "Site",
    "TokenSite",
    "base_weight",
    "check_site",
    "conv_groups",
    "expected_shapes",
    "in_out_features",
    "in_out_of_shape",
    "layer_kind",
    "layout_of",
    "param_targets",
    "shapes_for_weight",
]


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_kind(module: nn.Module, name: str) -> str:
    """What ``module`` is to LoRA: ``"linear"``, ``"conv1d_gpt2"``, ``"embedding"`` or ``"conv"``.

    ``"conv"`` is ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, grouped or not.
    A registered quantized linear layer (:mod:`functuner.quant`) is ``"linear"``;
    Raises :class:`UnsupportedModuleError` naming ``name`` for any other module
    (an unregistered quantized layer included).
    """
    if check_supported(module, name) is not None:
        return "linear"
    if is_conv1d_gpt2(module):
        return "conv1d_gpt2"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, _CONVS):
        return "conv"
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    raise UnsupportedModuleError(
        f"LoRA cannot adapt module {name!r} of type {type(module).__name__}; supported: nn.Linear, nn.Embedding,"
        " nn.Conv1d, nn.Conv2d, nn.Conv3d (grouped too), nn.MultiheadAttention, transformers Conv1D"
    )


def conv_groups(module: nn.Module) -> int:
    """``module.groups`` for a convolution, 1 for every other layer."""
    return int(getattr(module, "groups", 1)) if isinstance(module, _CONVS) else 1


def check_site(module: nn.Module, name: str, kind: str, r: int, use_dora: bool) -> None:
    """Refuse what LoRA cannot do on this module (:class:`ConfigError` naming the module and the fix).

    Grouped convolutions (``groups > 1``), as PEFT does them: ``A`` is a full
    conv ``in -> r`` and ``B`` a 1x1 conv grouped like the base layer, so the
    rank must be divisible by ``groups`` (PEFT refuses the same).  DoRA on a
    grouped convolution uses PEFT's row norm (:func:`.math.dora_conv_delta`).
    """
    if kind == "mha":
        if not getattr(module, "_qkv_same_embed_dim", True):
            raise ConfigError(
                f"LoRA on {name!r}: nn.MultiheadAttention with different query/key/value sizes (kdim/vdim) is not"
                " supported (PEFT refuses it too)"
            )
        if use_dora:
            raise ConfigError(f"LoRA on {name!r}: DoRA on nn.MultiheadAttention is not supported (as in PEFT)")
        return
    groups = conv_groups(module)
    if kind != "conv" or groups == 1:
        return
    if r % groups != 0:
        raise ConfigError(
            f"LoRA on {name!r} ({type(module).__name__}, groups={groups}): rank r={r} is not divisible by groups;"
            " choose r (or rank_pattern for this module) as a multiple of groups, or do not target it"
        )


def param_targets(model: nn.Module, cfg: LoRAConfig) -> dict[str, tuple[str, str]]:
    """``{module name: (parameter name, kind)}`` of the raw parameters ``cfg.target_parameters`` names.

    As PEFT: ``"<module>.<param>"`` is targeted when it equals an entry or ends
    with ``"." + entry``.  Only 2-D and 3-D (fused experts) parameters; kind
    ``"param_t"`` for a 3-D parameter of a module with ``is_transposed``.  One
    parameter per module, and not a module ``target_modules`` adapts too (PEFT
    nests wrappers there): :class:`ConfigError` naming the module.
    """
    targets = tuple(cfg.target_parameters or ())
    if not targets:
        return {}
    out: dict[str, tuple[str, str]] = {}
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if not any(full == t or full.endswith("." + t) for t in targets):
                continue
            if param.dim() not in (2, 3):
                raise ConfigError(
                    f"target_parameters: {full!r} has {param.dim()} dims; LoRA adapts 2-D and 3-D parameters only"
                )
            if mname in out:
                raise ConfigError(
                    f"target_parameters: module {mname!r} has two targeted parameters ({out[mname][0]!r}, {pname!r});"
                    " functuner adapts one parameter per module (PEFT nests wrappers there); target one of them"
                )
            kind = "param_t" if param.dim() == 3 and getattr(module, "is_transposed", False) else "param"
            out[mname] = (pname, kind)
    if not out:
        raise ConfigError(f"target_parameters={list(targets)!r} matched no parameter of the model")
    return out


def in_out_features(module: nn.Module, kind: str) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of ``module`` (LoRA's ``A`` reads fan_in, ``B`` writes fan_out)."""
    fan_in, fan_out = in_out_of_shape(tuple(base_weight(module).shape), kind)
    return fan_in * conv_groups(module), fan_out


def in_out_of_shape(weight_shape: tuple[int, ...], kind: str) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a base weight of shape ``weight_shape`` and layer ``kind`` (ungrouped)."""
    if kind in ("conv1d_gpt2", "embedding"):
        return int(weight_shape[0]), int(weight_shape[1])
    return int(weight_shape[1]), int(weight_shape[0])


def base_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` typed as a tensor (``nn.Module.__getattr__`` is typed ``Tensor | Module``).

    ``nn.MultiheadAttention``: its fused q/k/v projection ``in_proj_weight`` ``(3 E, E)``.
    A quantized linear layer (:mod:`functuner.quant`): its weight dequantized, fp32 ``(out, in)``.
    """
    if isinstance(module, nn.MultiheadAttention):
        return cast(torch.Tensor, module.in_proj_weight)
    dense = dense_weight(module)
    if dense is not None:
        return dense
    return cast(torch.Tensor, module.weight)


def expected_shapes(module: nn.Module, kind: str, r: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``(A, B, magnitude)`` for rank ``r`` on ``module``."""
    return shapes_for_weight(tuple(base_weight(module).shape), kind, r, conv_groups(module))


def shapes_for_weight(
    weight_shape: tuple[int, ...], kind: str, r: int, groups: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``(A, B, magnitude)`` for rank ``r`` on a base weight of shape ``weight_shape``.

    ``groups``: a grouped convolution's ``groups`` (its weight is ``(out, in / groups, *k)``):
    ``A (r, in, *k)`` reads every input channel, ``B (out, r / groups, 1...)`` is grouped.
    """
    if kind in PARAM_KINDS or kind == "mha":
        if len(weight_shape) == 2:
            return (r, int(weight_shape[1])), (int(weight_shape[0]), r), ()
        E, p, q = (int(d) for d in weight_shape)
        fan_in, fan_out = (p, q) if kind == "param_t" else (q, p)
        return (r * E, fan_in), (fan_out, r * E), ()
    fan_in, fan_out = in_out_of_shape(weight_shape, kind)
    if kind == "embedding":
        return (r, fan_in), (fan_out, r), (fan_out,)
    if kind == "conv":
        k = tuple(int(d) for d in weight_shape[2:])
        ones = (1,) * len(k)
        return (r, fan_in * groups, *k), (fan_out, r // groups, *ones), (1, fan_out, *ones)
    return (r, fan_in), (fan_out, r), (fan_out,)


class Site(NamedTuple):
    """One adapted module: its name, the module, its kind, the params keys of its tensors, scaling and dropout."""

    name: str
    module: nn.Module
    kind: str
    a: str
    b: str
    m: str | None
    bias: str | None
    scaling: float
    dropout: float
    lora_bias: str | None = None  # key of lora_B's own bias (lora_bias=True)
    weight_name: str = "weight"  # the adapted parameter of the module (target_parameters: any name)
    variant: VariantSite | None = None  # KaSA / MiCA / VeLoRA / BD-LoRA (:mod:`.variants`)


class TokenSite(NamedTuple):
    """Trainable tokens (``trainable_token_indices``) of one module: its rows ``indices`` come from ``key``."""

    name: str
    module: nn.Module
    key: str
    indices: tuple[int, ...]


class Layout(NamedTuple):
    """The adapted modules of params on a model, plus parameter overrides (trainable biases, modules_to_save)."""

    sites: tuple[Site, ...]
    overrides: tuple[tuple[nn.Module, tuple[tuple[str, str], ...]], ...]  # module, ((param name, tensor key), ...)
    tokens: tuple[TokenSite, ...] = ()  # trainable tokens (rows of an embedding replaced)


_LAYOUT_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, Layout]] = weakref.WeakKeyDictionary()
_LAYOUT_LOCK = threading.Lock()


def _find_module(model: nn.Module, name: str, key: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ParamsMismatchError(
            f"params key {key!r} refers to module {name!r}, which the model does not have"
        ) from None


def _build_layout(model: nn.Module, params: TunerParams) -> Layout:
    cfg: LoRAConfig = params.config
    ad = params.adapter_name
    sites: list[Site] = []
    claimed: set[str] = set()
    keys = list(params)
    modules_to_save_keys: dict[str, list[tuple[str, str]]] = {}
    tokens: list[TokenSite] = []
    ptargets = param_targets(model, cfg)
    for key in keys:
        parsed = parse_key(key)
        if parsed is not None and parsed.adapter == ad and parsed.part in ("lora_A", "lora_embedding_A"):
            mname = parsed.module
            module = _find_module(model, mname, key)
            weight_name, kind = ptargets.get(mname) or ("weight", layer_kind(module, mname))
            module, weight_name, kind = _mha_site(model, mname, module, weight_name, kind)
            check_site(module, mname, kind, cfg.rank_for(mname), bool(cfg.use_dora))
            a, b, m = param_names(mname, kind, ad)
            if a != key:
                raise ParamsMismatchError(f"params key {key!r}: module {mname!r} is a {kind}, expected key {a!r}")
            if b not in params:
                raise ParamsMismatchError(f"params has {a!r} but not its partner {b!r}")
            has_m = m in params
            if has_m != bool(cfg.use_dora):
                raise ParamsMismatchError(
                    f"params for {mname!r}: use_dora={cfg.use_dora} but {m!r} is {'present' if has_m else 'missing'}"
                )
            bias_key = f"{mname}.bias" if f"{mname}.bias" in params else None
            lb_key = lora_b_bias_name(mname, ad)
            has_lb = lb_key in params
            if has_lb != bool(cfg.lora_bias):
                raise ParamsMismatchError(
                    f"params for {mname!r}: lora_bias={cfg.lora_bias} but {lb_key!r} is"
                    f" {'present' if has_lb else 'missing'}"
                )
            if has_lb and kind == "embedding":
                raise ConfigError(f"LoRA on {mname!r}: lora_bias=True is not supported on embeddings (as in PEFT)")
            variant = site_variant(cfg, mname, kind, ad) if kind not in PARAM_KINDS else None
            missing = [k for k in (variant.keys if variant is not None else ()) if k not in params]
            if variant is not None and missing:
                raise ParamsMismatchError(f"params for {mname!r}: the {variant.name} variant needs {missing[0]!r}")
            sites.append(
                Site(
                    mname,
                    module,
                    kind,
                    a,
                    b,
                    m if has_m else None,
                    bias_key,
                    cfg.scaling_for(mname),
                    float(cfg.lora_dropout),
                    lb_key if has_lb else None,
                    weight_name,
                    variant,
                )
            )
            claimed.update(k for k in (a, b, m if has_m else None, bias_key, lb_key if has_lb else None) if k)
            claimed.update(variant.keys if variant is not None else ())
        tk = parse_token_key(key)
        if tk is not None and tk.adapter == ad:
            tmod = _find_module(model, tk.module, key)
            tokens.append(TokenSite(tk.module, tmod, key, indices_for(cfg.trainable_token_indices, tk.module)))
            claimed.add(key)
        if ".modules_to_save." in key:
            mname, _, rest = key.partition(".modules_to_save.")
            if not rest.startswith(ad + "."):
                raise ParamsMismatchError(f"params key {key!r} does not carry adapter name {ad!r}")
            modules_to_save_keys.setdefault(mname, []).append((rest[len(ad) + 1 :], key))
            claimed.add(key)
    overrides: list[tuple[nn.Module, tuple[tuple[str, str], ...]]] = []
    for mname, pairs in modules_to_save_keys.items():
        module = _find_module(model, mname, pairs[0][1])
        overrides.append((module, tuple(pairs)))
    # remaining keys: trainable biases of non-adapted modules (bias='all')
    for key in keys:
        if key in claimed:
            continue
        mname, _, leaf = key.rpartition(".")
        if leaf != "bias":
            raise ParamsMismatchError(f"params key {key!r} is not a LoRA, bias or modules_to_save tensor")
        module = _find_module(model, mname, key)
        overrides.append((module, (("bias", key),)))
    adapted = {s.name for s in sites}
    for t in tokens:
        if t.name in adapted:
            raise ConfigError(
                f"LoRA on {t.name!r}: the module is adapted by LoRA and has trainable tokens"
                " (trainable_token_indices); PEFT keeps the two apart too: drop it from one of them"
            )
    return Layout(tuple(sites), tuple(overrides), tuple(tokens))


def _mha_site(
    model: nn.Module, name: str, module: nn.Module, weight_name: str, kind: str
) -> tuple[nn.Module, str, str]:
    """``nn.MultiheadAttention`` (as PEFT): its ``in_proj_weight`` and its ``out_proj.weight`` are adapted as raw
    parameters of the attention module, whose forward reads both weights (``out_proj.forward`` is never called)."""
    if kind == "mha":
        return module, "in_proj_weight", "param"
    parent_name, _, leaf = name.rpartition(".")
    if leaf == "out_proj" and kind == "linear":
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention):
            return parent, "out_proj.weight", "param"
    return module, weight_name, kind


def layout_of(model: nn.Module, params: TunerParams) -> Layout:
    """The cached layout of ``params`` on ``model`` (validated once per model and params structure)."""
    if torch.compiler.is_compiling():
        return _compiled_layout(model, params)
    # shapes are part of the key: params with the same names but other shapes must be checked again
    # (tests/reliability/test_bad_input.py::test_wrong_shape_is_caught_even_after_good_params_with_the_same_names)
    sig = (tuple(params), params.config, params.adapter_name, tuple(t.shape for t in params.values()))
    with _LAYOUT_LOCK:
        per_model = _LAYOUT_CACHE.get(model)
        layout = per_model.get(sig) if per_model is not None else None
    if layout is None:
        layout = _build_layout(model, params)
        _check_shapes(model, params, layout)
        with _LAYOUT_LOCK:
            per_model = _LAYOUT_CACHE.setdefault(model, {})
            if len(per_model) >= _MAX_PER_MODEL:  # a long-lived model in a config sweep: forget the oldest
                del per_model[next(iter(per_model))]
            per_model[sig] = layout
    key = (id(model), id(params.config), params.adapter_name, sig[0])
    entry = _COMPILE_INDEX.get(key)
    if entry is None or entry[0]() is not model or entry[1]() is not params.config:
        _index_for_compile(key, model, params.config, layout)
    return layout


# Under torch.compile, Dynamo can neither take the lock nor hash a config (json), so layouts are found
# here by the identity of the model and the config object, indexed by the eager call that preceded
# compilation (functuner.apply once before compiling).  Both are held weakly: an entry goes away as soon
# as its model or its config is collected (so a deleted model's layers are freed, and a config made per
# call leaves nothing behind), and a lookup checks both references, so a reused id never matches.
_COMPILE_INDEX: dict[tuple[int, int, str, tuple[str, ...]], tuple[weakref.ref[Any], weakref.ref[Any], Layout]] = {}
_MAX_PER_MODEL = 64  # layouts kept per model (one per params structure and config; each keeps its config alive)


def _index_for_compile(
    key: tuple[int, int, str, tuple[str, ...]], model: nn.Module, config: Any, layout: Layout
) -> None:
    """Record ``layout`` for lookups under torch.compile, held only as long as ``model`` and ``config`` live."""

    def drop(ref: weakref.ref[Any]) -> None:
        # runs when the model or the config dies (any thread, maybe inside a locked section: no lock here);
        # removes only the entry this reference belongs to, never a newer one under the same ids
        entry = _COMPILE_INDEX.get(key)
        if entry is not None and (entry[0] is ref or entry[1] is ref):
            _COMPILE_INDEX.pop(key, None)

    _COMPILE_INDEX[key] = (weakref.ref(model, drop), weakref.ref(config, drop), layout)


def _compiled_layout(model: nn.Module, params: TunerParams) -> Layout:
    key = (id(model), id(params.config), params.adapter_name, tuple(params._tensors))
    entry = _COMPILE_INDEX.get(key)
    if entry is None or entry[0]() is not model or entry[1]() is not params.config:
        raise RuntimeError(
            "functuner under torch.compile: these params were never applied to this model eagerly; call"
            " functuner.apply(model, params, ...) once outside torch.compile before compiling"
        )
    return entry[2]


def _check_shapes(model: nn.Module, params: TunerParams, layout: Layout) -> None:
    for s in layout.sites:
        r = params[s.a].shape[0] if params[s.a].dim() > 0 else -1
        qshape = weight_shape(s.module) if s.weight_name == "weight" else None  # a quantized layer's true shape
        weight = torch.empty(qshape, device="meta") if qshape else s.module.get_parameter(s.weight_name)
        if s.kind in PARAM_KINDS and weight.dim() == 3:
            r //= weight.shape[0]  # fused experts: A holds r rows per expert
        want_r = params.config.rank_for(s.name)
        if r != want_r:
            raise ParamsMismatchError(
                f"params[{s.a!r}] has rank {r}, but the config says r={want_r} for module {s.name!r}"
                " (the scaling lora_alpha/r depends on it; fix r or rank_pattern)"
            )
        ea, eb, em = shapes_for_weight(tuple(weight.shape), s.kind, r, conv_groups(s.module))
        extra: tuple[tuple[str | None, tuple[int, ...]], ...] = ()
        if s.variant is not None:
            check_site_variant(s.variant, s.name, tuple(weight.shape), r, s.kind)
            extra = extra_shapes(s.variant, r, ea[1])
            ea, eb = factor_shapes(s.variant, ea, eb)
        for key, expect in ((s.a, ea), (s.b, eb), (s.m, em), *extra):
            if key is None:
                continue
            got = tuple(params[key].shape)
            if got != expect:
                raise ParamsMismatchError(
                    f"params[{key!r}] has shape {got}, but module {s.name!r} ({type(s.module).__name__},"
                    f" {s.weight_name} {tuple(weight.shape)}) needs {expect}"
                )
        if s.lora_bias is not None:
            want = (expected_shapes(s.module, s.kind, r)[1][0],)
            if tuple(params[s.lora_bias].shape) != want:
                raise ParamsMismatchError(
                    f"params[{s.lora_bias!r}] has shape {tuple(params[s.lora_bias].shape)}, but module {s.name!r}"
                    f" needs {want} (one lora_B bias per output unit)"
                )
        if s.bias is not None:
            mb = getattr(s.module, "bias", None)
            if mb is None or tuple(params[s.bias].shape) != tuple(mb.shape):
                raise ParamsMismatchError(f"params[{s.bias!r}] does not fit the bias of module {s.name!r}")
    for t in layout.tokens:
        tw = t.module._parameters.get("weight")
        rows = (len(t.indices), int(tw.shape[1])) if tw is not None and tw.dim() == 2 else None
        if tw is None or rows is None or tuple(params[t.key].shape) != rows or max(t.indices) >= tw.shape[0]:
            raise ParamsMismatchError(
                f"params[{t.key!r}] has shape {tuple(params[t.key].shape)}, but module {t.name!r}"
                f" (weight {tuple(tw.shape) if tw is not None else None}) with {len(t.indices)} trainable"
                f" tokens needs {rows}"
            )
    for module, pairs in layout.overrides:
        own = dict(module.named_parameters())
        for pname, key in pairs:
            if pname not in own:
                raise ParamsMismatchError(f"params key {key!r}: the module has no parameter {pname!r}")
            if tuple(own[pname].shape) != tuple(params[key].shape):
                raise ParamsMismatchError(
                    f"params[{key!r}] has shape {tuple(params[key].shape)}, the module's {pname!r} has"
                    f" {tuple(own[pname].shape)}"
                )
