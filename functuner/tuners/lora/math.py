"""LoRA's weight arithmetic on plain tensors: the delta ``s B A``, DoRA row norms, weight orientation.

Everything here is a pure function of tensors and a layer *kind* string
(``"linear"``, ``"conv1d_gpt2"``, ``"embedding"``, ``"conv"``): no module, no
model.  The forward (:mod:`.forward`), merge (:mod:`.merge`), per-sample
batches (:mod:`.mixed`), combination (:mod:`.combine`) and the streaming shard
merge (:mod:`functuner.io.merge_shards`) all compute with these, so they agree
bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F

__all__ = [
    "add_lowrank",
    "conv_fn",
    "dora_conv_delta",
    "dora_norm",
    "dora_row_norm_lowrank",
    "PARAM_KINDS",
    "lora_delta",
    "param_delta",
    "plus_delta",
    "weight_as_out_in",
]


PARAM_KINDS = ("param", "param_t")  # LoRA on a raw nn.Parameter (target_parameters); "param_t": 3-D, is_transposed


def param_delta(
    A: torch.Tensor, B: torch.Tensor, scaling: float, weight_shape: tuple[int, ...], kind: str
) -> torch.Tensor:
    """The change ``s B A`` of a parameter adapted through ``target_parameters``, in its shape, float32 (as PEFT).

    2-D parameter ``(d0, d1)``: ``A (r, d1)``, ``B (d0, r)``.  3-D fused experts
    ``(E, p, q)``: ``A (r E, q)`` and ``B (p, r E)`` (expert ``e`` owns rows
    ``e r .. e r + r`` of ``A`` and columns ``e, e + E, ...`` of ``B``), or, for
    a module with ``is_transposed`` (kind ``"param_t"``), ``A (r E, p)``, ``B (q, r E)``.
    """
    A32, B32 = A.float(), B.float()
    if len(weight_shape) == 2:
        return (B32 @ A32) * scaling
    E = int(weight_shape[0])
    a = A32.reshape(E, -1, A32.shape[-1])  # (E, r, in)
    b = B32.reshape(B32.shape[0], -1, E).permute(2, 0, 1)  # (E, out, r)
    delta = torch.bmm(b, a) * scaling  # (E, out, in)
    return delta.transpose(-2, -1) if kind == "param_t" else delta


def conv_fn(kernel_dims: int) -> Callable[..., torch.Tensor]:
    """``F.conv1d`` / ``F.conv2d`` / ``F.conv3d`` for a kernel with ``kernel_dims`` spatial dims."""
    return cast(Callable[..., torch.Tensor], (F.conv1d, F.conv2d, F.conv3d)[kernel_dims - 1])


def weight_as_out_in(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The base weight viewed as (out, in, ...) - the Linear convention."""
    if kind in ("conv1d_gpt2", "embedding"):
        return weight.T
    return weight


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, kind: str = "linear") -> torch.Tensor:
    """The full-size weight change ``s * B @ A`` in the base weight's own layout, in float32.

    Shapes: linear ``(out, in)``; GPT-2 Conv1D ``(in, out)``; embedding
    ``(num_embeddings, dim)``; conv ``(out, in, *k)`` (1, 2 or 3 spatial dims; ungrouped only:
    for a grouped conv ``B A`` is a dense kernel the grouped weight cannot hold).  For inference merges only:
    training through :func:`functuner.apply` never forms it.
    """
    A32, B32 = A.float(), B.float()
    if kind == "conv":
        if all(k == 1 for k in A.shape[2:]):
            delta = (B32.flatten(1) @ A32.flatten(1)).reshape(B.shape[0], A.shape[1], *A.shape[2:])
        else:
            delta = conv_fn(A.dim() - 2)(A32.transpose(0, 1), B32).transpose(0, 1)
        return delta * scaling
    delta = (B32 @ A32) * scaling  # (out, in) for linear; (dim, num_emb) for embedding
    if kind in ("conv1d_gpt2", "embedding"):
        delta = delta.T
    return delta


def dora_conv_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """``s B A`` for DoRA's row norm on a convolution of weight shape ``weight_shape`` (float32), as PEFT forms it.

    Ungrouped: the delta of :func:`lora_delta`.  Grouped (``B`` is ``(out, r / groups, 1...)``): PEFT's
    ``_DoraConvNdLayer`` reshapes ``B`` to ``(out / groups, r)``, multiplies by ``A`` viewed ``(r, in k...)`` and
    reshapes the product to the grouped kernel's shape ``(out, in / groups, k...)``.  That is not the effective
    kernel of the grouped ``B`` after ``A`` (no grouped weight can hold it), but it is the norm PEFT's DoRA
    trains and initialises its magnitudes with, so functuner uses the same to load and match its checkpoints.
    """
    if B.shape[1] == A.shape[0]:
        return lora_delta(A, B, scaling, "conv")
    r = A.shape[0]
    return (B.float().reshape(-1, r) @ A.float().reshape(r, -1)).reshape(weight_shape) * scaling


def dora_norm(weight_out_in: torch.Tensor, delta_out_in: torch.Tensor, kind: str) -> torch.Tensor:
    """Row norm of ``W + delta`` (per output unit), float32; conv keeps PEFT's ``(1, out, 1...)`` shape."""
    w = weight_out_in.float() + delta_out_in.float()
    if kind == "conv":
        norm: torch.Tensor = w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True)
        return norm.transpose(1, 0)
    return cast(torch.Tensor, torch.linalg.vector_norm(w, dim=1))


def dora_row_norm_lowrank(
    weight_out_in: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Row norm of ``W + s B A`` (shape ``(out,)``, float32) without forming the ``(out, in)`` sum.

    ``||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T``:
    one ``(out, in) x (in, r)`` product and rank-sized work, instead of the
    full-size delta, sum and norm (about 3x less memory traffic per call).
    Linear / GPT-2 Conv1D only; no autograd graph (call under ``no_grad``).
    """
    w, a, b = weight_out_in.float(), A.float(), B.float()
    sq = (
        w.square().sum(1)
        + (2.0 * scaling) * (b * (w @ a.T)).sum(1)
        + (scaling * scaling) * ((b @ (a @ a.T)) * b).sum(1)
    )
    return sq.clamp_min(0.0).sqrt()


def add_lowrank(out: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out + scaling * h @ B.T`` as one fused ``addmm`` (no full-size temporaries for the scaling or the sum).

    ``out``: ``(..., out_features)``, ``h``: ``(..., r)``, ``B``: ``(out_features, r)``, all one dtype.
    Autograd saves only ``h`` and ``B`` (rank-sized), not ``out``.
    """
    o = out.shape[-1]
    return torch.addmm(out.reshape(-1, o), h.reshape(-1, h.shape[-1]), B.T, alpha=scaling).view_as(out)


def plus_delta(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, kind: str) -> torch.Tensor:
    """``W + alpha * B A`` in ``W``'s layout, float32 (the caller rounds to ``W.dtype``).

    Linear, GPT-2 Conv1D and embeddings use one ``addmm``, so a float32 merge
    allocates only the result (no full-size delta or sum temporaries); conv
    kernels go through :func:`lora_delta`.
    """
    if kind == "conv":
        return W.float() + lora_delta(A, B, alpha, kind)
    if kind in PARAM_KINDS and W.dim() == 3:
        return W.float() + param_delta(A, B, alpha, tuple(W.shape), kind)
    A32, B32 = A.float(), B.float()
    if kind == "linear" or kind in PARAM_KINDS:  # a 2-D raw parameter is (out, in), as a Linear weight
        return torch.addmm(W.float(), B32, A32, alpha=alpha)
    return torch.addmm(W.float(), A32.T, B32.T, alpha=alpha)  # (in, out) / (num_embeddings, dim) layouts
