"""MonteCLoRA (Monte Carlo LoRA, PEFT's ``monteclora_config``) as pure functions of tensors and a generator.

PEFT (``peft/tuners/lora/monteclora.py``, peft 0.21.2) keeps, per adapted
``nn.Linear``, a sampler with two trainable vectors (``std_prior`` ``(r,)``,
``expert_weights_prior`` ``(n,)``, ``n = num_samples``) and two buffers
(``gaussian_var_prior`` ``(r, r)``, ``expert_weights`` ``(n,)``), all saved with
the adapter under ``<module>.lora_monteclora_sampler.<leaf>``.  In eval mode,
and for merging, the layer is plain LoRA.  In training mode ``A`` is replaced by
the expert-weighted average of ``n`` perturbed copies of itself::

    std      = diag(exp(std_prior))
    cov      = diag(clip(diag(std Z_w std^T), 1e-3))              # Z_w ~ Wishart(r, I)
    noise_e  = sample_scaler * Z_e chol(cov)                       # Z_e ~ N(0, 1), (in, r), e = 1..n
    weights  = softmax(chol(Sigma(alpha)) z + log(alpha) - mean)   # alpha = exp(expert_weights_prior), z ~ N(0, 1)
    A_train  = (sum_e weights_e (A^T + noise_e))^T

functuner draws ``Z_w``, ``Z_e`` and ``z`` from the call's generator (PEFT from
the global random state, in a pre-filled buffer); :func:`perturbed_a` is the
formula above for given draws, so a test can feed it PEFT's own draws.
PEFT's forward also rewrites the two buffers with each step's sample (they feed
its ``get_variational_loss``); functuner never writes params, so they keep the
values they were initialised or loaded with, and that loss is not provided.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...errors import ConfigError

__all__ = ["DEFAULTS", "LEAVES", "draw", "init_tensors", "normalize", "perturbed_a", "sample", "shapes"]

DEFAULTS: dict[str, Any] = {  # PEFT's MontecloraConfig fields and defaults (peft 0.21.2)
    "num_samples": 8,
    "use_entropy": False,
    "dirichlet_prior": 0.1,
    "sample_scaler": 1e-4,
    "kl_loss_weight": 1e-5,
    "buffer_size": 150,
}
LEAVES = ("std_prior", "expert_weights_prior", "gaussian_var_prior", "expert_weights")


def normalize(value: Mapping[str, Any]) -> dict[str, Any]:
    """PEFT's ``MontecloraConfig`` fields as a dict with every field; :class:`ConfigError` naming a bad one."""
    unknown = sorted(set(value) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"monteclora_config has no field(s) {unknown}; its fields are {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **value}
    for k in ("num_samples", "buffer_size"):
        if isinstance(out[k], bool) or not isinstance(out[k], int) or out[k] <= 0:
            raise ConfigError(f"monteclora_config.{k} must be a positive integer, got {out[k]!r}")
    if not isinstance(out["dirichlet_prior"], (int, float)) or out["dirichlet_prior"] <= 0:
        raise ConfigError(f"monteclora_config.dirichlet_prior must be positive, got {out['dirichlet_prior']!r}")
    return out


def shapes(r: int, num_samples: int) -> dict[str, tuple[int, ...]]:
    """The shape of each sampler tensor for rank ``r``."""
    return {
        "std_prior": (r,),
        "expert_weights_prior": (num_samples,),
        "gaussian_var_prior": (r, r),
        "expert_weights": (num_samples,),
    }


def init_tensors(r: int, num_samples: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The sampler tensors as PEFT creates them: uniform priors, identity covariance, uniform expert weights."""
    return {
        "std_prior": torch.rand(r, generator=generator),
        "expert_weights_prior": torch.rand(num_samples, generator=generator),
        "gaussian_var_prior": torch.eye(r),
        "expert_weights": torch.ones(num_samples) / num_samples,
    }


def _wishart_identity(p: int, generator: torch.Generator | None) -> torch.Tensor:
    """One draw of ``Wishart(df=p, I_p)`` by Bartlett's decomposition, as ``torch.distributions.Wishart`` samples.

    The diagonal of the Bartlett factor is ``sqrt(chi2(p - i))``; ``p - i`` is a
    whole number here, so ``chi2`` is drawn as a sum of squared normals.
    """
    noise = torch.zeros(p, p)
    for i in range(p):
        noise[i, i] = torch.randn(p - i, generator=generator).square().sum().sqrt().clamp_min(torch.finfo().eps)
    rows, cols = torch.tril_indices(p, p, offset=-1)
    noise[rows, cols] = torch.randn(p * (p - 1) // 2, generator=generator)
    return noise @ noise.T


def draw(
    r: int, in_features: int, num_samples: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's random draws ``(Z_e (n, in, r), Z_w (r, r), z (n,))`` from ``generator`` (on CPU)."""
    z_mvn = torch.randn(num_samples, in_features, r, generator=generator)
    z_dirichlet = torch.randn(num_samples, generator=generator)
    return z_mvn, _wishart_identity(r, generator), z_dirichlet


def sample(
    std_prior: torch.Tensor,
    expert_weights_prior: torch.Tensor,
    z_mvn: torch.Tensor,
    z_wishart: torch.Tensor,
    z_dirichlet: torch.Tensor,
    sample_scaler: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``MontecloraSampler.forward`` for given draws: ``(noise (n, in, r), expert weights (n,))``."""
    dtype = std_prior.dtype
    z_mvn, z_wishart, z_dirichlet = (z.to(std_prior.device, dtype) for z in (z_mvn, z_wishart, z_dirichlet))
    std = torch.diag(torch.exp(std_prior))
    cov = torch.diag(torch.clip((std @ z_wishart @ std.T).diag(), min=1e-3))
    chol = torch.linalg.cholesky(cov.float()).to(dtype)
    noise = sample_scaler * torch.nan_to_num(torch.einsum("eio,op->eip", z_mvn, chol), nan=1e-3)
    n = expert_weights_prior.shape[0]
    alpha = torch.clamp(torch.exp(expert_weights_prior), min=1e-6)
    mu = torch.log(alpha) - torch.log(alpha).mean()
    diag_term = torch.clamp(1 / alpha * (1 - 2 / n) + 1 / (n**2) * (1 / alpha).sum(), min=1e-6)
    sigma = torch.diag(diag_term) + 1e-6 * torch.eye(n, device=alpha.device, dtype=alpha.dtype)
    try:
        L = torch.linalg.cholesky(sigma.float())
    except RuntimeError:  # torch.linalg.LinAlgError (a RuntimeError); as PEFT: a larger ridge for numerical stability
        L = torch.linalg.cholesky((sigma + 1e-4 * torch.eye(n, device=alpha.device, dtype=alpha.dtype)).float())
    logits = L.to(dtype) @ z_dirichlet + mu
    return noise, torch.softmax(logits, dim=-1)


def perturbed_a(A: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``A`` for one training step: the expert-weighted average of ``A^T + noise_e``, transposed back."""
    return torch.einsum("n,nij->ij", weights.to(A.dtype), A.T + torch.nan_to_num(noise, nan=0.0).to(A.dtype)).T
