"""Optimizers as pure gradient transformations over ``{name: tensor}`` pytrees (optax's shape).

A :class:`GradientTransformation` is a pair of pure functions:

* ``init(params) -> state``
* ``update(grads, state, params) -> (updates, state)``

``updates`` are the deltas to add to the parameters (:func:`apply_updates`); nothing is modified in
place, so a ``torch.func`` training loop keeps its old parameters and old state if it wants them.
The params pytree is a plain ``{name: tensor}`` mapping or a :class:`~functuner.TunerParams`; the
updates come back in the same container type.  Every transformation here keeps its state as a
``{name: per-tensor state}`` dict, which is what lets :func:`resync_state` follow a pytree whose set
of leaves changes over time (LISA's layer switches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import torch

from ..core.params import TunerParams

__all__ = ["GradientTransformation", "apply_updates", "resync_state", "rebuild_like"]

Tree = TypeVar("Tree", bound=Mapping[str, torch.Tensor])


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``, both pure."""

    init: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]]
    update: Callable[
        [Mapping[str, torch.Tensor], Mapping[str, Any], Mapping[str, torch.Tensor] | None],
        tuple[Mapping[str, torch.Tensor], dict[str, Any]],
    ]


def rebuild_like(like: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``tensors`` in the container type of ``like``: a :class:`TunerParams` keeps its config and adapter name."""
    if isinstance(like, TunerParams):
        return TunerParams(tensors, like.config, like.adapter_name)
    return dict(tensors)


def apply_updates(params: Tree, updates: Mapping[str, torch.Tensor]) -> Tree:
    """``params + updates`` leaf by leaf (new tensors; same container type as ``params``).

    Leaves of ``params`` without an update are kept as they are, so a full-model dict can take the
    updates of a sub-pytree (LISA's trainable layers, GaLore's targets).
    """
    new = {name: (t + updates[name].to(t.dtype) if name in updates else t) for name, t in params.items()}
    return rebuild_like(params, new)  # type: ignore[return-value]


def resync_state(
    transform: GradientTransformation, state: Mapping[str, Any] | None, params: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """The state for a pytree whose leaves changed: keep the entries of leaves still present, init new ones.

    This is LISA's optimizer-state rebuild in functional form (the reference drops the optimizer state
    of the layers it deactivates and lets the optimizer create fresh state for the new ones).
    ``state=None`` is the same as ``transform.init(params)``.
    """
    if state is None:
        return transform.init(params)
    missing = {name: t for name, t in params.items() if name not in state}
    fresh = transform.init(missing) if missing else {}
    return {name: (state[name] if name in state else fresh[name]) for name in params}
