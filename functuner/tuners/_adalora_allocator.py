"""AdaLoRA's rank allocator as a pure function of the training state (PEFT's ``RankAllocator``, peft 0.21).

Public as ``functuner.tuners.adalora.allocator`` (this module is private so that the
AdaLoRA tuner stays one documented module).

PEFT keeps the allocator inside the model and mutates parameters in place
(``model.base_model.update_and_allocate(step)`` after ``loss.backward()``).  Here the
state is a value and every call returns new values::

    state = allocator.init_state()
    for step in range(total_step):
        loss, grads = ...                                  # gradients of the AdaLoRA params
        params = optimizer_update(params, grads)           # PEFT: optimizer.step() first
        params, state = allocator.update_and_allocate(params, grads, state, step)

What a call does at ``step`` (``T = total_step``, PEFT's schedule):

* ``step < T - tfinal``: update the importance EMAs from ``|p * grad|`` of every
  ``lora_A`` / ``lora_E`` / ``lora_B`` tensor; the budget (total kept triplets) falls
  cubically from ``sum(init_r)`` to ``target_r * modules`` after ``tinit`` steps; every
  ``deltaT`` steps the singular values ``E`` scoring at or below the budget's
  threshold are zeroed;
* ``step == T - tfinal``: the final allocation (budget ``target_r * modules``) is
  fixed in ``state.rank_pattern`` and the EMAs are reset;
* ``step > T - tfinal``: ``E`` is masked with the fixed allocation.

``grads`` must hold the gradient of every ``lora_A``/``lora_E``/``lora_B`` key for
the first phase (it is not read otherwise).  Nothing here is random.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from ..core.params import TunerParams
from ..errors import ConfigError, ParamsMismatchError

__all__ = ["AllocatorState", "budget_schedule", "init_state", "triplets", "update_and_allocate"]


class AllocatorState(NamedTuple):
    """The allocator's training state: importance EMAs per params key, and the fixed allocation once set.

    ``rank_pattern`` maps each adapted module's ``lora_E`` key to the triplets it
    keeps (PEFT's ``config.rank_pattern``); ``None`` until the first masking.
    """

    exp_avg_ipt: Mapping[str, torch.Tensor]
    exp_avg_unc: Mapping[str, torch.Tensor]
    rank_pattern: Mapping[str, tuple[bool, ...]] | None = None


def init_state() -> AllocatorState:
    """The state before the first step: no EMAs, no allocation."""
    return AllocatorState({}, {}, None)


def triplets(params: TunerParams) -> dict[str, dict[str, str]]:
    """``{module: {"lora_A": key, "lora_E": key, "lora_B": key}}`` of ``params``, in sorted module order."""
    ad = params.adapter_name
    out: dict[str, dict[str, str]] = {}
    for key in params:
        for t in ("lora_A", "lora_E", "lora_B"):
            if key.endswith(f".{t}.{ad}") and ".modules_to_save." not in key:
                out.setdefault(key[: -len(f".{t}.{ad}")], {})[t] = key
    bad = sorted(m for m, d in out.items() if len(d) != 3)
    if bad or not out:
        raise ParamsMismatchError(f"AdaLoRA allocator: params need lora_A, lora_E and lora_B per module (bad: {bad})")
    return dict(sorted(out.items()))


def budget_schedule(config: object, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
    """PEFT's ``budget_schedule``: ``(budget, whether to mask at this step)``."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step  # type: ignore[attr-defined]
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    mul = 1 - (step - tinit) / (total - tfinal - tinit)
    budget = int((init_budget - target_budget) * (mul**3) + target_budget)
    return budget, step % config.deltaT == 0  # type: ignore[attr-defined]


def _update_ema(
    params: TunerParams, grads: Mapping[str, torch.Tensor], state: AllocatorState, keys: list[str]
) -> AllocatorState:
    cfg = params.config
    b1, b2 = float(cfg.beta1), float(cfg.beta2)
    ipt_avg, unc_avg = dict(state.exp_avg_ipt), dict(state.exp_avg_unc)
    for k in keys:
        if k not in grads or grads[k] is None:
            raise ParamsMismatchError(f"AdaLoRA allocator: no gradient for {k!r} (pass the gradients of every triplet)")
        p, g = params[k].detach(), grads[k].detach()
        ipt = (p * g).abs()
        avg = b1 * ipt_avg.get(k, torch.zeros_like(p)) + (1 - b1) * ipt
        unc_avg[k] = b2 * unc_avg.get(k, torch.zeros_like(p)) + (1 - b2) * (ipt - avg).abs()
        ipt_avg[k] = avg
    return AllocatorState(ipt_avg, unc_avg, state.rank_pattern)


def _mask_to_budget(
    params: TunerParams, state: AllocatorState, trip: dict[str, dict[str, str]], init_budget: int, budget: int
) -> dict[str, tuple[bool, ...]]:
    """PEFT's ``mask_to_budget``: keep the triplets scoring above the ``init - budget``-th smallest score."""
    if not all(k in state.exp_avg_ipt for d in trip.values() for k in d.values()):
        raise ConfigError("AdaLoRA allocator: masking before any importance update (the schedule starts at step 0)")
    score = {m: {t: state.exp_avg_ipt[k] * state.exp_avg_unc[k] for t, k in d.items()} for m, d in trip.items()}
    sums: dict[str, torch.Tensor] = {}
    for m, s in score.items():
        ab = torch.cat([s["lora_A"].mean(dim=1, keepdim=True), s["lora_B"].mean(dim=0).view(-1, 1)], dim=1)
        sums[m] = s["lora_E"].view(-1) + ab.sum(dim=1)
    bad = sorted(m for m, v in sums.items() if not torch.isfinite(v).all())
    if bad:
        raise ParamsMismatchError(
            f"AdaLoRA allocator: non-finite importance scores for modules {bad} (the params or gradients hold NaN/inf:"
            " training diverged); nothing was masked"
        )
    k = init_budget - budget
    if k <= 0:
        return {trip[m]["lora_E"]: tuple([True] * len(v)) for m, v in sums.items()}
    threshold = torch.kthvalue(torch.cat(list(sums.values())), k=k)[0].item()
    return {trip[m]["lora_E"]: tuple(bool(b) for b in (v > threshold).tolist()) for m, v in sums.items()}


def _apply_mask(params: TunerParams, pattern: Mapping[str, tuple[bool, ...]]) -> TunerParams:
    new = dict(params)
    for key, keep in pattern.items():
        e = params[key]
        mask = torch.tensor(keep, device=e.device).view(-1, 1)
        new[key] = torch.where(mask, e, torch.zeros((), dtype=e.dtype, device=e.device))
    return params.replace(new)


def update_and_allocate(
    params: TunerParams, grads: Mapping[str, torch.Tensor], state: AllocatorState, global_step: int
) -> tuple[TunerParams, AllocatorState]:
    """One allocator step (see the module docstring): new params (``E`` masked) and the new state. Pure."""
    cfg = params.config
    if getattr(cfg, "peft_type", None) != "ADALORA":
        raise ConfigError(f"adalora.allocator needs AdaLoRA params, got a {type(cfg).__name__}")
    trip = triplets(params)
    keys = [k for d in trip.values() for k in d.values()]
    init_budget = sum(int(params[d["lora_A"]].shape[0]) for d in trip.values())
    target_budget = int(cfg.target_r) * len(trip)
    edge = cfg.total_step - cfg.tfinal
    if global_step < edge:
        state = _update_ema(params, grads, state, keys)
        budget, mask_now = budget_schedule(cfg, global_step, init_budget, target_budget)
        if not mask_now:
            return params, state
        pattern = _mask_to_budget(params, state, trip, init_budget, budget)
        return _apply_mask(params, pattern), AllocatorState(state.exp_avg_ipt, state.exp_avg_unc, pattern)
    if global_step == edge:
        budget, _ = budget_schedule(cfg, global_step, init_budget, target_budget)
        pattern = _mask_to_budget(params, state, trip, init_budget, budget)
        return _apply_mask(params, pattern), AllocatorState({}, {}, pattern)
    if state.rank_pattern is None:
        raise ConfigError(f"AdaLoRA allocator: step {global_step} is after the final allocation, which never ran")
    return _apply_mask(params, state.rank_pattern), state
