"""LoRA factors from a base weight alone: PiSSA, PiSSA by fast SVD, OLoRA, orthogonal (PEFT's formulas).

Each function takes the base weight in ``(out, in)`` layout as float32 and
returns ``(A (r, in), B (out, r))`` in float32; the caller casts and names
them.  For the inits that move the base weights (PiSSA, OLoRA) the residual
weight is ``W - s B A`` (:func:`residual`), which PEFT writes into the model and
functuner returns as a new tensor.  Randomness (fast SVD, orthogonal) comes
only from the ``generator`` argument, drawing in the order PEFT draws from the
global RNG, so a generator in the same state gives PEFT's exact factors.
"""

from __future__ import annotations

import torch

from ....errors import ConfigError

__all__ = ["olora", "orthogonal", "pissa", "pissa_fast", "residual", "svd_lowrank"]


def pissa(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA: ``B A`` is the top-``r`` SVD part of ``W``, divided by ``scaling`` (so ``s B A`` is that part)."""
    V, S, Uh = torch.linalg.svd(weight, full_matrices=False)
    return _from_svd(V[:, :r], S[:r] / scaling, Uh[:r])


def svd_lowrank(
    matrix: torch.Tensor, q: int, niter: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.svd_lowrank(matrix, q, niter)`` (Halko et al., algorithm 5.1) with its one random draw from
    ``generator`` (on CPU) instead of the global RNG; returns ``(U, S, V)``."""
    m, n = matrix.shape[-2:]
    A = matrix.mH if m < n else matrix
    R = torch.randn(A.shape[-1], q, dtype=A.dtype, generator=generator).to(A.device)
    Q = torch.linalg.qr(A @ R).Q
    for _ in range(niter):
        Q = torch.linalg.qr(A.mH @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.mH @ A, full_matrices=False)
    U, V = Q @ U, Vh.mH
    if m < n:
        U, V = V, U
    return U, S, V


def pissa_fast(
    weight: torch.Tensor, r: int, scaling: float, niter: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA by randomized SVD (``init_lora_weights="pissa_niter_N"``): ``niter`` subspace iterations."""
    V, S, U = svd_lowrank(weight, r, niter, generator)
    return _from_svd(V, S / scaling, U.t())


def _from_svd(Vr: torch.Tensor, Sr: torch.Tensor, Uhr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = torch.sqrt(Sr)
    return torch.diag(root) @ Uhr, Vr @ torch.diag(root)


def olora(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA: ``W = Q R``; ``A`` the first ``r`` rows of ``R``, ``B`` the first ``r`` columns of ``Q``."""
    Q, R = torch.linalg.qr(weight)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def orthogonal(in_features: int, out_features: int, r: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Orthogonal init (PEFT's): ``A``'s and ``B``'s rank directions are the odd and even rows of one random
    orthogonal ``r x r`` matrix, so ``B A = 0`` at init and the base weights stay as they are."""
    if r % 2 != 0:
        raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank (as PEFT), got r={r}")
    Q, _ = torch.linalg.qr(torch.randn(r, r, generator=generator))
    A = torch.randn(in_features, r // 2, generator=generator).mm(Q[0::2, :]).T / 10.0
    B = torch.randn(r // 2, out_features, generator=generator).T.mm(Q[1::2, :]) / 10.0
    return A.contiguous(), B.contiguous()


def residual(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W - s B A`` in float32 (``(out, in)`` layout), the base weight a PiSSA/OLoRA/CorDA adapter runs on."""
    return weight.float() - scaling * (B.float() @ A.float())
