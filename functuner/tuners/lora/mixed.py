"""Per-sample adapters in one forward: each sample of a batch runs with its own LoRA adapter.

Public API::

    stack = stack_adapters(model, {"fr": p_fr, "de": p_de})        # once per adapter set (optional)
    out = apply_mixed(model, stack, ["fr", "__base__", "de", "fr"], (input_ids,))
    out = apply_mixed(model, [p_fr, p_de], torch.tensor([0, -1, 1, 0]), (input_ids,))

* ``adapters``: an :class:`AdapterStack`, a sequence of LoRA ``TunerParams``
  (index ``i`` is position ``i``, named by each params' ``adapter_name``) or a
  ``{name: params}`` mapping (index ``i`` is the ``i``-th key).
* ``adapter_index``: a ``LongTensor (batch,)`` of positions, ``-1`` meaning "no
  adapter"; or a list of names (PEFT's ``adapter_names=``), ``"__base__"``
  meaning no adapter.  :func:`index_of` converts names to the tensor.

How: for each adapted module the adapters' factors are stacked once per
:func:`stack_adapters` call: ``A (K+1, in, R)``, ``B (K+1, R, out)`` with each
adapter's scaling folded into ``B``, ranks zero-padded to the largest ``R``, and
a zero slot ``K`` (= index ``-1``) for "no adapter".  The forward gathers each
sample's factors (``A[index]``) and runs two batched matmuls: the cost does not
grow with the number of adapters, there is no loop over adapters.  Embeddings
gather rows of the stacked ``A``; ``nn.Conv1d``/``nn.Conv2d`` run as grouped
convolutions (one group per sample).

Stacked here: plain LoRA, rsLoRA, DoRA (per-sample magnitude scale),
mixed ranks and mixed target modules (an adapter that does not adapt a module
contributes zero there), trainable biases of adapted modules, ``lora_bias``,
``nn.Conv3d``, trainable tokens (``trainable_token_indices``: the embedding, and a
tied ``lm_head``, run once per such adapter and each sample takes its adapter's output).
:func:`apply_mixed` runs everything else per sample through the general sub-batch path
(:mod:`functuner.tuners.sub_batch`: each adapter's own slots on the rows of its samples):
grouped convolutions, raw parameters (``target_parameters``, ``nn.MultiheadAttention``),
``modules_to_save`` copies, the LoRA variants, and every other tuner with a ``sub_batch``
hook, several tuners in one batch included; :func:`stack_adapters` itself refuses them
(a :class:`~functuner.errors.ConfigError` names the adapter and what it has).  Dropout
in training mode raises (call ``model.eval()``, as PEFT requires for ``adapter_names``).

Purity: the model and the params are never written.  The per-sample routing
reaches the modules through the same per-call context variable as
:func:`functuner.apply`, so an exception in the middle of a forward (out of
memory, a bad input) leaves no state behind, and threads do not interfere.
Gradients flow to the adapters' tensors (stack inside the differentiated
function, or pass the params and let :func:`apply_mixed` stack them), and the
whole call works under ``torch.func.vmap`` (the index may be vmapped too).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ...core.params import TunerParams
from ...core.routing import Routes, ensure_slots, routed
from ...errors import AdapterNameError, ConfigError
from .. import sub_batch
from ..base import PerSample, override_slot
from ..registry import tuner_for
from ..sub_batch import SubBatchStack
from .forward import first_arg
from .layout import layout_of
from .math import PARAM_KINDS, conv_fn, dora_norm, lora_delta, weight_as_out_in
from .tokens import tied_modules, with_rows

__all__ = ["BASE", "PER_SAMPLE", "AdapterStack", "apply_mixed", "index_of", "mixed_routes", "stack_adapters"]

BASE = "__base__"  # the name PEFT uses for "no adapter" in adapter_names


class _StackSite(NamedTuple):
    """One adapted module with every adapter's factors stacked (row ``K`` is the zero "no adapter" slot).

    Shapes (``K`` adapters, ``R`` the largest rank): linear / GPT-2 Conv1D ``A (K+1, in, R)``,
    ``B (K+1, R, out)`` (transposed and contiguous, ready for ``bmm``); embedding
    ``A (K+1, num_embeddings, R)``, ``B (K+1, R, dim)``; conv ``A (K+1, R, in, *k)``,
    ``B (K+1, out, R, 1...)``.  ``B`` includes each adapter's scaling.
    ``dora (K+1, out)``: per-adapter DoRA scale ``m / ||W + s B A||`` (1 for plain LoRA), or None.
    ``bias (K+1, out)``: per-adapter bias shift ``bias - base bias``, or None.
    """

    module: nn.Module
    name: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    dora: torch.Tensor | None
    bias: torch.Tensor | None
    dropout: float


class AdapterStack(NamedTuple):
    """Adapters stacked for per-sample use on one model; immutable; build with :func:`stack_adapters`.

    ``names[i]`` is the adapter at index ``i``; the stacked tensors share
    nothing mutable with the params they came from (new tensors).
    """

    names: tuple[str, ...]
    sites: tuple[_StackSite, ...]
    # trainable tokens: (module, ((adapter index, weight owner, row indices, rows), ...)), tied modules included
    tokens: tuple[tuple[nn.Module, tuple[tuple[int, nn.Module, tuple[int, ...], torch.Tensor], ...]], ...] = ()


def _named(adapters: Sequence[TunerParams] | Mapping[str, TunerParams]) -> list[tuple[str, TunerParams]]:
    if isinstance(adapters, TunerParams):
        raise TypeError(
            "apply_mixed takes several adapters (a sequence or a {name: params} mapping); for one"
            " adapter use functuner.apply"
        )
    items = list(adapters.items()) if isinstance(adapters, Mapping) else [(p.adapter_name, p) for p in adapters]
    if not items:
        raise ConfigError("apply_mixed needs at least one adapter, got none")
    seen: set[str] = set()
    for name, p in items:
        if not isinstance(p, TunerParams):
            raise ConfigError(f"adapter {name!r}: per-sample adapters must be TunerParams, got {p!r}")
        if name in seen or name == BASE:
            raise AdapterNameError(f"adapter name {name!r} is {'duplicated' if name in seen else 'reserved'}")
        seen.add(name)
    return items


def _pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _per_adapter_factors(
    kind: str, A: torch.Tensor, B: torch.Tensor, s: float, R: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter's factors in stacked layout, rank padded to ``R``, scaling folded into ``B``."""
    A, B = A.to(dtype), B.to(dtype) * s
    if kind == "conv":
        return _pad_dim(A, 0, R), _pad_dim(B, 1, R)
    return _pad_dim(A.T, 1, R), _pad_dim(B.T, 0, R)  # linear, GPT-2 Conv1D, embedding: (in, R), (R, out)


def _dora_scale(
    module: nn.Module, kind: str, A: torch.Tensor, B: torch.Tensor, M: torch.Tensor, s: float
) -> torch.Tensor:
    """``m / ||W + s B A||`` per output unit, flattened to ``(out,)``; the norm is detached (as PEFT)."""
    with torch.no_grad():
        delta = lora_delta(A.detach(), B.detach(), s, kind)
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        norm = dora_norm(weight_as_out_in(weight.detach(), kind), weight_as_out_in(delta, kind), kind)
    return (M / norm.to(M.dtype)).reshape(-1)


def stack_adapters(model: nn.Module, adapters: Sequence[TunerParams] | Mapping[str, TunerParams]) -> AdapterStack:
    """Stack LoRA adapters for per-sample use on ``model`` (validated against it).  Pure.

    Cost: one pass over the adapters' tensors (plus, for DoRA, one full-size
    delta per DoRA adapter and module to take its norm).  Keep the result and
    reuse it while the adapter set does not change; it is a plain value.
    Differentiable with respect to the adapters' tensors.
    """
    named = _named(adapters)
    for name, p in named:
        impl = tuner_for(p.config).per_sample
        if impl is None or impl.stack is not stack_adapters:
            raise ConfigError(
                f"adapter {name!r}: stack_adapters stacks LoRA adapters (a {type(p.config).__name__} is not one);"
                " pass the params to apply_mixed, which runs every tuner that can per sample"
            )
    per_module: dict[nn.Module, list[tuple[int, Any, TunerParams]]] = {}
    token_rows: dict[nn.Module, list[tuple[int, nn.Module, tuple[int, ...], torch.Tensor]]] = {}
    for i, (name, p) in enumerate(named):
        layout = layout_of(model, p)
        for t in layout.tokens:  # trainable tokens: the rows of this adapter, in every module tied to the weight
            for tied in tied_modules(model, t.module):
                token_rows.setdefault(tied, []).append((i, t.module, t.indices, p[t.key]))
        why = _not_stackable(p, layout)
        if why is not None:
            raise ConfigError(f"adapter {name!r}: {why}")
        for site in layout.sites:
            per_module.setdefault(site.module, []).append((i, site, p))
    K = len(named)
    sites: list[_StackSite] = []
    for module, entries in per_module.items():
        first = entries[0][1]
        kind = first.kind
        dtype = functools.reduce(torch.promote_types, [p[s.a].dtype for _, s, p in entries])
        R = max(p[s.a].shape[0] for _, s, p in entries)
        a0, b0 = _per_adapter_factors(kind, entries[0][2][first.a], entries[0][2][first.b], 1.0, R, dtype)
        As = [torch.zeros_like(a0)] * (K + 1)
        Bs = [torch.zeros_like(b0)] * (K + 1)
        out_features = b0.shape[0] if kind == "conv" else b0.shape[1]
        any_dora = any(s.m is not None for _, s, _ in entries)
        any_bias = any(s.bias is not None or s.lora_bias is not None for _, s, _ in entries)
        ones = torch.ones(out_features, dtype=dtype, device=a0.device)
        doras = [ones] * (K + 1)
        biases = [torch.zeros_like(ones)] * (K + 1)
        for i, s, p in entries:
            As[i], Bs[i] = _per_adapter_factors(kind, p[s.a], p[s.b], s.scaling, R, dtype)
            if s.m is not None:
                doras[i] = _dora_scale(module, kind, p[s.a], p[s.b], p[s.m], s.scaling).to(dtype)
            if s.bias is not None:
                base_bias = getattr(module, "bias", None)
                shift = p[s.bias] - base_bias if base_bias is not None else p[s.bias]
                biases[i] = shift.to(dtype)
            if s.lora_bias is not None:  # lora_bias=True: s * b per sample, on top of any trainable bias shift
                biases[i] = biases[i] + (p[s.lora_bias] * s.scaling).to(dtype)
        try:
            A_all, B_all = torch.stack(As), torch.stack(Bs)
            M_all = torch.stack(doras) if any_dora else None
            bias_all = torch.stack(biases) if any_bias else None
        except RuntimeError as exc:  # factors on different devices (shapes and dtypes are made to agree above)
            found = ", ".join(
                f"{named[i][0]!r}: r={p[s.a].shape[0]} {p[s.a].dtype} on {p[s.a].device}" for i, s, p in entries
            )
            raise ConfigError(
                f"stack_adapters: the adapters of module {first.name!r} cannot be stacked ({found}): {exc}."
                " Put every adapter on the model's device"
            ) from None
        sites.append(
            _StackSite(module, first.name, kind, A_all, B_all, M_all, bias_all, max(s.dropout for _, s, _ in entries))
        )
    tokens = tuple((m, tuple(entries)) for m, entries in token_rows.items())
    return AdapterStack(tuple(n for n, _ in named), tuple(sites), tokens)


def index_of(names: Sequence[str], adapter_names: Sequence[str]) -> torch.Tensor:
    """PEFT-style per-sample names -> ``LongTensor`` positions in ``names`` (``'__base__'`` -> ``-1``).

    Raises :class:`AdapterNameError` naming an unknown adapter.
    """
    if isinstance(adapter_names, str):
        raise TypeError("adapter_names must be a list with one name per sample, got a single string")
    pos = {n: i for i, n in enumerate(names)}
    pos[BASE] = -1
    unknown = sorted({n for n in adapter_names if n not in pos})
    if unknown:
        raise AdapterNameError(f"unknown adapter(s) {unknown} in adapter_names; known: {list(names)} and {BASE!r}")
    return torch.tensor([pos[n] for n in adapter_names], dtype=torch.long)


def _broadcast(v: torch.Tensor, out: torch.Tensor, kind: str) -> torch.Tensor:
    """``(n, out)`` per-sample values shaped to broadcast against the module output."""
    extra = [1] * (out.dim() - 2)
    if kind == "conv":
        return v.reshape(v.shape[0], -1, *extra)
    return v.reshape(v.shape[0], *extra, -1)


def _lora_out(site: _StackSite, module: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Each sample's ``s B A x`` with its own factors: a gather plus batched products, no per-adapter loop."""
    n = idx.shape[0]
    B = site.B.index_select(0, idx)
    if site.kind == "embedding":
        rows = site.A[idx.reshape(n, *([1] * (x.dim() - 1))), x]  # (n, ..., R)
        h = rows.reshape(n, -1, rows.shape[-1])
        return torch.bmm(h, B).reshape(*x.shape, B.shape[-1])
    A = site.A.index_select(0, idx)
    xa = x.to(A.dtype)
    if site.kind == "conv":
        conv = conv_fn(A.dim() - 3)
        grouped = xa.reshape(1, n * xa.shape[1], *xa.shape[2:])
        geometry: Any = module  # nn.Conv1d / nn.Conv2d
        h = conv(grouped, A.reshape(-1, *A.shape[2:]), stride=geometry.stride, padding=geometry.padding, groups=n)
        y = conv(h, B.reshape(-1, *B.shape[2:]), groups=n)
        return y.reshape(n, -1, *y.shape[2:])
    h = torch.bmm(xa.reshape(n, -1, xa.shape[-1]), A)  # (n, tokens, R)
    return torch.bmm(h, B).reshape(*x.shape[:-1], B.shape[-1])


def _check_batch(site: _StackSite, x: torch.Tensor, idx: torch.Tensor) -> None:
    if x.dim() < 2 or x.shape[0] != idx.shape[0]:
        raise ConfigError(
            f"per-sample adapters: module {site.name!r} got an input of shape {tuple(x.shape)}, but adapter_index"
            f" has {idx.shape[0]} entries; the batch must be the first dimension of every adapted module's input"
        )


def _mixed_slot(
    site: _StackSite,
    idx: torch.Tensor,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    x = first_arg(args, kwargs)
    _check_batch(site, x, idx)
    out_dtype = out.dtype
    lora = _lora_out(site, module, x, idx)
    result = out
    if site.bias is not None:
        result = result + _broadcast(site.bias[idx], out, site.kind)
    if site.dora is None:
        return (result + lora).to(out_dtype)
    scale = _broadcast(site.dora[idx], out, site.kind)
    base_result = out
    base_bias = getattr(module, "bias", None) if site.kind != "embedding" else None
    if base_bias is not None:
        base_result = out - (base_bias.reshape(1, -1, *([1] * (out.dim() - 2))) if site.kind == "conv" else base_bias)
    return (result + (scale - 1) * base_result + scale * lora).to(out_dtype)


def _used_slot(
    site: _StackSite,
    idx: torch.Tensor,
    A_u: torch.Tensor,
    B_u: torch.Tensor,
    mask: torch.Tensor | None,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    """Plain LoRA on a linear layer, per sample, from the ``U`` adapters the batch uses (built by :func:`_site_slot`).

    ``A_u (in, U R)`` and ``B_u (U R, out)`` concatenate those adapters' factors; ``mask (n, U R)`` keeps
    each sample's own rank block (``None``: every sample uses the one adapter).  Three kernels per call
    (``x A_u``, the mask, one ``addmm``) read each used adapter's factors once, instead of gathering a
    copy of the factors for every sample; the zero blocks add exact zeros, so each sample gets its own
    adapter's ``s B A x``.
    """
    x = first_arg(args, kwargs)
    _check_batch(site, x, idx)
    if x.dtype != A_u.dtype or out.dtype != A_u.dtype:
        return _mixed_slot(site, idx, module, args, kwargs, out)
    n, width = idx.shape[0], A_u.shape[1]
    h = torch.mm(x.reshape(-1, x.shape[-1]), A_u)
    if mask is not None:
        h = (h.view(n, -1, width) * mask.view(n, 1, width)).view(-1, width)
    if (
        not torch.is_grad_enabled()
        and out.is_contiguous()
        and not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is None
    ):
        out.view(-1, out.shape[-1]).addmm_(h, B_u)  # the module's fresh output, no autograd: add in place
        return out
    return torch.addmm(out.reshape(-1, out.shape[-1]), h, B_u).view_as(out)


def _site_slot(site: _StackSite, idx: torch.Tensor, used: list[int] | None) -> Any:
    """The slot of one stacked site for one call: :func:`_used_slot` where it pays, else :func:`_mixed_slot`.

    ``used``: the stack rows the batch uses (``None``: the index cannot be read, e.g. under ``vmap``).  The
    concatenated path is taken for plain LoRA on linear layers when its product stays small next to the
    layer's own (``U R (in + out) <= in out / 4``); otherwise each sample's factors are gathered.
    """
    if not used or site.kind not in ("linear", "conv1d_gpt2") or site.dora is not None or site.bias is not None:
        return functools.partial(_mixed_slot, site, idx)
    in_f, R, out_f = site.A.shape[1], site.A.shape[2], site.B.shape[2]
    U = len(used)
    if 4 * U * R * (in_f + out_f) > in_f * out_f:
        return functools.partial(_mixed_slot, site, idx)
    rows = torch.tensor(used, device=site.A.device)
    A_u = site.A.index_select(0, rows).permute(1, 0, 2).reshape(in_f, U * R)
    B_u = site.B.index_select(0, rows).reshape(U * R, out_f)
    mask = (idx.view(-1, 1) == rows.view(1, -1)).to(A_u.dtype).repeat_interleave(R, dim=1)
    return functools.partial(_used_slot, site, idx, A_u, B_u, None if bool(mask.all()) else mask)


def _token_slot(
    entries: tuple[tuple[int, nn.Module, tuple[int, ...], torch.Tensor], ...],
    idx: torch.Tensor,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    """Trainable tokens per sample: the samples of adapter ``k`` get the module's output with ``k``'s rows."""
    result = out
    for k, owner, indices, rows in entries:
        weight = with_rows(owner.weight, indices, rows)  # type: ignore[arg-type]
        out_k = override_slot({"weight": weight})(module, args, kwargs, out)
        if out_k.shape[:1] != idx.shape:
            raise ConfigError(
                f"per-sample adapters: a module with trainable tokens gave an output of shape {tuple(out_k.shape)},"
                f" but adapter_index has {idx.shape[0]} entries; the batch must be the first dimension"
            )
        result = torch.where((idx == k).view(-1, *([1] * (out.dim() - 1))), out_k, result)
    return result


def _is_transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (its values cannot be read in Python)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def _as_index(stack: AdapterStack, adapter_index: torch.Tensor | Sequence[str]) -> torch.Tensor:
    if isinstance(adapter_index, torch.Tensor):
        idx = adapter_index
        if idx.dim() != 1 or idx.dtype not in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
            raise ConfigError(
                f"adapter_index must be a 1-D integer tensor (one entry per sample), got"
                f" {idx.dtype} of shape {tuple(idx.shape)}"
            )
        if not _is_transformed(idx) and idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < -1 or hi >= len(stack.names):
                raise ConfigError(
                    f"adapter_index entries must be in [-1, {len(stack.names) - 1}] (-1: no adapter),"
                    f" got values from {lo} to {hi}"
                )
        idx = idx.long()
    else:
        idx = index_of(stack.names, adapter_index)
    return torch.remainder(idx, len(stack.names) + 1)  # -1 -> K, the zero "no adapter" row


def mixed_routes(model: nn.Module, stack: AdapterStack, adapter_index: torch.Tensor | Sequence[str]) -> Routes:
    """The routes of one per-sample call (slots installed); run the model under :func:`functuner.routing.routed`."""
    idx = _as_index(stack, adapter_index)
    readable = not _is_transformed(idx) and not torch.compiler.is_compiling()
    used = sorted(set(idx.tolist()) - {len(stack.names)}) if readable else None  # rows of the batch's adapters
    fwd: dict[nn.Module, list[Any]] = {}
    for site in stack.sites:
        if site.dropout > 0 and site.module.training:
            raise ConfigError(
                f"per-sample adapters run without dropout, but module {site.name!r} is in training"
                f" mode with lora_dropout={site.dropout}; call model.eval()"
            )
        device = site.A.device
        fwd.setdefault(site.module, []).append(_site_slot(site, idx.to(device), used))
    for module, entries in stack.tokens:  # before the module's LoRA slot (a tied lm_head may carry both)
        fwd.setdefault(module, []).insert(0, functools.partial(_token_slot, entries, idx.to(entries[0][3].device)))
    ensure_slots(list(fwd))
    return Routes(forward=fwd)


def apply_mixed(
    model: nn.Module,
    adapters: AdapterStack | SubBatchStack | Sequence[TunerParams] | Mapping[str, TunerParams],
    adapter_index: torch.Tensor | Sequence[str],
    args: Any = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Run ``model(*args, **kwargs)`` with sample ``b`` of the batch using adapter ``adapter_index[b]``.

    Equals running each sample alone through :func:`functuner.apply` with its
    own adapter (or the bare model for ``-1`` / ``'__base__'``), in one
    forward.  Pure; see the module docstring for what is supported.
    """
    if not isinstance(args, tuple):
        args = (args,)
    routes = _dispatch(model, adapters, adapter_index)
    with routed(routes):
        return model(*args, **dict(kwargs or {}))


# ---------------------------------------------------------------------------
# the Tuner.per_sample hook (what the SWIFT shim's adapter_names= uses)
# ---------------------------------------------------------------------------
def _not_stackable(params: TunerParams, layout: Any) -> str | None:
    """Why these LoRA params cannot be stacked (then :mod:`..sub_batch` runs them per sample), or None."""
    if layout.overrides:
        return (
            "has modules_to_save copies or biases of non-adapted modules; stacked per-sample LoRA supports LoRA"
            " factors (and biases of adapted modules) only"
        )
    for site in layout.sites:
        if site.kind in PARAM_KINDS:
            return (
                f"stacked per-sample LoRA does not support LoRA on raw parameters ({type(site.module).__name__}"
                f" {site.name!r}, parameter {site.weight_name!r}: target_parameters or nn.MultiheadAttention)"
            )
        if site.variant is not None:
            return f"stacked per-sample LoRA does not support the LoRA variant {site.variant.name} ({site.name!r})"
        if site.kind == "conv" and getattr(site.module, "groups", 1) != 1:
            return (
                f"stacked per-sample LoRA does not support grouped convolutions ({site.name!r}:"
                f" {type(site.module).__name__} with groups={getattr(site.module, 'groups', 1)})"
            )
    return None


def _unsupported(model: nn.Module, params: TunerParams) -> str | None:
    """Why ``params`` cannot be stacked (completes "it ..."; the general sub-batch path may still run it), or None."""
    return _not_stackable(params, layout_of(model, params))


def _dispatch(
    model: nn.Module,
    adapters: AdapterStack | SubBatchStack | Sequence[TunerParams] | Mapping[str, TunerParams],
    adapter_index: torch.Tensor | Sequence[str],
) -> Routes:
    """One call's routes: the stacked LoRA path where every adapter can use it, else the general sub-batch path."""
    if isinstance(adapters, AdapterStack):
        return mixed_routes(model, adapters, adapter_index)
    if isinstance(adapters, SubBatchStack):
        return sub_batch.routes(model, adapters, adapter_index)
    named = dict(_named(adapters))
    impl = sub_batch.choose_per_sample(model, named)
    return impl.routes(model, impl.stack(model, named), adapter_index)


def _depends_on(model: nn.Module, params: TunerParams) -> list[torch.Tensor]:
    """Tensors besides the params' own that a stack reads: DoRA's scale reads each adapted module's base weight."""
    if not getattr(params.config, "use_dora", False):
        return []
    weights = (getattr(site.module, "weight", None) for site in layout_of(model, params).sites)
    return [w for w in weights if isinstance(w, torch.Tensor)]


PER_SAMPLE = PerSample(
    kind="LoRA", unsupported=_unsupported, stack=stack_adapters, routes=mixed_routes, depends_on=_depends_on
)
