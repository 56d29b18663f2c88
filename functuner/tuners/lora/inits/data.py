"""LoRA factors from data passed as arguments: EVA (layer input activations) and CorDA (input covariances).

Both follow PEFT's formulas (``peft.tuners.lora.eva`` and ``peft.tuners.lora.corda``)
but take their data as plain tensors instead of running the model themselves:

* EVA: ``activations[name]`` is the inputs the module ``name`` sees, shape
  ``(..., in)`` (flatten and mask padding / ignored positions first, as PEFT's
  ``use_label_mask`` does).  Its principal components (PCA of the centered
  inputs, signs as PEFT's ``IncrementalPCA``) become ``A``; ``B`` is zero, so the
  model starts unchanged.  Ranks are redistributed across layers by explained
  variance within the budget ``sum(r)`` (each at most ``round(r * rho)``), as
  PEFT does; with ``adjust_scaling_factors`` a layer's ``lora_alpha`` follows
  its new rank.  PEFT's ``IncrementalPCA`` fits in batches with a randomized SVD
  and stops once the components converge; functuner computes the exact PCA of
  all the activations it is given, which is what PEFT's converges to.
* CorDA: ``covariances[name]`` is the mean of ``x^T x`` over calibration
  calls, each call's input ``x`` divided by its maximum first
  (:func:`corda_covariance` computes it the way PEFT's hooks do).  The weight
  is multiplied by the (damped) covariance, decomposed, and the top
  (``corda_method="ipm"``) or bottom (``"kpm"``) ``r`` directions become the
  adapter; the base weight keeps the rest (``W - s B A``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ....errors import ConfigError

__all__ = ["EVA_DEFAULTS", "CORDA_DEFAULTS", "corda", "corda_covariance", "eva_components", "eva_ranks", "options"]

EVA_DEFAULTS: dict[str, Any] = {
    "rho": 2.0,
    "tau": 0.99,
    "use_label_mask": True,
    "label_mask_value": -100,
    "whiten": False,
    "adjust_scaling_factors": True,
}
CORDA_DEFAULTS: dict[str, Any] = {
    "cache_file": None,
    "covariance_file": None,
    "corda_method": "ipm",
    "verbose": False,
    "use_float16_for_covariance": False,
    "prune_temporary_fields": True,
}


def options(value: Any, defaults: Mapping[str, Any], field: str) -> dict[str, Any]:
    """``eva_config`` / ``corda_config`` (a dict, a PEFT config object or ``None``) merged over PEFT's defaults."""
    if value is None:
        data: dict[str, Any] = {}
    elif isinstance(value, Mapping):
        data = dict(value)
    elif hasattr(value, "__dataclass_fields__"):
        data = {k: getattr(value, k) for k in value.__dataclass_fields__}
    else:
        raise ConfigError(f"{field} must be a dict of PEFT's fields, got {type(value).__name__}")
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise ConfigError(f"{field} has no field(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **data}


# ---------------------------------------------------------------------------
# EVA
# ---------------------------------------------------------------------------
def eva_components(
    activations: torch.Tensor, n_components: int, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(components (k, in), singular values (k,), explained variance ratios (k,))`` of the centered inputs."""
    X = activations.detach().reshape(-1, activations.shape[-1]).float()
    if X.shape[0] < n_components:
        raise ConfigError(
            f"EVA on {name!r}: {X.shape[0]} activation rows for {n_components} components; pass at least as many"
            " input rows (tokens) as round(r * rho)"
        )
    X = X - X.mean(dim=0)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    # PEFT's IncrementalPCA flips signs so that each component's largest-magnitude entry is positive
    signs = torch.sign(Vh[torch.arange(Vh.shape[0]), torch.argmax(Vh.abs(), dim=1)])
    Vh = Vh * signs.view(-1, 1)
    total = (S**2).sum()
    k = min(n_components, Vh.shape[0])
    return Vh[:k], S[:k], (S[:k] ** 2) / total


def eva_ranks(ratios: Mapping[str, torch.Tensor], budget: int, max_components: Mapping[str, int]) -> dict[str, int]:
    """PEFT's rank redistribution: the ``budget`` largest explained-variance ratios over all layers, counted per
    layer (each layer offering at most ``max_components`` of them)."""
    entries = [(name, float(v)) for name, vals in ratios.items() for v in vals[: max_components[name]]]
    order = sorted(range(len(entries)), key=lambda i: entries[i][1], reverse=True)[:budget]
    counts = dict.fromkeys(ratios, 0)
    for i in order:
        counts[entries[i][0]] += 1
    return counts


# ---------------------------------------------------------------------------
# CorDA
# ---------------------------------------------------------------------------
def corda_covariance(inputs: Iterable[torch.Tensor]) -> torch.Tensor:
    """A layer's CorDA covariance from the inputs it saw in each calibration call (PEFT's hook, as a function).

    Each input ``(tokens, in)`` (a leading batch dimension of 1 is dropped) is
    divided by its maximum, then ``x^T x`` is averaged over the calls.
    """
    total: torch.Tensor | None = None
    count = 0
    for x in inputs:
        x = x.detach()
        if x.dim() == 3 and x.shape[0] == 1:
            x = x.squeeze(0)
        if x.dim() != 2:
            raise ConfigError(f"corda_covariance: expected inputs of shape (tokens, in), got {tuple(x.shape)}")
        x = x.float()
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ConfigError("corda_covariance: an input has non-finite values (or is all zero)")
        cov = x.t() @ x
        total = cov if total is None else total + cov
        count += 1
    if total is None:
        raise ConfigError("corda_covariance: no inputs given")
    return total / count


def corda(
    weight: torch.Tensor, covariance: torch.Tensor, r: int, scaling: float, method: str, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA's ``(A, B)`` for a base weight ``(out, in)`` (float32) and its input covariance ``(in, in)``."""
    if method not in ("ipm", "kpm"):
        raise ConfigError(f"corda_config['corda_method'] must be 'ipm' or 'kpm', got {method!r}")
    cov = covariance.detach().float().to(weight.device)
    if cov.shape != (weight.shape[1], weight.shape[1]):
        raise ConfigError(
            f"CorDA on {name!r}: covariance has shape {tuple(cov.shape)}, the layer needs"
            f" ({weight.shape[1]}, {weight.shape[1]}) (its input size)"
        )
    if not torch.isfinite(cov).all():
        raise ConfigError(f"CorDA on {name!r}: the covariance has non-finite values")
    damp = 0.01
    eye = torch.eye(cov.shape[0], device=cov.device)
    while True:  # PEFT's damping: grow until the inverse is accurate
        fixed = cov + torch.diag(torch.ones(cov.shape[0], device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(weight.float() @ fixed, full_matrices=False)
    V = (Vh @ inv).transpose(0, 1)
    if r > S.shape[0]:
        raise ConfigError(f"CorDA on {name!r}: r={r} is larger than the layer's rank {S.shape[0]}")
    sl = slice(None, r) if method == "ipm" else slice(-r, None)
    U, S, V = U[:, sl], S[sl] / scaling, V[:, sl]
    A = V.t().mul(S.sqrt().view(-1, 1)).contiguous()
    B = U.mul(S.sqrt()).contiguous()
    return A, B
