"""LoRA's forward: the slot functions that add ``s B A x`` (and DoRA's rescaling) at each adapted module.

:func:`routes` turns params into the slots one call runs; the model is never
written.  The product ``B @ A`` is never formed in the forward (except for
DoRA's detached conv/embedding norms).
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ...core.params import TunerParams
from ...core.routing import Replace, Routes, ensure_method_slot, ensure_slots
from ..base import CallContext, clone_module_tree, override_slot
from .layout import Site, base_weight, layout_of
from .math import (
    PARAM_KINDS,
    add_lowrank,
    conv_fn,
    dora_conv_delta,
    dora_norm,
    dora_row_norm_lowrank,
    lora_delta,
    param_delta,
    weight_as_out_in,
)
from .tokens import rows_slot, tied_modules
from .variants import effective_factors, kasa_dropped, monteclora_a, velora_linear

__all__ = ["first_arg", "needs_generator", "routes"]


def _dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return F.dropout(x, p, training=True)
    keep = torch.empty(x.shape, dtype=x.dtype, device="cpu").bernoulli_(1.0 - p, generator=generator).to(x.device)
    return x * keep / (1.0 - p)


def first_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return cast(torch.Tensor, args[0])
    for k in ("input", "x", "hidden_states"):
        if k in kwargs:
            return cast(torch.Tensor, kwargs[k])
    raise TypeError("LoRA slot: could not find the module's input tensor")


def _slot(
    site: Site,
    A: torch.Tensor,
    B: torch.Tensor,
    M: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_b_bias: torch.Tensor | None,
    generator: torch.Generator | None,
    module: Any,  # nn.Linear / Conv1D / Embedding / ConvNd: their attributes are read directly
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    x = first_arg(args, kwargs)
    kind, s = site.kind, site.scaling
    out_dtype = out.dtype
    base_bias = getattr(module, "bias", None) if kind != "embedding" else None
    if bias is not None:
        shift = (bias - base_bias) if base_bias is not None else bias
        out = out + (shift.view(1, -1, *([1] * (out.dim() - 2))) if kind == "conv" else shift)
        base_bias = bias
    if lora_b_bias is not None:  # lora_bias=True: s (B A x + b) = s B A x + s b (never with DoRA or embeddings)
        shift = lora_b_bias * s
        out = out + (shift.view(1, -1, *([1] * (out.dim() - 2))) if kind == "conv" else shift).to(out.dtype)
    if kind == "embedding":
        emb = F.embedding(
            x,
            A.T,
            padding_idx=module.padding_idx,
            max_norm=module.max_norm,
            norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq,
            sparse=module.sparse,
        )
        lora_out = (emb @ B.T) * s
        if M is None:
            return (out + lora_out).to(out_dtype)
        w = base_weight(module)
        norm = dora_norm(w.T.detach(), lora_delta(A.detach(), B.detach(), s, kind).T, kind).to(M.dtype)
        scale = M / norm
        return (scale * out + scale * lora_out).to(out_dtype)
    xa = x.to(A.dtype)
    dropped = site.dropout > 0.0 and module.training
    if dropped:
        xa = _dropout(xa, site.dropout, generator)
    if kind == "conv":
        conv = conv_fn(A.dim() - 2)
        h = conv(xa, A, stride=module.stride, padding=module.padding)
        lora_out = conv(h, B, groups=module.groups)  # B is grouped as the base conv (PEFT's layout)
    else:
        h = F.linear(xa, A)
        if out.dtype == h.dtype and not dropped:
            return _fused_linear(h, A, B, M, s, out, base_bias, module, kind)
        lora_out = F.linear(h, B)
    if M is None:
        return (out + lora_out * s).to(out_dtype)
    # DoRA
    w = base_weight(module)  # a quantized layer's weight dequantized
    w_oi = weight_as_out_in(w, kind)
    with torch.no_grad():
        if kind == "conv":
            delta = dora_conv_delta(A.detach(), B.detach(), s, tuple(w.shape))
            norm = dora_norm(w_oi.detach(), delta, kind)
        else:
            norm = dora_row_norm_lowrank(w_oi.detach(), A.detach(), B.detach(), s)
    scale = M / norm.to(M.dtype)
    if kind != "conv":
        scale = scale.view(1, -1) if scale.dim() == 1 else scale
    if dropped:
        if kind == "conv":
            base_result = conv_fn(A.dim() - 2)(
                xa.to(w.dtype), w, None, module.stride, module.padding, module.dilation, module.groups
            )
        else:
            base_result = F.linear(xa.to(w.dtype), w_oi)
    else:
        base_result = out
        if base_bias is not None:
            base_result = out - (base_bias.view(1, -1, *([1] * (out.dim() - 2))) if kind == "conv" else base_bias)
    dora = (scale - 1) * base_result + scale * lora_out * s
    return (out + dora).to(out_dtype)


def _linear_slot(
    site: Site,
    A: torch.Tensor,
    B: torch.Tensor,
    generator: torch.Generator | None,
    module: Any,  # nn.Linear / GPT-2 Conv1D / a quantized linear
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    """Plain LoRA on a linear layer (no DoRA, no bias): the decoding hot path, three kernels and no copies.

    Without autograd or a torch.func transform (``generate``, ``no_grad``/``inference_mode``) the
    module's fresh, contiguous output gets ``s (x A^T) B^T`` added in place by one ``addmm_``: no
    full-size temporary and no reshaping back (``view(out.shape)`` alone costs as much as the small
    GEMM).  Anything else (autograd, dropout in training, mixed dtypes, vmap, compile) takes :func:`_slot`,
    which computes the same sums out of place.
    """
    x = args[0] if args else first_arg(args, kwargs)
    if (
        torch.is_grad_enabled()
        or x.dtype != A.dtype
        or out.dtype != A.dtype
        or not out.is_contiguous()
        or (site.dropout > 0.0 and module.training)
        or torch.compiler.is_compiling()
        or torch._C._functorch.peek_interpreter_stack() is not None
    ):
        return _slot(site, A, B, None, None, None, generator, module, args, kwargs, out)
    h = torch.mm(x.reshape(-1, x.shape[-1]), A.t())
    out.view(-1, out.shape[-1]).addmm_(h, B.t(), alpha=site.scaling)
    return out


def _fused_linear(
    h: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    M: torch.Tensor | None,
    s: float,
    out: torch.Tensor,
    base_bias: torch.Tensor | None,
    module: nn.Module,
    kind: str,
) -> torch.Tensor:
    """The linear LoRA/DoRA output from the base output ``out`` and ``h = x A^T`` (no dropout, one dtype).

    LoRA: ``out + s h B^T`` in one ``addmm``.  DoRA: with ``c = m / ||W + s B A||_row``
    (detached; computed rank-wise by :func:`dora_row_norm_lowrank`) the output
    ``out + (c - 1) W x + c s B A x`` equals ``c (W x + s B A x) + bias``: one
    ``addmm`` and one scale instead of five full-size elementwise passes.
    """
    if M is None:
        return add_lowrank(out, h, B, s)
    with torch.no_grad():
        weight = base_weight(module)  # a quantized layer's weight dequantized
        norm = dora_row_norm_lowrank(weight_as_out_in(weight, kind).detach(), A.detach(), B.detach(), s)
    scale = M.view(-1) / norm.to(M.dtype)
    base_result = out if base_bias is None else out - base_bias
    scaled = add_lowrank(base_result, h, B, s) * scale.to(out.dtype)
    return scaled if base_bias is None else scaled + base_bias


def _variant_slot(
    site: Site,
    A: torch.Tensor,
    B: torch.Tensor,
    extra: tuple[torch.Tensor, ...],
    bias: torch.Tensor | None,
    generator: torch.Generator | None,
    module: Any,  # nn.Linear (KaSA, VeLoRA, MonteCLoRA) or transformers Conv1D (VeLoRA, MonteCLoRA)
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    """KaSA (``extra``: ``lora_diag``), VeLoRA (the stored projection) and MonteCLoRA (its sampler tensors)."""
    vs = site.variant
    assert vs is not None
    x = first_arg(args, kwargs)
    out_dtype = out.dtype
    base_bias = getattr(module, "bias", None)
    if bias is not None:
        out = out + ((bias - base_bias) if base_bias is not None else bias)
    xa = x.to(A.dtype)
    if site.dropout > 0.0 and module.training:
        xa = _dropout(xa, site.dropout, generator)
    if vs.name == "kasa":  # the base output without W's r smallest singular components (PEFT truncates W itself)
        us, vh = kasa_dropped(cast(torch.Tensor, module.weight), int(A.shape[0]))
        out = out - F.linear(F.linear(x.to(vh.dtype), vh), us).to(out.dtype)
        h = F.linear(xa, A) * extra[0].to(A.dtype)
    elif vs.name == "monteclora":
        h = F.linear(xa, monteclora_a(vs, A, extra, generator) if module.training else A)
    else:
        h = velora_linear(xa, A, vs, extra[0], bool(module.training))
    return (out + F.linear(h, B) * site.scaling).to(out_dtype)


def _param_overrides(
    sites: tuple[tuple[Site, torch.Tensor, torch.Tensor], ...], module: nn.Module
) -> dict[str, torch.Tensor]:
    overrides: dict[str, torch.Tensor] = {}
    for site, A, B in sites:
        weight = module.get_parameter(site.weight_name)
        overrides[site.weight_name] = weight + param_delta(A, B, site.scaling, tuple(weight.shape), site.kind).to(
            weight.dtype
        )
    return overrides


def _param_slot(
    sites: tuple[tuple[Site, torch.Tensor, torch.Tensor], ...],
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: Any,
) -> Any:
    """Raw parameters of a module that also has other overrides: re-run it once with every adapted
    parameter ``W + s B A`` after its own forward (as PEFT's parametrization / merge-around-forward)."""
    return override_slot(_param_overrides(sites, module))(module, args, kwargs, out)


def _param_forward(
    sites: tuple[tuple[Site, torch.Tensor, torch.Tensor], ...],
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Raw parameters (``target_parameters``, ``nn.MultiheadAttention``): the module's forward, run once on a
    per-call clone whose adapted parameters are ``W + s B A`` (PEFT's parametrization, without writing the
    module).  A :class:`~functuner.core.routing.Replace` on the module's ``forward`` method slot, so the
    forward with the base ``W`` never runs (a forward hook would discard that run: twice the experts' cost)."""
    clone = clone_module_tree(module)  # without the method slot: the clone runs its class's forward
    for name, tensor in _param_overrides(sites, module).items():
        owner_path, _, leaf = name.rpartition(".")
        owner = clone.get_submodule(owner_path) if owner_path else clone
        owner.__dict__["_parameters"][leaf] = tensor
    return clone.forward(*args, **kwargs)


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """The slot functions one call runs: a LoRA delta at each adapted module, overrides elsewhere."""
    layout = layout_of(model, params)
    fwd: dict[Any, list[Any]] = {}  # modules (forward hooks) and method slots
    gen = ctx.generator
    raw: dict[nn.Module, list[tuple[Site, torch.Tensor, torch.Tensor]]] = {}
    for site in layout.sites:
        if site.kind in PARAM_KINDS:
            raw.setdefault(site.module, []).append((site, params[site.a], params[site.b]))
            continue
        vs = site.variant
        if vs is not None and vs.name in ("kasa", "velora", "monteclora"):
            extra = tuple(params[k] for k in vs.keys)
            bias = params[site.bias] if site.bias else None
            fn = functools.partial(_variant_slot, site, params[site.a], params[site.b], extra, bias, gen)
            fwd.setdefault(site.module, []).append(fn)
            continue
        A, B = effective_factors(vs, params[site.a], params[site.b], params)  # BD-LoRA blocks, MiCA's frozen B
        if site.kind in ("linear", "conv1d_gpt2") and not (site.m or site.bias or site.lora_bias):
            fwd.setdefault(site.module, []).append(functools.partial(_linear_slot, site, A, B, gen))
            continue
        fn = functools.partial(
            _slot,
            site,
            A,
            B,
            params[site.m] if site.m else None,
            params[site.bias] if site.bias else None,
            params[site.lora_bias] if site.lora_bias else None,
            gen,
        )
        fwd.setdefault(site.module, []).append(fn)
    overridden = {module for module, _ in layout.overrides}
    for module, entries in raw.items():
        if module in overridden:  # the override slot re-runs the module anyway: keep one forward hook list
            fwd.setdefault(module, []).append(functools.partial(_param_slot, tuple(entries)))
        else:
            replace = Replace(functools.partial(_param_forward, tuple(entries)))
            fwd.setdefault(ensure_method_slot(module, "forward"), []).insert(0, replace)
    for module, pairs in layout.overrides:
        fwd.setdefault(module, []).insert(0, override_slot({pname: params[key] for pname, key in pairs}))
    for t in layout.tokens:  # trainable tokens: the weight with its rows replaced, also in tied modules (lm_head)
        rows = functools.partial(rows_slot, t.module, t.indices, params[t.key])
        for tied in tied_modules(model, t.module):
            fwd.setdefault(tied, []).insert(0, rows)
    ensure_slots([m for m in fwd if isinstance(m, nn.Module)])
    return Routes(forward=fwd)


def needs_generator(model: nn.Module, params: TunerParams) -> bool:
    """Whether a call on ``model`` (in its current train/eval mode) would draw random numbers."""
    if params.config.monteclora_config is not None:  # MonteCLoRA perturbs A in training
        return any(s.module.training for s in layout_of(model, params).sites)
    if params.config.lora_dropout <= 0:
        return False
    return any(s.module.training for s in layout_of(model, params).sites if s.kind != "embedding")
