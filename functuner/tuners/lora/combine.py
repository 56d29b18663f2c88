"""PEFT's ``add_weighted_adapter`` as pure functions: LoRA params + weights -> new LoRA params.

Public API::

    new = add_weighted_adapter(adapters, weights, "mix", combination_type="svd",
                               svd_rank=None, svd_clamp=None, svd_full_matrices=True, svd_driver=None,
                               density=None, majority_sign_method="total", generator=None, model=None,
                               names=None)

``adapters`` is a sequence of LoRA :class:`~functuner.params.TunerParams` (or a
``{name: params}`` mapping, optionally with ``names=[...]`` choosing some of
them, as PEFT's list of adapter names); ``weights`` one float per adapter.  The
result is a new LoRA ``TunerParams`` named ``adapter_name``; nothing given is
changed.  Combination types (PEFT's semantics, read from ``peft/tuners/lora/model.py``
and ``peft/utils/merge_utils.py``):

* ``cat``: A_new = concat(w_i * s_i * A_i), B_new = concat(B_i): rank = sum of
  ranks, delta exactly ``sum w_i * delta_i``.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the
  merge rule is applied to the A's and to the B's separately, with weight
  ``sign(w s) sqrt(|w s|)`` on A and ``sqrt(|w s|)`` on B (so cross terms
  ``B_i A_j`` appear, as in PEFT); all ranks must be equal.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``: the merge rule is applied to the full deltas
  ``s_i B_i A_i``, then a truncated SVD (rank ``svd_rank``, default the largest
  rank) gives B = U S and A = Vh, optionally clamped at the ``svd_clamp``
  quantile.
* One adapter: always ``linear`` (as PEFT).

The new config is the first adapter's with ``r = lora_alpha = new rank``,
the union of the target modules and empty rank/alpha patterns, so its scaling
is 1.  Deliberate difference from PEFT 0.21: with ``use_rslora=True`` PEFT
keeps rsLoRA, making the new scaling ``sqrt(new rank)`` instead of 1 (the
combined adapter is over-scaled); here the result has ``use_rslora=False``.

Randomness: the ``dare_*`` types need ``generator`` (int seed or
``torch.Generator``).  Masks are drawn in PEFT's order (module by module in
model order, for each module A's then B's, adapter by adapter), so a generator
seeded with ``s`` reproduces PEFT run after ``torch.manual_seed(s)``; pass
``model=`` to order modules exactly as the model does when the adapters target
different modules.

Refused (:class:`ConfigError` naming the field and why): ``lora_bias``, ``target_parameters``, KaSA,
VeLoRA, BD-LoRA, MonteCLoRA, grouped convolutions, ``modules_to_save`` copies and trainable biases (see
``_REFUSED``; PEFT raises for ``target_parameters``, shared ``modules_to_save`` and the svd types on grouped
convolutions and BD-LoRA, and for the others gives a result with fresh state, not the combination).  MiCA combines (its forward is LoRA's; the result keeps
``init_lora_weights="mica"``, so ``B`` stays frozen, as in PEFT), and so does ``nn.MultiheadAttention``.

DoRA: the result keeps ``use_dora`` and, like PEFT with default init, gets the
base weight's row norms as magnitude, which needs ``model=``.

Lower-level pure helpers: :func:`task_arithmetic`, :func:`magnitude_prune`,
:func:`ties`, :func:`dare_linear`, :func:`dare_ties` (lists of same-shape
tensors -> one tensor) and :func:`adapter_deltas` (each module's ``s B A`` in
fp32, Linear ``(out, in)`` orientation).  All functions are pure.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ...core.naming import check_adapter_name
from ...core.params import TunerParams
from ...errors import AdapterNameError, ConfigError
from .config import LoRAConfig
from .keys import EMBEDDING_PARTS, param_names, parse_key
from .layout import expected_shapes, layer_kind
from .math import dora_norm, weight_as_out_in

__all__ = [
    "COMBINATION_TYPES",
    "adapter_deltas",
    "add_weighted_adapter",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "task_arithmetic",
    "ties",
]

_FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES: tuple[str, ...] = ("cat", *_FACTOR_TYPES, *_SVD_TYPES)
_NEEDS_DENSITY = (
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
)
_SIGN_METHODS = ("total", "frequency")


# ---------------------------------------------------------------------------
# merge rules on lists of same-shape tensors (PEFT's merge_utils semantics)
# ---------------------------------------------------------------------------
def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``stacked (n, *shape) * weights (n,)`` broadcast over the trailing dims."""
    return stacked * weights.reshape(weights.shape + (1,) * (stacked.dim() - 1))


def _keep_top_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries of ``t``."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * keep.reshape(t.shape)


def _keep_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by ``1/density``.

    The Bernoulli draw is made on the generator's device (CPU for a CPU
    generator) so results do not depend on where the tensors live.
    """
    if density >= 1:
        return t
    probs = torch.full(t.shape, density, dtype=t.dtype, device=generator.device)
    mask = torch.bernoulli(probs, generator=generator).to(t.device)
    return t * mask / density


def _elect_sign_merge(stacked: torch.Tensor, weighted: torch.Tensor, method: str) -> torch.Tensor:
    """TIES: keep entries whose sign agrees with the elected one, average the weighted survivors."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(votes >= 0, 1, -1)
    agree = sign == elected
    total = (weighted * agree).sum(dim=0)
    return total / torch.clamp(agree.sum(dim=0), min=1.0)


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[i] * tensors[i]``.  Pure; shapes of ``tensors`` must agree."""
    return _weighted(torch.stack(list(tensors)), weights).sum(dim=0)


def magnitude_prune(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top-``density`` fraction (by magnitude) of each tensor, then weighted sum. Pure."""
    return task_arithmetic([_keep_top_magnitude(t, density) for t in tensors], weights)


def ties(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float, majority_sign_method: str = "total"
) -> torch.Tensor:
    """TIES-merging: magnitude pruning, sign election, disjoint weighted mean. Pure."""
    stacked = torch.stack([_keep_top_magnitude(t, density) for t in tensors])
    return _elect_sign_merge(stacked, _weighted(stacked, weights), majority_sign_method)


def dare_linear(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float, generator: torch.Generator
) -> torch.Tensor:
    """DARE: random drop with rescale, then weighted sum.  Randomness only from ``generator``."""
    return task_arithmetic([_keep_random(t, density, generator) for t in tensors], weights)


def dare_ties(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    generator: torch.Generator,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """DARE drop + TIES sign election.  Randomness only from ``generator``."""
    stacked = torch.stack([_keep_random(t, density, generator) for t in tensors])
    return _elect_sign_merge(stacked, _weighted(stacked, weights), majority_sign_method)


def _merge_rule(
    kind: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    sign_method: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    base = kind.removesuffix("_svd") if kind != "svd" else "linear"
    if base == "linear":
        return task_arithmetic(tensors, weights)
    assert density is not None
    if base == "ties":
        return ties(tensors, weights, density, sign_method)
    if base == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    assert generator is not None
    if base == "dare_linear":
        return dare_linear(tensors, weights, density, generator)
    return dare_ties(tensors, weights, density, generator, sign_method)


# ---------------------------------------------------------------------------
# reading LoRA params per module
# ---------------------------------------------------------------------------
class _Factors(NamedTuple):
    """One adapter at one module: ``A (r, ...)``, ``B (out, r, ...)``, its scaling, and key style."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    embedding: bool
    transposed: bool  # PEFT's delta for this module is ``(in, out)`` (embedding, GPT-2 Conv1D / fan_in_fan_out)


def _is_gpt2_conv1d(model: nn.Module | None, name: str) -> bool:
    if model is None:
        return False
    from ...core.targets import is_conv1d_gpt2

    try:
        return is_conv1d_gpt2(model.get_submodule(name))
    except AttributeError:
        return False


# config fields whose adapters cannot be combined, and why (PEFT 0.21's behaviour in brackets); MiCA combines
# (its forward is plain LoRA's; the result keeps init_lora_weights="mica", so B stays frozen, as in PEFT)
_REFUSED = {
    "lora_bias": "no combination rule for the lora_B biases [PEFT gives the result freshly initialised ones]",
    "target_parameters": "LoRA on raw parameters [PEFT raises ValueError]",
    "kasa_config": "KaSA's diagonal has no combination rule [PEFT re-initialises it and truncates the base again]",
    "velora_config": "VeLoRA's projection is training state with no combination rule [PEFT draws a fresh one]",
    "use_bdlora": "block-diagonal factors are not kept by the svd types [PEFT's svd raises RuntimeError]",
    "monteclora_config": "MonteCLoRA's sampler has no combination rule [PEFT gives the result a fresh one]",
}


def _modules_of(params: TunerParams, model: nn.Module | None = None) -> dict[str, _Factors]:
    """``module name -> factors`` for a LoRA params; raises for tensors combination cannot carry."""
    cfg = params.config
    if not isinstance(cfg, LoRAConfig):
        raise ConfigError(
            f"add_weighted_adapter combines LoRA params; adapter {params.adapter_name!r} has a {type(cfg).__name__}"
        )
    ad = params.adapter_name
    for field, why in _REFUSED.items():
        value = getattr(cfg, field, None)
        if value:
            raise ConfigError(
                f"add_weighted_adapter cannot combine adapter {ad!r}: it has {field}={value!r}, which the combined"
                f" adapter cannot carry ({why}); combine adapters without it"
            )
    out: dict[str, _Factors] = {}
    for key in params:
        parsed = parse_key(key)
        if parsed is None or parsed.adapter != ad or parsed.part not in ("lora_A", "lora_embedding_A"):
            continue
        name, emb = parsed.module, parsed.part in EMBEDDING_PARTS
        b_key = param_names(name, "embedding" if emb else "linear", ad)[1]
        transposed = emb or bool(cfg.fan_in_fan_out) or _is_gpt2_conv1d(model, name)
        A, B = params[key], params[b_key]
        if A.ndim > 2 and B.shape[1] != A.shape[0]:  # lora_B grouped like a grouped convolution
            raise ConfigError(
                f"add_weighted_adapter cannot combine adapter {ad!r}: module {name!r} is a grouped convolution"
                f" (lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}), whose delta is not a plain product B @ A"
                " [PEFT's svd types raise RuntimeError]; combine"
                " adapters that do not target grouped convolutions"
            )
        out[name] = _Factors(A, B, cfg.scaling_for(name), emb, transposed)
    for key in params:
        if parse_key(key) is not None:
            continue
        raise ConfigError(
            f"adapter {ad!r} holds {key!r} (a trainable bias or modules_to_save copy);"
            " add_weighted_adapter combines LoRA factors only"
        )
    return out


def _config_rank(cfg: LoRAConfig) -> int:
    """The rank PEFT allocates for a config: ``r``, or the largest ``rank_pattern`` value."""
    return max([cfg.r, *cfg.rank_pattern.values()]) if cfg.rank_pattern else cfg.r


def adapter_deltas(params: TunerParams) -> dict[str, torch.Tensor]:
    """Each adapted module's ``s * B @ A`` in fp32, as a 2-D ``(out, in * prod(kernel))`` matrix.

    Orientation is Linear's for every kind (GPT-2 ``Conv1D`` too); embeddings
    give ``(embedding_dim, num_embeddings)``.  Pure.
    """
    return {name: _delta2d(f) for name, f in _modules_of(params).items()}


def _delta2d(f: _Factors) -> torch.Tensor:
    B = f.B.float().reshape(f.B.shape[0], -1)
    A = f.A.float().reshape(f.A.shape[0], -1)
    return (B @ A) * f.scaling


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------
def _select(
    adapters: Sequence[TunerParams] | Mapping[str, TunerParams], names: Sequence[str] | None
) -> list[TunerParams]:
    if isinstance(adapters, Mapping):
        if names is None:
            chosen = list(adapters.values())
        else:
            unknown = [n for n in names if n not in adapters]
            if unknown:
                raise AdapterNameError(f"unknown adapter(s) {unknown}; known: {sorted(adapters)}")
            chosen = [adapters[n] for n in names]
    else:
        if names is not None:
            raise TypeError("names= selects from a {name: params} mapping; pass adapters as a mapping")
        chosen = list(adapters)
    for p in chosen:
        if not isinstance(p, TunerParams):
            raise TypeError(f"expected TunerParams, got {type(p).__name__}")
    if not chosen:
        raise ConfigError("add_weighted_adapter needs at least one adapter, got an empty list")
    return chosen


def _as_generator(generator: int | torch.Generator | None, kind: str) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(
        f"combination_type={kind!r} draws random masks: pass generator=<int seed> or a"
        f" torch.Generator (functuner never uses the global RNG), got {generator!r}"
    )


def _new_target_modules(configs: list[LoRAConfig]) -> Any:
    targets = [c.target_modules for c in configs]
    str_like = [isinstance(t, str) for t in targets]
    if any(str_like) and not all(str_like):
        raise ConfigError(
            "all adapters' target_modules must be of one type: a mix of regex strings and name lists"
            f" cannot be combined (got {[type(t).__name__ for t in targets]})"
        )
    if all(str_like):
        return "|".join(f"({t})" for t in targets)
    union: set[str] = set()
    for t in targets:
        union.update(t or ())
    return tuple(sorted(union))


def _check_args(
    kind: str, n: int, weights: Sequence[float], density: float | None, sign_method: str, svd_clamp: float | None
) -> list[float]:
    if kind not in COMBINATION_TYPES:
        raise ConfigError(f"combination_type={kind!r} is unknown; use one of {list(COMBINATION_TYPES)}")
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ConfigError(f"got {n} adapter(s) but {len(w)} weight(s); give one weight per adapter")
    if not all(math.isfinite(x) for x in w):
        raise ConfigError(f"weights must be finite numbers, got {list(weights)}")
    if kind in _NEEDS_DENSITY:
        if density is None:
            raise ConfigError(f"combination_type={kind!r} needs density= (fraction of values kept, in [0, 1])")
        if not 0.0 <= density <= 1.0:
            raise ConfigError(f"density must be in [0, 1], got {density!r}")
    if sign_method not in _SIGN_METHODS:
        raise ConfigError(f"majority_sign_method={sign_method!r} is unknown; use one of {list(_SIGN_METHODS)}")
    if svd_clamp is not None and not 0.0 <= svd_clamp <= 1.0:
        raise ConfigError(f"svd_clamp is a quantile in [0, 1], got {svd_clamp!r}")
    return w


def _module_order(per_adapter: list[dict[str, _Factors]], model: nn.Module | None) -> list[str]:
    seen: dict[str, None] = {}
    for mods in per_adapter:
        seen.update(dict.fromkeys(mods))
    if model is None:
        return list(seen)
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    missing = [n for n in seen if n not in position]
    if missing:
        raise ConfigError(f"the adapters adapt module(s) {missing[:3]} that model= does not have")
    return sorted(seen, key=position.__getitem__)


# ---------------------------------------------------------------------------
# per-module combination
# ---------------------------------------------------------------------------
def _combine_cat(present: list[tuple[_Factors, float]], new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    As = [f.A * w * f.scaling for f, w in present]
    Bs = [f.B for f, _ in present]
    A, B = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
    pad = new_rank - A.shape[0]
    if pad:  # modules some adapters do not adapt: their rank share stays zero, as in PEFT
        A = torch.cat([A, A.new_zeros((pad, *A.shape[1:]))], dim=0)
        B = torch.cat([B, B.new_zeros((B.shape[0], pad, *B.shape[2:]))], dim=1)
    return A, B


def _combine_factors(
    kind: str,
    present: list[tuple[_Factors, float]],
    density: float | None,
    sign_method: str,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    wa, wb = [], []
    for f, w in present:
        ws = w * f.scaling
        root = math.sqrt(abs(ws))
        wa.append(root if ws >= 0 else -root)
        wb.append(root)
    dtype, device = present[0][0].A.dtype, present[0][0].A.device
    weights_a = torch.tensor(wa).to(device)
    weights_b = torch.tensor(wb).to(device)
    A = _merge_rule(kind, [f.A for f, _ in present], weights_a, density, sign_method, generator)
    B = _merge_rule(kind, [f.B for f, _ in present], weights_b, density, sign_method, generator)
    return A.to(dtype), B.to(dtype)


def _combine_svd(
    kind: str,
    name: str,
    present: list[tuple[_Factors, float]],
    new_rank: int,
    density: float | None,
    sign_method: str,
    generator: torch.Generator | None,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    first = present[0][0]
    # merge in PEFT's layout of the delta, so random masks land on the same entries
    deltas = [_delta2d(f).T if first.transposed else _delta2d(f) for f, _ in present]
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    delta = _merge_rule(kind, deltas, weights, density, sign_method, generator)
    if first.transposed:
        delta = delta.T
    if new_rank > min(delta.shape):
        raise ConfigError(f"svd_rank={new_rank} exceeds the size {tuple(delta.shape)} of module {name!r}")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    B2 = U[:, :new_rank] @ torch.diag(S[:new_rank])
    A2 = Vh[:new_rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B2.flatten(), A2.flatten()]), clamp)
        B2, A2 = B2.clamp(-hi, hi), A2.clamp(-hi, hi)
    A = A2.reshape(new_rank, *first.A.shape[1:])
    B = B2.reshape(first.B.shape[0], new_rank, *first.B.shape[2:])
    return A.to(first.A.dtype), B.to(first.B.dtype)


def _dora_magnitude(model: nn.Module | None, name: str) -> torch.Tensor:
    """The base weight's row norm at ``name``, shaped as LoRA's magnitude vector (PEFT's default DoRA init)."""
    if model is None:
        raise ConfigError(
            "combining DoRA adapters needs model=: the new adapter's magnitude is the base weight's"
            " row norm (as PEFT initialises it)"
        )
    module = model.get_submodule(name)
    kind = layer_kind(module, name)
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    w = weight_as_out_in(weight.detach(), kind).float()
    norm = dora_norm(w, torch.zeros_like(w), kind)
    return norm.reshape(expected_shapes(module, kind, 1)[2]).to(weight.dtype)


# ---------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------
def add_weighted_adapter(
    adapters: Sequence[TunerParams] | Mapping[str, TunerParams],
    weights: Sequence[float],
    adapter_name: str = "combined",
    combination_type: str = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: int | torch.Generator | None = None,
    model: nn.Module | None = None,
    names: Sequence[str] | None = None,
) -> TunerParams:
    """A new LoRA adapter combining ``adapters`` with ``weights`` (PEFT's ``add_weighted_adapter``, pure).

    See the module docstring for each type's math.  Tensors keep the first
    adapter's dtype and device.  Raises :class:`ConfigError` for empty lists,
    a weight count that differs from the adapter count, unequal ranks where
    the type needs equal ranks, unknown types or a missing ``density``;
    :class:`AdapterNameError` for unknown ``names`` or a bad ``adapter_name``.
    ``generator`` (required by ``dare_*``) is advanced; nothing else changes.
    """
    check_adapter_name(adapter_name)
    chosen = _select(adapters, names)
    w = _check_args(combination_type, len(chosen), weights, density, majority_sign_method, svd_clamp)
    kind = "linear" if len(chosen) == 1 else combination_type
    gen = _as_generator(generator, kind) if kind.startswith("dare") else None
    if kind in ("ties", "ties_svd") and density is not None and density >= 1:
        warnings.warn(f"density={density} keeps every value: no pruning", stacklevel=2)
    per_adapter = [_modules_of(p, model) for p in chosen]
    configs: list[LoRAConfig] = [p.config for p in chosen]
    ranks = [_config_rank(c) for c in configs]
    if kind in _FACTOR_TYPES:
        if len(set(ranks)) != 1:
            listed = ", ".join(f"{p.adapter_name!r}: r={r}" for p, r in zip(chosen, ranks, strict=True))
            raise ConfigError(f"combination_type={kind!r} needs equal ranks ({listed}); use 'cat' or an svd type")
        new_rank = ranks[0]
    elif kind == "cat":
        new_rank = sum(ranks)
    else:
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
            raise ConfigError(f"svd_rank must be a positive integer, got {svd_rank!r}")
        new_rank = svd_rank or max(ranks)
    use_dora = bool(configs[0].use_dora)
    if configs[0].init_lora_weights == "mica":  # the result is a MiCA adapter too: r <= min(in, out), as PEFT checks
        for mods in per_adapter:
            for name, f in mods.items():
                if new_rank > min(int(f.A.shape[-1]), int(f.B.shape[0])):
                    raise ConfigError(
                        f"add_weighted_adapter: the combined MiCA adapter would have r={new_rank} on {name!r}, but"
                        f" MiCA needs r <= min(in, out) = {min(int(f.A.shape[-1]), int(f.B.shape[0]))} (PEFT"
                        " raises too); use an svd type with a smaller svd_rank"
                    )
    tensors: dict[str, torch.Tensor] = {}
    for name in _module_order(per_adapter, model):
        present = [(mods[name], wi) for mods, wi in zip(per_adapter, w, strict=True) if name in mods]
        if kind in _FACTOR_TYPES:
            shapes = {tuple(f.A.shape) for f, _ in present}
            if len(shapes) != 1:
                raise ConfigError(
                    f"combination_type={kind!r}: module {name!r} has A shapes {sorted(shapes)};"
                    " ranks must be equal per module"
                )
            A, B = _combine_factors(kind, present, density, majority_sign_method, gen)
        elif kind == "cat":
            A, B = _combine_cat(present, new_rank)
        else:
            A, B = _combine_svd(
                kind,
                name,
                present,
                new_rank,
                density,
                majority_sign_method,
                gen,
                svd_clamp,
                svd_full_matrices,
                svd_driver,
            )
        a_key, b_key, m_key = param_names(name, "embedding" if present[0][0].embedding else "linear", adapter_name)
        tensors[a_key], tensors[b_key] = A, B
        if use_dora:
            tensors[m_key] = _dora_magnitude(model, name)
    config = dataclasses.replace(
        configs[0],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=_new_target_modules(configs),
        alpha_pattern={},
        rank_pattern={},
        use_rslora=False,
    )
    return TunerParams(tensors, config, adapter_name)
