"""Training-loop work a tuner adds in the shim: a loss term in the forward, a step between optimizer steps.

Design note: PEFT's AdaLoRA model does two things besides its layers: its forward
adds a regulariser to ``outputs.loss``, and ``model.base_model.update_and_allocate(step)``
(called after ``optimizer.step()``, before ``zero_grad()``) updates importance
estimates and masks ranks, keeping the allocator's state in the model.  A tuner
says what it needs through its ``Tuner.training`` hook (pure functions of the
params); this module runs them on a ``SwiftModel``'s live state:

* :func:`outputs`: ``SwiftModel.forward`` passes its outputs through each active
  adapter's ``loss`` (a call without a tensor ``loss`` returns at once);
* :func:`attach`: a new adapter's step becomes a method of the wrapped model
  (``model.base_model.update_and_allocate``, where PEFT users call it; through
  attribute fall-through also ``model.update_and_allocate``): a :class:`StepMethod`;
* :func:`run_step`: the step reads each trainable adapter's ``.grad``, computes
  every new value first (a failure changes nothing), then writes the changed
  tensors in place (optimizers keep their references) and keeps the new state on
  the adapter (``AdapterEntry.train_state``, copied with the model);
* :func:`as_saved`: the params ``save_pretrained`` writes (AdaLoRA's allocated ranks);
* :class:`TrainingStepCallback`: the step for ``transformers.Trainer`` (after each
  optimizer step, with ``state.global_step``), as PEFT's callbacks do for its other
  budgeted tuner (AdaMSS); neither transformers nor PEFT calls AdaLoRA's step itself.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.params import TunerParams
from ..errors import ConfigError, FunctunerError
from .state import AdapterEntry, ShimState

__all__ = ["StepMethod", "TrainingStepCallback", "as_saved", "attach", "outputs", "run_step"]


def outputs(state: ShimState, out: Any) -> Any:
    """``out`` passed through the ``loss`` hook of each active adapter that has one (in name order)."""
    if not isinstance(getattr(out, "loss", None), torch.Tensor):
        return out
    for name in sorted(state.active_set()):
        adapter = state.adapters.get(name)
        if adapter is not None and adapter.tuner.training is not None:
            out = adapter.tuner.training.loss(adapter.params, out)
    return out


class StepMethod:
    """``model.<step_name>(global_step)`` on the wrapped model: runs :func:`run_step` on the shim's state.

    A plain picklable object (not a closure), so ``copy.deepcopy`` / ``pickle`` of the ``SwiftModel`` give the
    copy a method bound to the copy's own state.
    """

    def __init__(self, state: ShimState, step_name: str) -> None:
        self.state = state
        self.step_name = step_name

    def __call__(self, global_step: int) -> None:
        run_step(self.state, self.step_name, global_step)

    def __repr__(self) -> str:
        names = sorted(a.name for a in _stepping(self.state, self.step_name))
        return f"<functuner {self.step_name} of adapters {names}>"


def attach(state: ShimState, names: Any) -> None:
    """Offer the steps of adapters ``names`` as methods of the wrapped model (an attribute the model has is kept)."""
    model = state.model
    for name in names:
        training = state.adapters[name].tuner.training
        if training is None:
            continue
        current = getattr(model, training.step_name, None)
        if current is None:
            model.__dict__[training.step_name] = StepMethod(state, training.step_name)
        elif not isinstance(current, StepMethod):
            continue  # the model's own attribute of that name wins; the step stays reachable via run_step


def _stepping(state: ShimState, step_name: str, trainable_only: bool = True) -> list[AdapterEntry]:
    out = []
    for adapter in state.adapters.values():
        training = adapter.tuner.training
        if training is None or training.step_name != step_name:
            continue
        own = [t for k, t in adapter.tensors.items() if k not in adapter.shared]
        if not trainable_only or any(t.requires_grad for t in own):
            out.append(adapter)
    return out


def run_step(state: ShimState, step_name: str, global_step: int) -> None:
    """One ``step_name`` step for every trainable adapter offering it: all computed first, then written in place.

    Call it after ``loss.backward()`` and ``optimizer.step()``, before ``zero_grad()`` (PEFT's order): the
    step reads the adapters' ``.grad``.  Raises :class:`ConfigError` when no trainable adapter offers the step.
    """
    if isinstance(global_step, bool) or not isinstance(global_step, int):
        raise ConfigError(f"{step_name}(global_step): expected an int step, got {global_step!r}")
    adapters = _stepping(state, step_name)
    if not adapters:
        have = sorted(f"{a.name}: {a.swift_type}" for a in state.adapters.values())
        raise ConfigError(
            f"{step_name}({global_step}): no trainable adapter offers this step (adapters: {have}); it belongs to"
            " AdaLoRA adapters, which must be trainable (not loaded with is_trainable=False)"
        )
    planned: list[tuple[AdapterEntry, TunerParams, TunerParams, Any]] = []
    with torch.no_grad():
        for adapter in adapters:
            training = adapter.tuner.training
            assert training is not None
            live = adapter.params
            grads = {k: t.grad for k, t in live.items() if t.grad is not None}
            before = adapter.train_state if adapter.train_state is not None else training.init_state()
            try:
                new, after = training.step(live, grads, before, global_step)
            except FunctunerError as e:
                raise type(e)(
                    f"adapter {adapter.name!r}: {step_name}({global_step}): {e}; in a training loop call it after"
                    " loss.backward() and optimizer.step(), before zero_grad(); nothing was changed"
                ) from None
            planned.append((adapter, live, new, after))
        for adapter, live, new, after in planned:
            for k, t in live.items():
                if new[k] is not t:
                    t.copy_(new[k])
            adapter.train_state = after


def as_saved(adapter: AdapterEntry) -> TunerParams:
    """The adapter's params as ``save_pretrained`` writes them (detached; the tuner's ``saved`` form after a step)."""
    params = adapter.params.map(lambda t: t.detach())
    training = adapter.tuner.training
    if training is None or adapter.train_state is None:
        return params
    return training.saved(params, adapter.train_state)


try:
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is installed wherever a Trainer runs
    _CallbackBase = object  # type: ignore[assignment,misc]


class TrainingStepCallback(_CallbackBase):
    """Run the adapters' training steps (AdaLoRA's ``update_and_allocate``) in a ``transformers.Trainer``.

    ``Trainer(model=swift_model, ..., callbacks=[TrainingStepCallback()])``: after every optimizer step
    (before ``zero_grad``) each step of the model's trainable adapters runs with ``state.global_step``, the
    number of optimizer steps before this one: what a hand-written loop ``for step in range(total_step)`` passes.
    """

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        shim = getattr(model, "__dict__", {}).get("_state")
        if isinstance(shim, ShimState):
            names = {a.tuner.training.step_name for a in shim.adapters.values() if a.tuner.training is not None}
            for step_name in sorted(names):
                if _stepping(shim, step_name):
                    run_step(shim, step_name, int(state.global_step))
        return control
