"""GaLore: full-weight training with the gradient projected to rank r and Adam(W) moments kept low-rank.

GaLore (Zhao et al., 2024, arXiv:2403.03507) trains every selected 2-D weight in full, but projects its
gradient ``G`` (``m x n``) onto a rank-``r`` subspace found by an SVD of the gradient, refreshed every
``update_proj_gap`` steps.  Adam's two moments live in the projected space (``m x r`` or ``r x n``),
so optimizer state shrinks from ``2 m n`` to ``2 r max(m, n)`` plus one ``r x min(m, n)`` projector.
The normalized step is projected back to ``m x n`` and multiplied by ``scale`` (SWIFT's ``galore_scale``).

This module is the one implementation of the math, written as pure per-tensor functions
(:func:`projection_side`, :func:`compute_projection`, :func:`project`, :func:`project_back`,
:func:`adam_direction`), and offers it as:

* :func:`galore_adamw`: a :class:`~functuner.optim.base.GradientTransformation` over a ``{name: tensor}``
  pytree (or :class:`~functuner.TunerParams`), for ``torch.func`` loops;
* :class:`functuner.optim.torch_optim.GaLoreAdamW`: a ``torch.optim.Optimizer`` for eager / Trainer users
  (same parameter-group keys as the authors' ``galore_torch.GaLoreAdamW``).

The update rule follows the authors' ``galore_torch`` (AdamW with ``eps`` outside the square root,
bias correction folded into the step size, decoupled weight decay applied after the step, the
projector refreshed when the per-tensor step counter is a multiple of ``update_proj_gap``, the side of
``std``/``reverse_std`` chosen from the weight's shape).  ``tests/optim`` checks it against
``galore_torch`` step by step.

Q-GaLore (Zhang et al., 2024, arXiv:2407.08296) is the same transformation with ``quantize`` and/or
``proj_quant`` set: the projectors are stored in ``proj_bits`` bits (:mod:`functuner.optim.quant`) and
refreshed lazily (each refresh compares the new projector's leading singular vector with the previous
one; once the mean cosine similarity of the last ``queue_size`` refreshes reaches ``cos_threshold``,
the tensor's gap is multiplied by ``gamma_proj``), as the reference ``q_galore_torch`` projector does.
The int8 weights with stochastic rounding are in :mod:`functuner.optim.qgalore`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.targets import select_modules
from ..errors import ConfigError, TargetError
from .base import GradientTransformation, rebuild_like
from .quant import QUANT_BITS, QuantizedTensor, dequantize, quantize

__all__ = [
    "PROJ_TYPES",
    "GaLoreConfig",
    "Hyper",
    "ParamState",
    "Projection",
    "adam_direction",
    "adamw",
    "compute_projection",
    "galore_adamw",
    "galore_targets",
    "init_param_state",
    "leading_vector",
    "low_rank_shape",
    "project",
    "project_back",
    "projection_side",
    "refresh_projection",
]

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


@dataclass(frozen=True)
class GaLoreConfig:
    """SWIFT's ``GaLoreConfig`` (``swift.optimizers.galore.GaLoreConfig``), same field names and defaults.

    :param rank: rank ``r`` of the gradient projection.
    :param target_modules: modules whose 2-D ``weight`` GaLore trains (functuner's target rules:
        a regex string, a list of names/suffixes, or ``"all-linear"``); ``None`` means ``"all-linear"``
        (SWIFT's default: every linear except the output layer).
    :param update_proj_gap: the SVD projector is recomputed every this many steps.
    :param galore_scale: multiplies the projected-back update (the reference's ``scale``).
    :param proj_type: ``std`` (project the smaller side), ``reverse_std`` (the larger side), ``right``,
        ``left`` or ``full`` (both sides), as in ``galore_torch``.
    :param optim_per_parameter: one optimizer per parameter, stepped from a post-accumulate-grad hook
        during backward, so each gradient is freed as soon as it is used
        (:func:`functuner.optim.torch_optim.create_galore_optimizer`).
    :param quantize: Q-GaLore: the target weights are stored in int8 (group-wise, re-quantized after each
        update with stochastic rounding; :func:`functuner.optim.qgalore.quantize_params` /
        :func:`functuner.optim.qgalore.quantize_model`) and projectors are refreshed lazily.
    :param proj_quant: Q-GaLore: projection matrices stored in ``proj_bits`` bits (lazy refresh too).
    :param proj_bits: bits of a quantized projection matrix (2, 4 or 8).
    :param proj_group_size: elements per quantization group of a projection matrix (``<= 0``: per row).
    :param cos_threshold: lazy refresh: the gap grows once the mean cosine similarity of successive
        projectors' leading singular vectors, over the last ``queue_size`` refreshes, reaches this.
    :param gamma_proj: lazy refresh: the gap is multiplied by this when it grows.
    :param queue_size: lazy refresh: how many successive similarities are averaged.
    :param exclude_modules: modules never selected even if ``target_modules`` matches them.
    :param weight_group_size: Q-GaLore: elements per quantization group of an int8 weight (the
        reference's ``weight_group_size``; ``<= 0``: per row).
    :param stochastic_round: Q-GaLore: re-quantize the int8 weights with stochastic rounding (the
        reference's ``stochastic_round``); ``False`` rounds to nearest (updates below half a step are lost).
    """

    rank: int = 128
    target_modules: str | list[str] | None = None
    update_proj_gap: int = 50
    galore_scale: float = 1.0
    proj_type: str = "std"
    optim_per_parameter: bool = False
    quantize: bool = False
    proj_quant: bool = False
    proj_bits: int = 4
    proj_group_size: int = 256
    cos_threshold: float = 0.4
    gamma_proj: int = 2
    queue_size: int = 5
    exclude_modules: str | list[str] | None = None
    weight_group_size: int = 256
    stochastic_round: bool = True

    @property
    def q_galore(self) -> bool:
        """Whether this is Q-GaLore (``quantize`` or ``proj_quant``): quantized storage and lazy refresh."""
        return bool(self.quantize or self.proj_quant)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"GaLoreConfig.rank must be a positive int, got {self.rank!r}; use e.g. rank=128")
        if not isinstance(self.update_proj_gap, int) or self.update_proj_gap < 1:
            raise ConfigError(
                f"GaLoreConfig.update_proj_gap must be a positive int, got {self.update_proj_gap!r};"
                " use e.g. update_proj_gap=50"
            )
        if self.proj_type not in PROJ_TYPES:
            raise ConfigError(f"GaLoreConfig.proj_type must be one of {PROJ_TYPES}, got {self.proj_type!r}")
        if self.proj_bits not in QUANT_BITS:
            raise ConfigError(f"GaLoreConfig.proj_bits must be one of {QUANT_BITS}, got {self.proj_bits!r}")
        for field in ("proj_group_size", "weight_group_size"):
            if not isinstance(getattr(self, field), int):
                raise ConfigError(f"GaLoreConfig.{field} must be an int (<= 0: one group per row)")
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise ConfigError(f"GaLoreConfig.queue_size must be a positive int, got {self.queue_size!r}")
        if not isinstance(self.gamma_proj, (int, float)) or self.gamma_proj < 1:
            raise ConfigError(f"GaLoreConfig.gamma_proj must be >= 1 (the gap never shrinks), got {self.gamma_proj!r}")
        if not isinstance(self.cos_threshold, (int, float)) or not -1.0 <= self.cos_threshold <= 1.0:
            raise ConfigError(f"GaLoreConfig.cos_threshold must lie in [-1, 1], got {self.cos_threshold!r}")


# ---------------------------------------------------------------------------
# projection math (pure, per tensor)
# ---------------------------------------------------------------------------
class Projection(NamedTuple):
    """The orthogonal factor(s) of one gradient's SVD and which side they multiply.

    Under Q-GaLore's ``proj_quant`` the factors are :class:`~functuner.optim.quant.QuantizedTensor`\\ s,
    dequantized where they are used.
    """

    side: str  # "left" (P^T G), "right" (G Q^T) or "full" (P^T G Q^T)
    mats: tuple[torch.Tensor | QuantizedTensor, ...]

    def dense(self) -> tuple[torch.Tensor, ...]:
        """The factors as dense tensors (quantized ones dequantized)."""
        return tuple(dequantize(m) if isinstance(m, QuantizedTensor) else m for m in self.mats)


def projection_side(shape: Sequence[int], proj_type: str) -> str:
    """Which side of an ``m x n`` gradient ``proj_type`` projects, as ``galore_torch``'s projector decides."""
    m, n = shape[0], shape[1]
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("right", "left", "full"):
        return proj_type
    raise ConfigError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def low_rank_shape(shape: Sequence[int], rank: int, side: str) -> tuple[int, int]:
    """Shape of the projected gradient (and of Adam's moments) for an ``m x n`` weight."""
    m, n = shape[0], shape[1]
    r = min(rank, m, n)
    return {"right": (m, r), "left": (r, n), "full": (r, r)}[side]


def compute_projection(grad: torch.Tensor, rank: int, side: str) -> Projection:
    """SVD of ``grad`` (in float32 when it is not), keeping the leading ``rank`` singular vectors.

    ``right`` keeps ``Vh[:r]`` (``r x n``), ``left`` keeps ``U[:, :r]`` (``m x r``), ``full`` both; the
    factors come back in ``grad``'s dtype.
    """
    matrix = grad if grad.dtype == torch.float32 else grad.float()
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    if side == "right":
        mats: tuple[torch.Tensor, ...] = (vh[:rank, :],)
    elif side == "left":
        mats = (u[:, :rank],)
    else:
        mats = (u[:, :rank], vh[:rank, :])
    return Projection(side, tuple(t.to(grad.dtype) for t in mats))


def project(grad: torch.Tensor, proj: Projection) -> torch.Tensor:
    """The low-rank gradient: ``G Q^T`` (right), ``P^T G`` (left) or ``P^T G Q^T`` (full)."""
    mats = proj.dense()
    if proj.side == "right":
        return grad @ mats[0].t()
    if proj.side == "left":
        return mats[0].t() @ grad
    return (mats[0].t() @ grad) @ mats[1].t()


def project_back(low: torch.Tensor, proj: Projection, scale: float) -> torch.Tensor:
    """Back to the weight's shape, times ``scale``."""
    mats = proj.dense()
    if proj.side == "right":
        full = low @ mats[0]
    elif proj.side == "left":
        full = mats[0] @ low
    else:
        full = (mats[0] @ low) @ mats[1]
    return full * scale


def leading_vector(proj: Projection) -> torch.Tensor:
    """The leading singular vector of a (dense) projection: ``Vh[0]`` (right) or ``U[:, 0]`` (left / full)."""
    mat = proj.mats[0]
    assert isinstance(mat, torch.Tensor)
    return (mat[:1, :] if proj.side == "right" else mat[:, :1]).flatten().float()


# ---------------------------------------------------------------------------
# the Adam(W) step of one tensor (pure)
# ---------------------------------------------------------------------------
class Hyper(NamedTuple):
    """Hyper-parameters of one tensor's update; ``rank=None`` means plain AdamW (no projection)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    correct_bias: bool = True
    rank: int | None = None
    update_proj_gap: int = 200
    scale: float = 1.0
    proj_type: str = "std"
    lazy: bool = False  # Q-GaLore: grow the gap when successive projectors agree
    cos_threshold: float = 0.4
    gamma_proj: float = 2.0
    queue_size: int = 5
    proj_bits: int | None = None  # Q-GaLore's proj_quant: store projectors in this many bits
    proj_group_size: int = 256


class ParamState(NamedTuple):
    """One tensor's optimizer state: step count, Adam moments (low-rank under GaLore), current projector.

    Q-GaLore's lazy refresh adds the tensor's current ``gap`` (``None``: the configured
    ``update_proj_gap``), the ``queue`` of recent cosine similarities and the ``past`` leading vector.
    """

    step: int
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    proj: Projection | None
    gap: int | None = None
    queue: tuple[float, ...] = ()
    past: torch.Tensor | None = None


def init_param_state(param: torch.Tensor | QuantizedTensor, hp: Hyper) -> ParamState:
    """Zero moments, shaped for the projected gradient when ``hp.rank`` is set and ``param`` is 2-D.

    A Q-GaLore int8 weight (:class:`~functuner.optim.quant.QuantizedTensor`) gets moments in its
    original float dtype.
    """
    if hp.rank is not None and len(param.shape) == 2:
        shape: tuple[int, ...] = low_rank_shape(param.shape, hp.rank, projection_side(param.shape, hp.proj_type))
    else:
        shape = tuple(param.shape)
    zeros = torch.zeros(shape, dtype=param.dtype, device=param.device)
    return ParamState(0, zeros, zeros.clone(), None)


def refresh_projection(grad: torch.Tensor, st: ParamState, hp: Hyper) -> ParamState:
    """``st`` with a new projector for ``grad`` (the moments untouched); Q-GaLore's lazy rule and quantization.

    With ``hp.lazy``, as the reference ``q_galore_torch`` projector: the cosine similarity between the
    new and the previous leading singular vector joins a queue of at most ``queue_size``; when the queue
    is full and its mean is at least ``cos_threshold``, the gap becomes ``int(gap * gamma_proj)``.
    With ``hp.proj_bits`` the factors are stored quantized (round to nearest, ``proj_group_size`` groups).
    """
    assert hp.rank is not None
    proj = compute_projection(grad, hp.rank, projection_side(grad.shape, hp.proj_type))
    gap, queue, past = st.gap, st.queue, st.past
    if hp.lazy:
        gap = gap if gap is not None else hp.update_proj_gap
        lead = leading_vector(proj)
        if past is not None:
            cos = float(torch.nn.functional.cosine_similarity(past, lead, dim=0))
            queue = (*queue, cos)[-hp.queue_size :]
            if len(queue) == hp.queue_size and sum(queue) / hp.queue_size >= hp.cos_threshold:
                gap = int(gap * hp.gamma_proj)
        past = lead
    if hp.proj_bits is not None:
        mats = tuple(quantize(m, bits=hp.proj_bits, group_size=hp.proj_group_size) for m in proj.dense())
        proj = Projection(proj.side, mats)
    return st._replace(proj=proj, gap=gap, queue=queue, past=past)


def adam_direction(
    grad: torch.Tensor, st: ParamState, hp: Hyper, *, inplace: bool = False
) -> tuple[torch.Tensor, float, ParamState]:
    """``(direction, step_size, new_state)``: the weight moves by ``-step_size * direction``.

    Pure by default: ``st``'s tensors are not modified.  ``inplace=True`` (the eager optimizer's choice)
    updates the moments in place instead, with the same arithmetic, so no second copy of the state is
    allocated during the step.  Weight decay is not included (it needs the updated weight:
    ``p <- p' - lr * weight_decay * p'`` with ``p' = p - step_size * direction``, as ``galore_torch`` does).
    """
    galore = hp.rank is not None and grad.dim() == 2
    if galore:
        gap = st.gap if st.gap is not None else hp.update_proj_gap
        if st.proj is None or st.step % gap == 0:
            st = refresh_projection(grad, st, hp)
        assert st.proj is not None
        grad = project(grad, st.proj)
    proj = st.proj
    beta1, beta2 = hp.betas
    step = st.step + 1
    if inplace:
        exp_avg = st.exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq = st.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    else:
        exp_avg = torch.add(st.exp_avg * beta1, grad, alpha=1.0 - beta1)
        exp_avg_sq = (st.exp_avg_sq * beta2).addcmul(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(hp.eps)
    step_size = hp.lr
    if hp.correct_bias:
        step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    direction = exp_avg / denom
    if galore:
        assert proj is not None
        direction = project_back(direction, proj, hp.scale)
    return direction, step_size, st._replace(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


# ---------------------------------------------------------------------------
# target selection
# ---------------------------------------------------------------------------
def galore_targets(model: nn.Module, config: GaLoreConfig, *, prefix: str = "") -> tuple[str, ...]:
    """Names (``named_parameters`` style) of the 2-D weights ``config`` selects, in model order.

    Uses functuner's target rules (:func:`functuner.core.targets.select_modules`); raises
    :class:`~functuner.errors.TargetError` when a selected module has no 2-D ``weight``.
    """
    spec = config.target_modules if config.target_modules is not None else "all-linear"
    chosen = select_modules(model, spec, exclude_modules=config.exclude_modules, field="GaLoreConfig.target_modules")
    names = []
    for name, module in chosen:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TargetError(
                f"GaLoreConfig.target_modules selected {name!r} ({type(module).__name__}), which has no 2-D weight;"
                " GaLore projects matrices only: narrow target_modules or add it to exclude_modules"
            )
        names.append(f"{prefix}{name}.weight")
    return tuple(names)


# ---------------------------------------------------------------------------
# the functional transformation
# ---------------------------------------------------------------------------
def galore_adamw(
    lr: float | Callable[[int], float] = 1e-3,
    *,
    config: GaLoreConfig | None = None,
    targets: Collection[str] | Callable[[str, torch.Tensor], bool] = (),
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    correct_bias: bool = True,
) -> GradientTransformation:
    """GaLore-AdamW as a pure :class:`~functuner.optim.base.GradientTransformation`.

    :param lr: a float, or a function of the (0-based) step count of each tensor returning the rate.
    :param config: rank, ``update_proj_gap``, ``galore_scale`` and ``proj_type``; ``None`` means plain AdamW.
        A Q-GaLore config (``quantize`` / ``proj_quant``) stores projectors in ``proj_bits`` bits and refreshes
        them lazily; ``params`` may then hold int8 weights (:func:`functuner.optim.qgalore.quantize_params`),
        whose updates :func:`functuner.optim.qgalore.apply_quantized_updates` applies.
    :param targets: names of the leaves to project (e.g. :func:`galore_targets`), or a predicate
        ``(name, tensor) -> bool``; other leaves get plain AdamW, as in ``galore_torch``'s non-GaLore groups.
        Only 2-D leaves are ever projected.
    :returns: ``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``; ``params``
        is needed only when ``weight_decay > 0``.  The state is ``{name: ParamState}``.
    """

    def is_target(name: str, t: torch.Tensor) -> bool:
        if config is None or len(t.shape) != 2:
            return False
        return targets(name, t) if callable(targets) else name in targets

    def hyper(name: str, t: torch.Tensor, step: int) -> Hyper:
        rate = lr(step) if callable(lr) else lr
        if is_target(name, t):
            assert config is not None
            return Hyper(
                rate,
                betas,
                eps,
                weight_decay,
                correct_bias,
                config.rank,
                config.update_proj_gap,
                config.galore_scale,
                config.proj_type,
                config.q_galore,
                float(config.cos_threshold),
                float(config.gamma_proj),
                config.queue_size,
                config.proj_bits if config.proj_quant else None,
                config.proj_group_size,
            )
        return Hyper(rate, betas, eps, weight_decay, correct_bias)

    def init(params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {name: init_param_state(t, hyper(name, t, 0)) for name, t in params.items()}

    def update(
        grads: Mapping[str, torch.Tensor],
        state: Mapping[str, Any],
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
        missing = [n for n in grads if n not in state]
        if missing:
            raise ConfigError(
                f"galore_adamw.update: the state has no entry for {missing[:3]} (of {len(missing)}); build it with"
                " init(params) from the same pytree, or resync_state(transform, state, params) after the pytree changed"
            )
        if weight_decay > 0.0 and params is None:
            raise ConfigError("galore_adamw.update: weight_decay > 0 needs params; call update(grads, state, params)")
        new_state = dict(state)
        updates = {}
        with torch.no_grad():
            for name, g in grads.items():
                st: ParamState = state[name]
                hp = hyper(name, g, st.step)
                direction, step_size, new_state[name] = adam_direction(g, st, hp)
                delta = direction * -step_size
                if hp.weight_decay > 0.0:
                    assert params is not None
                    p = params[name]
                    moved = (dequantize(p) if isinstance(p, QuantizedTensor) else p) + delta
                    delta = delta - moved * (hp.lr * hp.weight_decay)
                updates[name] = delta
        return rebuild_like(grads, updates), new_state

    return GradientTransformation(init, update)


def adamw(
    lr: float | Callable[[int], float] = 1e-3,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    correct_bias: bool = True,
) -> GradientTransformation:
    """Plain AdamW (``galore_torch``'s rule without projection) as a pure transformation."""
    return galore_adamw(lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
