"""``torch.func`` helpers over tuner params: per-sample gradients (the basis of DP-SGD)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

__all__ = ["per_sample_grads"]


def per_sample_grads(
    loss_fn: Callable[..., torch.Tensor],
    params: Any,
    *batch: Any,
    chunk_size: int | None = None,
    randomness: str = "error",
) -> Any:
    """Gradient of ``loss_fn(params, *sample)`` for every sample of ``batch``, in one vmapped call.

    ``loss_fn(params, *tensors)`` receives each sample with a leading batch
    dimension of 1 (so a model sees ordinary shapes) and returns a scalar.
    Every tensor in ``batch`` is split along dim 0.  Returns a pytree shaped
    like ``params`` whose leaves have a leading batch dimension: the same
    numbers as looping over samples, computed as
    ``vmap(grad(loss), in_dims=(None, 0, ...))``.  Pure.
    """

    def one(p: Any, *sample: Any) -> torch.Tensor:
        sample = torch_pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
        return loss_fn(p, *sample)

    in_dims = (None,) + (0,) * len(batch)
    return torch.func.vmap(torch.func.grad(one), in_dims=in_dims, chunk_size=chunk_size, randomness=randomness)(
        params, *batch
    )
