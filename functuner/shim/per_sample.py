"""Per-sample adapters through the shim (PEFT's ``adapter_names=``): checks, routes and a stack cache.

Design note: how a tuner runs a different adapter for each sample is the tuner's
business, declared by its optional hooks: ``Tuner.per_sample`` (a fast path of its
own, :class:`functuner.tuners.base.PerSample`; LoRA's stacked factors) and
``Tuner.sub_batch`` (the general path of :mod:`functuner.tuners.sub_batch`: each
adapter runs on the sub-batch of its samples; adapters of different tuners mix).
:func:`functuner.tuners.sub_batch.choose_per_sample` picks one for a call; a tuner with
neither hook is "not supported per sample" and every message says so by its
SWIFT type.  This module owns what is stateful about it: checking a call
against the shim's state (unknown names, training mode, merged or offloaded
adapters, active adapters that would be skipped), and caching the stacked
adapters between calls.

The cache is scoped to the shim's own objects, never a process-wide hook: an
entry records, for every tensor a stack reads (the adapters' tensors plus what
the hook's ``depends_on`` names), its storage, version counter, dtype and
device, so replaced tensors and in-place writes are seen; and for tensors an
optimizer can step (``requires_grad`` or a ``.grad``) a copy of their values,
compared on the next call, because fused optimizers write without bumping
version counters.  Frozen (inference) adapters cost no copy and no comparison.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.routing import Routes
from ..errors import AdapterNameError, ConfigError
from ..tuners import SUB_BATCH, choose_per_sample, per_sample_types, why_not_per_sample
from ..tuners.base import PerSample
from .state import AdapterEntry, ShimState

__all__ = ["BASE", "batch_size", "check_batch", "expanded_for_generate", "mixed_routes", "names_list"]

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


class StackEntry(NamedTuple):
    """A cached stack of every usable adapter of one per-sample implementation, and what it was built from.

    ``keepalive`` holds the watched tensors' storages, so a storage address in
    ``key`` cannot be reused by a new tensor while the entry exists;
    ``snapshots`` pairs each optimizer-steppable watched tensor with a copy of
    its values at build time.
    """

    impl: PerSample
    key: tuple[Any, ...]
    stack: Any
    keepalive: tuple[torch.Tensor, ...]
    snapshots: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def names_list(adapter_names: Any) -> list[str]:
    """``adapter_names`` as a list; a bare string or non-sequence raises ``TypeError``."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(
            f"adapter_names must be a list with one adapter name per sample, got {type(adapter_names).__name__}"
        )
    return list(adapter_names)


def batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    """The batch size of a call: the first dimension of its main input tensor (None if there is none)."""
    for v in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("pixel_values")):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return None


def check_batch(names: Sequence[str], batch: int | None) -> None:
    if batch is not None and len(names) != batch:
        raise ConfigError(
            f"adapter_names has {len(names)} entries but the batch has {batch} samples;"
            " give one adapter name per sample"
        )


def expanded_for_generate(
    model: nn.Module, adapter_names: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> list[str]:
    """``generate``'s per-sample names: each prompt's name repeated for its beams / returned sequences (as PEFT)."""
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    copies = max(
        int(kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1),
        int(kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1),
    )
    names = names_list(adapter_names)
    check_batch(names, batch_size(args, kwargs))
    if copies > 1 and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ConfigError(
            "generate(adapter_names=...) with num_beams / num_return_sequences > 1 is not"
            " supported for encoder-decoder models (the encoder runs on the unexpanded batch)"
        )
    return [n for n in names for _ in range(copies)]


def _supports(adapter: AdapterEntry) -> bool:
    """Whether ``adapter``'s tuner runs per sample at all (its own fast path or the general sub-batch path)."""
    return adapter.tuner.per_sample is not None or adapter.tuner.sub_batch is not None


def _why_not(state: ShimState, adapter: AdapterEntry, impl: PerSample | None = None) -> str | None:
    """Why ``adapter`` cannot run per sample (in a call using ``impl``; None: in any), completing "it ...", or None."""
    if not _supports(adapter):
        return (
            f"is a {adapter.swift_type} adapter, and {adapter.swift_type} is not supported per sample"
            f" (tuners that are: {'/'.join(per_sample_types())})"
        )
    if adapter.offload is not None:
        return f"is offloaded to {adapter.offload!r}; call activate_adapter({adapter.name!r}) first"
    own = adapter.tuner.per_sample
    if own is not None and (impl is own or adapter.tuner.sub_batch is None):
        return own.unsupported(state.model, adapter.params)
    return why_not_per_sample(state.model, adapter.params)


def mixed_routes(state: ShimState, adapter_names: Any, batch: int | None) -> Routes:
    """Routes of one ``adapter_names=`` call: sample ``b`` runs adapter ``adapter_names[b]``.

    ``'__base__'`` means no adapter.  Adapters of different tuners may share a batch.  Checks everything
    before any forward runs; the model and the shim's adapters are never written (the routes are per call).
    """
    names = names_list(adapter_names)
    check_batch(names, batch)
    wanted = [n for n in dict.fromkeys(names) if n != BASE]
    unknown = [n for n in wanted if n not in state.adapters]
    if unknown:
        raise AdapterNameError(
            f"unknown adapter(s) {unknown} in adapter_names; have {sorted(state.adapters)} and {BASE!r} (no adapter)"
        )
    if state.model.training:  # as PEFT: dropout, checkpoint recomputation and the like are per-call state
        raise ConfigError("adapter_names cannot be used while the model is in training mode; call model.eval()")
    if state.merged:
        raise ConfigError(
            f"adapter(s) {state.merged} are merged into the base weights, so every sample would"
            " get them; call Swift.unmerge(model) before using adapter_names"
        )
    skipped = sorted(n for n in state.active_set() if not _supports(state.adapters[n]))
    if skipped:
        types = ", ".join(f"{n}: {state.adapters[n].swift_type}" for n in skipped)
        raise ConfigError(
            f"adapter_names runs adapters per sample, but adapter(s) {skipped} that cannot run per sample are"
            f" active and would be skipped ({types}: not supported per sample); deactivate them first"
        )
    for n in wanted:
        why = _why_not(state, state.adapters[n])
        if why is not None:
            raise ConfigError(f"adapter {n!r} cannot be used in adapter_names: it {why}")
    if not wanted:
        return Routes()  # every sample runs the base model
    impl = choose_per_sample(state.model, {n: state.adapters[n].params for n in wanted})
    return impl.routes(state.model, _stack(state, impl, wanted), names)


def _mine(state: ShimState, impl: PerSample) -> list[AdapterEntry]:
    """The adapters a stack of ``impl`` may hold."""
    general = impl is SUB_BATCH
    return [a for a in state.adapters.values() if a.tuner.per_sample is impl or (general and _supports(a))]


def _watched(state: ShimState, impl: PerSample, adapter: AdapterEntry) -> list[torch.Tensor]:
    """Tensors a stacked adapter depends on: its own, plus what the tuner says its stack reads (unless offloaded)."""
    if adapter.offload is not None:  # never stacked; its placeholders are no params to ask the tuner about
        return list(adapter.tensors.values())
    return [*adapter.tensors.values(), *impl.depends_on(state.model, adapter.params)]


def _key(state: ShimState, impl: PerSample, adapters: Sequence[AdapterEntry]) -> tuple[Any, ...]:
    """What a stack of ``adapters`` depends on: names, configs, offload state, each tensor's storage and version."""
    parts: list[Any] = []
    for a in adapters:
        parts += (a.name, a.config, a.offload)
        for t in _watched(state, impl, a):
            parts += (t.data_ptr(), t._version, t.dtype, t.device)
    return tuple(parts)


def _fresh(entry: StackEntry, impl: PerSample, key: tuple[Any, ...]) -> bool:
    if entry.impl is not impl or entry.key != key:
        return False
    with torch.no_grad():
        return all(torch.equal(t, copy) for t, copy in entry.snapshots)


def _stack(state: ShimState, impl: PerSample, wanted: Sequence[str]) -> Any:
    """The stacked adapters: cached (built without autograd) unless gradients must reach the adapters.

    With grad mode on and adapter tensors that require grad, a differentiable
    stack of just ``wanted`` is built for this call (not cached).
    """
    model = state.model
    if torch.is_grad_enabled() and any(t.requires_grad for n in wanted for t in state.adapters[n].tensors.values()):
        return impl.stack(model, {n: state.adapters[n].params for n in wanted})
    mine = _mine(state, impl)
    key = _key(state, impl, mine)
    entry = state.mixed
    if isinstance(entry, StackEntry) and _fresh(entry, impl, key):
        return entry.stack
    usable = [a for a in mine if _why_not(state, a, impl) is None]
    watched = [t for a in mine for t in _watched(state, impl, a)]
    with torch.no_grad():
        stack = impl.stack(model, {a.name: a.params for a in usable})
        steppable = {id(t): t for t in watched if t.requires_grad or t.grad is not None}
        snapshots = tuple((t, t.detach().clone()) for t in steppable.values())
    state.mixed = StackEntry(impl, key, stack, tuple(t.detach() for t in watched), snapshots)
    return stack
