"""Per-sample adapters for any tuner whose routes are module-local: each module runs each adapter on its sub-batch.

LoRA has a fast per-sample path (:mod:`functuner.tuners.lora.mixed`: factors stacked once, two batched matmuls,
no loop over adapters).  Everything else that can run per sample runs here, the way PEFT's
``_mixed_batch_forward`` does: at every module some adapter in the batch adapts, the samples are grouped by
adapter, each group's rows of the module's inputs and output are taken, that adapter's own slot functions
(the ones :func:`functuner.apply` would run) compute the group's output, and the groups are put back in
batch order (one ``torch.cat`` and one ``index_select`` per module, so gradients and ``torch.func.vmap``
pass through).  The cost grows with the number of distinct adapters in a batch, not with the batch.

Which adapters can: a tuner opts in with its ``Tuner.sub_batch`` hook, a claim that every slot its routes
install reads only its own module's inputs and output (module-local) and keeps the batch as the first
dimension.  (IA)³, LoHa, LoKr, VeRA, FourierFT, OFT, BOFT, AdaLoRA and LoRA (all its variants, module types
and options, ``modules_to_save`` included) do.  Prompt tuning, P-tuning and prefix tuning do not: they
change the sequence (virtual tokens, past key-values) of the whole model, not one module.  Adapters that
draw random numbers in training mode (dropout, MonteCLoRA) need ``model.eval()``.  Adapters of different
tuners mix in one batch (sample 0 LoRA, sample 1 (IA)³).

Inputs: the batch must be the first dimension of every adapted module's input and output (as in PEFT), except
``nn.MultiheadAttention`` with ``batch_first=False`` (query/key/value and the output: dimension 1).  Other
tensor arguments whose first dimension is the batch size are split with the batch; the rest are shared.

Purity: the routes are per call and travel in the same context variable as :func:`functuner.apply`'s; the
model and the params are never written.  The groups are read from the adapter names in Python, so the
adapter index cannot itself be vmapped here (the inputs and the params can).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Replace, Routes
from ..errors import AdapterNameError, ConfigError
from .registry import REGISTRY, tuner_for
from .spec import CallContext, PerSample

__all__ = ["BASE", "SUB_BATCH", "SubBatchStack", "choose_per_sample", "per_sample_types", "why_not_per_sample"]

BASE = "__base__"  # PEFT's name for "no adapter"


class SubBatchStack(NamedTuple):
    """Adapters prepared for the general per-sample path: ``routes[i]`` are adapter ``names[i]``'s own routes."""

    names: tuple[str, ...]
    routes: tuple[Routes, ...]


def per_sample_types() -> list[str]:
    """SWIFT type names of the tuners that run per sample (for messages)."""
    return sorted(t.swift_type for t in REGISTRY.values() if t.sub_batch is not None or t.per_sample is not None)


def why_not_per_sample(model: nn.Module, params: TunerParams) -> str | None:
    """Why ``params`` cannot run on a sub-batch (completes "it ..."), or ``None``."""
    t = tuner_for(params.config)
    if t.sub_batch is None:
        return (
            f"is a {t.swift_type} adapter, and {t.swift_type} is not supported per sample: its routes are not"
            f" module-local (tuners that are: {'/'.join(per_sample_types())})"
        )
    why = t.sub_batch(model, params)
    if why is None and t.needs_generator(model, params):
        why = "draws random numbers in training mode (dropout or noise); call model.eval() for per-sample adapters"
    return why


def choose_per_sample(model: nn.Module, adapters: Mapping[str, TunerParams]) -> PerSample:
    """The per-sample implementation for these adapters: their tuner's own (LoRA's stacked path) where every one
    of them can use it, else the general sub-batch path; :class:`ConfigError` naming an adapter neither takes."""
    impls = {tuner_for(p.config).per_sample for p in adapters.values()}
    if len(impls) == 1 and (fast := next(iter(impls))) is not None:
        if all(fast.unsupported(model, p) is None for p in adapters.values()):
            return fast
    for name, p in adapters.items():
        why = why_not_per_sample(model, p)
        if why is not None:
            raise ConfigError(f"adapter {name!r} cannot run per sample: it {why}")
    return SUB_BATCH


def stack(model: nn.Module, adapters: Mapping[str, TunerParams]) -> SubBatchStack:
    """Each adapter's own routes (validated against ``model``), as ``functuner.apply`` builds them.  Pure."""
    for name, p in adapters.items():
        if name == BASE:
            raise AdapterNameError(f"adapter name {BASE!r} is reserved (it means no adapter)")
        why = why_not_per_sample(model, p)
        if why is not None:
            raise ConfigError(f"adapter {name!r} cannot run per sample: it {why}")
    ctx = CallContext()  # no generator: training-mode randomness is refused above
    return SubBatchStack(tuple(adapters), tuple(tuner_for(p.config).routes(model, p, ctx) for p in adapters.values()))


# ---------------------------------------------------------------------------
# one call's routes
# ---------------------------------------------------------------------------
class _Plan:
    """One module's groups: ``active[i] = (rows, slot functions)`` per adapter with slots there; ``rest`` the
    other rows (or None); ``inverse`` puts ``cat(active rows..., rest)`` back in batch order."""

    __slots__ = ("n", "active", "rest", "inverse", "_on")

    def __init__(self, n: int, active: list[tuple[torch.Tensor, Sequence[Any]]], rest: torch.Tensor | None) -> None:
        self.n = n
        self.active = active
        self.rest = rest
        order = torch.cat([r for r, _ in active] + ([rest] if rest is not None else []))
        self.inverse = torch.argsort(order)
        self._on: dict[torch.device, tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]] = {}

    def on(self, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """The index tensors on ``device`` (moved once per call and device)."""
        hit = self._on.get(device)
        if hit is None:
            rest = self.rest.to(device) if self.rest is not None else None
            hit = ([r.to(device) for r, _ in self.active], rest, self.inverse.to(device))
            self._on[device] = hit
        return hit


def _positions(stack: SubBatchStack, adapter_index: torch.Tensor | Sequence[str]) -> list[int]:
    """Each sample's adapter position (``-1``: no adapter)."""
    if isinstance(adapter_index, torch.Tensor):
        if torch._C._functorch.is_functorch_wrapped_tensor(adapter_index):
            raise ConfigError(
                "per-sample adapters of this kind group the batch by adapter in Python, so adapter_index cannot"
                " be transformed (vmapped or traced); pass a plain tensor or a list of names"
            )
        if adapter_index.dim() != 1 or adapter_index.is_floating_point() or adapter_index.is_complex():
            raise ConfigError(
                f"adapter_index must be a 1-D integer tensor (one entry per sample), got"
                f" {adapter_index.dtype} of shape {tuple(adapter_index.shape)}"
            )
        pos = [int(v) for v in adapter_index.tolist()]
        bad = [v for v in pos if not -1 <= v < len(stack.names)]
        if bad:
            raise ConfigError(
                f"adapter_index entries must be in [-1, {len(stack.names) - 1}] (-1: no adapter), got {bad[:4]}"
            )
        return pos
    if isinstance(adapter_index, str):
        raise TypeError("adapter_names must be a list with one name per sample, got a single string")
    where = {n: i for i, n in enumerate(stack.names)}
    where[BASE] = -1
    unknown = sorted({n for n in adapter_index if n not in where})
    if unknown:
        raise AdapterNameError(
            f"unknown adapter(s) {unknown} in adapter_names; known: {list(stack.names)} and {BASE!r}"
        )
    return [where[n] for n in adapter_index]


def routes(model: nn.Module, stack: SubBatchStack, adapter_index: torch.Tensor | Sequence[str]) -> Routes:
    """The routes of one per-sample call: sample ``b`` runs adapter ``adapter_index[b]`` (names or positions)."""
    pos = _positions(stack, adapter_index)
    n = len(pos)
    rows = {k: torch.tensor([b for b, v in enumerate(pos) if v == k], dtype=torch.long) for k in dict.fromkeys(pos)}
    present = [k for k in rows if k >= 0]
    fwd: dict[Any, list[Any]] = {}
    pre: dict[Any, list[Any]] = {}
    for table, out, make in (("forward", fwd, _forward_slot), ("pre", pre, _pre_slot)):
        tables = {k: getattr(stack.routes[k], table) for k in present}
        for m in dict.fromkeys(m for k in present for m in tables[k]):
            active = [(k, fns) for k in present if (fns := tables[k].get(m))]
            done = {k for k, _ in active}
            left = [rows[k] for k in rows if k not in done]
            if not left and len(active) == 1:  # one adapter has every sample here: its own slots, and a batch check
                out[m] = [*active[0][1], functools.partial(_check_forward if table == "forward" else _check_pre, n)]
                continue
            plan = _Plan(n, [(rows[k], fns) for k, fns in active], torch.cat(left) if left else None)
            out[m] = [functools.partial(make, plan)]
    return Routes(forward=fwd, pre=pre)


# ---------------------------------------------------------------------------
# taking and putting back the rows of one group
# ---------------------------------------------------------------------------
def _batch_first(module: Any) -> bool:
    return not isinstance(module, nn.MultiheadAttention) or bool(module.batch_first)


_MHA_SEQ = ("query", "key", "value")


def _arg_dims(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], n: int) -> tuple[list[int | None], Any]:
    """Each tensor leaf of ``(args, kwargs)``: the dimension to split along (None: shared), and the tree spec."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    if _batch_first(module):
        first = next((t for t in leaves if isinstance(t, torch.Tensor)), None)
        if first is None or first.dim() == 0 or first.shape[0] != n:
            shape = None if first is None else tuple(first.shape)
            raise ConfigError(
                f"per-sample adapters: a {type(module).__name__} got an input of shape {shape}, but the batch has"
                f" {n} samples; the batch must be the first dimension of every adapted module's input"
            )
        return [0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else None for t in leaves], spec
    # nn.MultiheadAttention(batch_first=False): query/key/value (L, N, E); key_padding_mask (N, S); attn_mask shared
    names = list(_MHA_SEQ) + ["key_padding_mask", "need_weights", "attn_mask"]
    bound = dict(zip(names, args, strict=False)) | kwargs
    mask = bound.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        raise ConfigError(
            "per-sample adapters: nn.MultiheadAttention got a 3-D attn_mask (batch x heads folded together);"
            " pass a 2-D attn_mask or key_padding_mask"
        )
    q = bound.get("query")
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[1] != n:
        raise ConfigError(
            f"per-sample adapters: nn.MultiheadAttention(batch_first=False) needs a batched (L, N, E) query with"
            f" N={n}, got shape {None if q is None else tuple(q.shape)}"
        )
    dims: dict[int, int | None] = {id(bound[k]): 1 for k in _MHA_SEQ if isinstance(bound.get(k), torch.Tensor)}
    if isinstance(bound.get("key_padding_mask"), torch.Tensor):
        dims[id(bound["key_padding_mask"])] = 0
    return [dims.get(id(t)) for t in leaves], spec


def _check_forward(n: int, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    _arg_dims(module, args, kwargs, n)
    return out


def _check_pre(n: int, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    _arg_dims(module, args, kwargs, n)
    return args, kwargs


def _take(t: Any, dim: int | None, idx: torch.Tensor) -> Any:
    return t if dim is None else t.index_select(dim, idx)


def _out_dims(module: Any, out: Any) -> tuple[list[Any], list[int | None], Any]:
    leaves, spec = pytree.tree_flatten(out)
    if _batch_first(module):
        return leaves, [0 if isinstance(t, torch.Tensor) else None for t in leaves], spec
    return leaves, [1 if i == 0 else 0 if isinstance(t, torch.Tensor) else None for i, t in enumerate(leaves)], spec


def _put_back(pieces: list[list[Any]], dims: list[int | None], inverse: torch.Tensor, whole: list[Any]) -> list[Any]:
    """Leaf ``j`` of every group, concatenated along its batch dimension and put back in batch order."""
    out = []
    for j, d in enumerate(dims):
        if d is None:
            out.append(whole[j])
        else:
            out.append(torch.cat([p[j] for p in pieces], dim=d).index_select(d, inverse))
    return out


def _forward_slot(plan: _Plan, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    arg_dims, arg_spec = _arg_dims(module, args, kwargs, plan.n)
    arg_leaves = pytree.tree_leaves((args, kwargs))
    out_leaves, out_dims, out_spec = _out_dims(module, out)
    device = next(t for t, d in zip(arg_leaves, arg_dims, strict=True) if d is not None).device
    idxs, rest, inverse = plan.on(device)
    pieces: list[list[Any]] = []
    for idx, (_, fns) in zip(idxs, plan.active, strict=True):
        sub_args, sub_kwargs = pytree.tree_unflatten(
            [_take(t, d, idx) for t, d in zip(arg_leaves, arg_dims, strict=True)], arg_spec
        )
        if isinstance(fns[0], Replace):  # a method slot's replacement (LoRA on raw parameters): computes the output
            sub_out, fns = fns[0].fn(module, sub_args, sub_kwargs), fns[1:]
        else:
            sub_out = pytree.tree_unflatten(
                [_take(t, d, idx) for t, d in zip(out_leaves, out_dims, strict=True)], out_spec
            )
        for fn in fns:
            sub_out = fn(module, sub_args, sub_kwargs, sub_out)
        got = pytree.tree_leaves(sub_out)
        if len(got) != len(out_leaves):
            raise ConfigError(
                f"per-sample adapters: an adapter changed the structure of a {type(module).__name__}'s output"
            )
        pieces.append(got)
    if rest is not None:
        pieces.append([_take(t, d, rest) for t, d in zip(out_leaves, out_dims, strict=True)])
    return pytree.tree_unflatten(_put_back(pieces, out_dims, inverse, out_leaves), out_spec)


def _pre_slot(plan: _Plan, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    dims, spec = _arg_dims(module, args, kwargs, plan.n)
    leaves = pytree.tree_leaves((args, kwargs))
    device = next(t for t, d in zip(leaves, dims, strict=True) if d is not None).device
    idxs, rest, inverse = plan.on(device)
    pieces: list[list[Any]] = []
    for idx, (_, fns) in zip(idxs, plan.active, strict=True):
        sub = cast(
            tuple[Any, Any], pytree.tree_unflatten([_take(t, d, idx) for t, d in zip(leaves, dims, strict=True)], spec)
        )
        for fn in fns:
            sub = fn(module, *sub)
        got = pytree.tree_leaves(sub)
        if len(got) != len(leaves) or any(d is None and g is not t for g, t, d in zip(got, leaves, dims, strict=True)):
            raise ConfigError(
                f"per-sample adapters: an adapter changed a {type(module).__name__}'s inputs beyond the batch rows"
                " (a shared argument or the argument structure); it cannot run on a sub-batch"
            )
        pieces.append(got)
    if rest is not None:
        pieces.append([_take(t, d, rest) for t, d in zip(leaves, dims, strict=True)])
    return pytree.tree_unflatten(_put_back(pieces, dims, inverse, leaves), spec)


SUB_BATCH = PerSample(kind="sub-batch", unsupported=why_not_per_sample, stack=stack, routes=routes)
