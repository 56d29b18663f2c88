"""Small helpers for training tuner params with ``torch.distributed`` (DDP-style and under FSDP2).

functuner does not bring its own distributed engine.  Tuner params are a
pytree of ordinary tensors, so data parallelism is PyTorch's own collectives:

* :func:`all_reduce_grads` averages a gradient pytree over the ranks (what
  ``DistributedDataParallel`` does to ``.grad``), packing every leaf of one
  dtype into a single flat bucket so each step costs one collective per dtype.
* :func:`average_grads_` does the same in place on parameters' ``.grad``
  (eager training without a ``DistributedDataParallel`` wrapper).
* :func:`broadcast_params` makes every rank hold rank ``src``'s params.
* :func:`run_on_rank0` / :func:`save_params_on_rank0` write a checkpoint (SWIFT's
  layout, via :mod:`functuner.io.checkpoint`) from rank 0 only while the other
  ranks wait; a failure on rank 0 is raised on every rank (nobody hangs).
  :func:`load_params` reads it on every rank.
* :func:`gather_params` gathers params sharded by FSDP2 (a ``SwiftModel``'s adapter
  parameters under ``fully_shard``) into whole tensors, e.g. to save them from rank 0.
* :func:`merge_sharded` folds an adapter into base weights that
  ``torch.distributed.fsdp.fully_shard`` has sharded into DTensors, gathering
  one adapted module's weights at a time and returning them re-sharded with the
  original placements (or whole, with ``full=True``).

Every helper works without an initialised process group (world size 1): it
then does no communication and returns its input's values.  Apart from
:func:`average_grads_` (in place, as its name says), none of them writes to
the tensors it is given; results are new tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar, cast

import torch
import torch.distributed as dist
import torch.utils._pytree as torch_pytree
from torch import nn

from .core.params import TunerParams
from .errors import CheckpointError, ParamsMismatchError
from .functional import as_params_list
from .functional import merge as _merge

__all__ = [
    "all_reduce_grads",
    "average_grads_",
    "broadcast_params",
    "gather_params",
    "is_sharded",
    "load_params",
    "merge_sharded",
    "rank_and_world",
    "run_on_rank0",
    "save_params_on_rank0",
]

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

T = TypeVar("T")


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# ---------------------------------------------------------------------------
# bucketed collectives over pytrees
# ---------------------------------------------------------------------------
def _buckets(leaves: list[Any]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """Indices of tensor leaves grouped by (dtype, device): one flat bucket each."""
    out: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            out.setdefault((leaf.dtype, leaf.device), []).append(i)
    return out


def _bucketed(tree: T, collective: Callable[[torch.Tensor], None]) -> T:
    """Run ``collective`` in place on one flat copy per (dtype, device) of ``tree``'s tensor leaves.

    Returns a pytree of the same structure whose tensor leaves are views into
    the reduced buckets (new storage: the input tensors are never written).
    Non-tensor leaves (``None``...) pass through.
    """
    leaves, spec = torch_pytree.tree_flatten(tree)
    new = list(leaves)
    for idx in _buckets(leaves).values():
        parts = [leaves[i].detach().reshape(-1) for i in idx]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        collective(flat)
        for i, chunk in zip(idx, flat.split([p.numel() for p in parts]), strict=True):
            new[i] = chunk.view(leaves[i].shape)
    return cast(T, torch_pytree.tree_unflatten(new, spec))


def all_reduce_grads(grads: T, group: Any = None, *, average: bool = True) -> T:
    """Sum (``average=False``) or mean over ``group`` of a gradient pytree.

    ``grads`` is any torch pytree of tensors: a :class:`TunerParams` from
    ``torch.func.grad``, a dict, a list of ``p.grad``...  Every rank must call
    this with the same structure, dtypes and shapes (a mismatch hangs or fails
    inside ``torch.distributed``, as with DDP).  One ``all_reduce`` per
    (dtype, device) bucket.  With equal local batch sizes and a mean loss, the
    averaged gradient equals the gradient of the mean loss over the global
    batch, which is what ``DistributedDataParallel`` computes.  Pure: returns
    new tensors (detached), the input is untouched.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return cast(T, torch_pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, grads))

    def reduce(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if average:
            flat.div_(world)

    return _bucketed(grads, reduce)


def average_grads_(parameters: Iterable[torch.Tensor], group: Any = None) -> None:
    """In place: every trainable parameter's ``.grad`` becomes its mean over ``group`` (DDP's reduction).

    For eager training of replicated parameters without ``DistributedDataParallel``
    (e.g. parameters kept out of FSDP2 with ``ignored_params``; a ``SwiftModel`` under
    plain ``fully_shard`` needs none: FSDP2 averages its adapter gradients).  Parameters
    with ``requires_grad=False`` are skipped; a trainable parameter whose
    ``.grad`` is ``None`` counts as a zero gradient (and gets one), so every rank
    takes part in the same collectives.  Pass the same parameters in the same
    order on every rank.  One ``all_reduce`` per (dtype, device) bucket.
    """
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    averaged = all_reduce_grads(grads, group)
    with torch.no_grad():
        for p, g in zip(params, averaged, strict=True):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


def broadcast_params(params: T, src: int = 0, group: Any = None) -> T:
    """Every rank gets rank ``src``'s values of a params pytree (one broadcast per dtype bucket).

    ``src`` is a global rank, as in ``torch.distributed.broadcast``.  Use it
    after ``init`` when ranks might have drawn different numbers, or after
    loading a checkpoint on one rank only.  Pure: new (detached) tensors.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return cast(
            T, torch_pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, params)
        )
    return _bucketed(params, lambda flat: dist.broadcast(flat, src=src, group=group))


# ---------------------------------------------------------------------------
# checkpoints: written by rank 0, read by every rank
# ---------------------------------------------------------------------------
def run_on_rank0(fn: Callable[..., T], *args: Any, group: Any = None, **kwargs: Any) -> T | None:
    """Call ``fn(*args, **kwargs)`` on rank 0 of ``group`` only, then synchronise every rank.

    Returns ``fn``'s result on rank 0 and ``None`` elsewhere.  If ``fn`` raises
    on rank 0, every rank raises (rank 0 its own exception, the others a
    ``RuntimeError`` that says so), so no rank waits forever at a barrier.
    """
    rank, world = rank_and_world(group)
    if world == 1:
        return fn(*args, **kwargs)
    result: T | None = None
    error: BaseException | None = None
    if rank == 0:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised below, after telling the other ranks
            error = exc
    # a tensor flag, not broadcast_object_list (which pickles): rank 0 tells everyone whether fn failed
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    )
    failed = torch.tensor([1 if error is not None else 0], dtype=torch.int32, device=device)
    dist.broadcast(failed, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("run_on_rank0: the function failed on rank 0 (see rank 0's traceback)")
    return result


def save_params_on_rank0(params: TunerParams, save_directory: str | os.PathLike[str], group: Any = None) -> Path:
    """Write ``params`` in SWIFT's layout from rank 0 only; every rank returns once it is on disk.

    The adapter lands in ``save_directory/<adapter_name>/`` (``adapter_config.json``
    and ``adapter_model.safetensors``, what ``SwiftModel.save_pretrained`` and
    ms-swift write), through :func:`functuner.io.checkpoint.write_swift_adapter`:
    an atomic directory swap, so a crash never leaves half a checkpoint.  Call
    it on every rank (it contains a collective); returns the adapter folder.
    """
    from .io.checkpoint import write_swift_adapter

    if not isinstance(params, TunerParams):
        raise TypeError(f"save_params_on_rank0 expects TunerParams, got {type(params).__name__}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in params.items()}
    run_on_rank0(write_swift_adapter, save_directory, params.adapter_name, params.config, tensors, group=group)
    return Path(save_directory) / params.adapter_name


def load_params(
    save_directory: str | os.PathLike[str], like: TunerParams, *, device: torch.device | str | None = None
) -> TunerParams:
    """Read an adapter written by :func:`save_params_on_rank0` (on every rank; no collective, no unpickling).

    Reads ``save_directory/<like.adapter_name>/`` with
    :func:`functuner.io.checkpoint.read_adapter` (SWIFT or PEFT layout).  ``like``
    supplies the expected config, names, shapes and dtypes: anything that
    differs raises :class:`~functuner.errors.CheckpointError` naming the folder
    and what differs.  Tensors go to ``device`` (default: where ``like``'s are).
    """
    from .io.checkpoint import read_adapter

    folder = Path(save_directory) / like.adapter_name
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such adapter folder")
    loaded = read_adapter(folder, like.adapter_name)
    if loaded.config != like.config:
        ours = like.config.to_dict() if hasattr(like.config, "to_dict") else {}
        theirs = loaded.config.to_dict() if hasattr(loaded.config, "to_dict") else {}
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise CheckpointError(
            f"{folder}: config differs from the expected one in {diff or type(loaded.config).__name__}"
        )
    missing, unexpected = sorted(set(like) - set(loaded.state)), sorted(set(loaded.state) - set(like))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: keys differ from the expected params: missing {missing}, unexpected {unexpected}"
        )
    for k, ref in like.items():
        got = loaded.state[k]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise CheckpointError(
                f"{folder}: {k!r} is {got.dtype} {tuple(got.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
            )
    out = {k: loaded.state[k].to(device if device is not None else like[k].device) for k in like}
    return TunerParams(out, like.config, like.adapter_name)


# ---------------------------------------------------------------------------
# merge over FSDP2-sharded weights
# ---------------------------------------------------------------------------
def _is_dtensor(t: Any) -> TypeGuard[DTensor]:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (e.g. after ``fully_shard``)."""
    return any(_is_dtensor(p) for p in model.parameters())


def gather_params(params: TunerParams) -> TunerParams:
    """``params`` with every DTensor gathered whole (``full_tensor()``), detached; other tensors as they are.

    For a ``SwiftModel`` under plain ``fully_shard``, whose adapter parameters FSDP2 shards with their layer:
    ``full = gather_params(swift.adapters["default"].params)`` on **every** rank (a collective, in the
    params' key order), then ``save_params_on_rank0(full, directory)``.  Without DTensors no communication.
    """
    return params.map(lambda t: (t.full_tensor() if _is_dtensor(t) else t).detach())


def _owner(key: str, module_names: set[str]) -> str:
    """The longest module name of the model that prefixes ``key`` (``""``: the root)."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        cand = ".".join(parts[:n])
        if cand in module_names:
            return cand
    return ""


def merge_sharded(
    model: nn.Module, params: TunerParams | list[TunerParams], *, full: bool = False
) -> dict[str, torch.Tensor]:
    """:func:`functuner.merge` for a model whose weights ``fully_shard`` turned into DTensors.

    Returns ``{name: tensor}`` for the model's parameters and buffers (every
    tied name).  Entries the adapter does not touch are the model's own
    tensors (still sharded DTensors, never gathered).  Each adapted module's
    weights are gathered with ``DTensor.full_tensor()`` one module at a time,
    merged in fp32 exactly as :func:`functuner.merge` does (rounded once), and
    then either re-sharded with the original mesh and placements (default; each
    rank keeps only its shard, no further communication since every rank
    computed the same values) or returned whole (``full=True``, for export).

    Peak extra memory per rank: the full weights of one adapted module plus
    their merged copy.  Collective: call on every rank, with the same params.
    Pure: the model and the params are not written.  Works unsharded too
    (then it is :func:`functuner.merge`).
    """
    from torch.distributed.tensor import distribute_tensor

    state: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    module_names = {n for n, _ in model.named_modules()}
    out = dict(state)
    for p in as_params_list(params):
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in p.items():
            groups.setdefault(_owner(key, module_names), {})[key] = tensor
        for owner in sorted(groups):
            sub = TunerParams(groups[owner], p.config, p.adapter_name)
            prefix = owner + "." if owner else ""
            local_keys = [k for k in out if k.startswith(prefix)] if owner else list(out)
            gathered: dict[int, torch.Tensor] = {}  # id(original) -> full tensor, so ties stay ties
            base: dict[str, torch.Tensor] = {}
            for k in local_keys:
                t = out[k]
                if id(t) not in gathered:
                    gathered[id(t)] = t.full_tensor() if _is_dtensor(t) else t
                base[k] = gathered[id(t)]
            try:
                merged = _merge(model, sub, base=base)
            except KeyError as exc:
                raise ParamsMismatchError(f"merge_sharded: module {owner!r} lacks {exc}") from None
            for k in local_keys:
                new = merged[k]
                if new is base[k]:
                    continue  # untouched: keep the (sharded) original
                old = out[k]
                if _is_dtensor(old) and not full:
                    new = distribute_tensor(new.to(old.dtype), old.device_mesh, old.placements, src_data_rank=None)
                for alias, t in list(out.items()):  # tied names outside this module follow
                    if t is old:
                        out[alias] = new
    return out
