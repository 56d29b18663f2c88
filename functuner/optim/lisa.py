"""LISA: layerwise importance sampling, as a pure schedule over which layers' full weights are trainable.

LISA (Pan et al., 2024, arXiv:2403.17919) trains every parameter outside the decoder stack (embeddings,
final norm, head) at every step, and of the ``L`` decoder layers only ``n_layers``, sampled uniformly
without replacement and re-sampled every ``step_interval`` steps.  The references (LMFlow's
``DynamicLayerActivationCallback`` / ``LISATrainer`` and ms-swift's ``LISACallback``) take the decoder
layers to be the model's first ``nn.ModuleList``, flip ``requires_grad`` at ``on_step_begin`` when
``global_step % step_interval == 0``, and (LMFlow's trainer) drop the optimizer state of the layers they
deactivate and put the newly active layers' parameters into the optimizer's groups.

Here the schedule is a pure function of ``(step, seed)``: :func:`lisa_active_layers` seeds a fresh
``torch.Generator`` from ``(seed, step // step_interval)`` and takes the first ``n_layers`` of a random
permutation, so any step's layers can be computed without replaying the earlier ones (resuming from a
checkpoint gives the same layers).  The references draw from NumPy's global generator instead, so their
exact layers cannot be reproduced; the distribution (uniform over ``n_layers``-subsets) and the update
rule are the same (``tests/optim`` checks both).

* functional: :class:`LISASchedule` ``.trainable(params, step)`` returns the trainable sub-pytree and
  ``.sync_state(transform, state, trainable, step)`` rebuilds the optimizer state at the switches;
* eager / Trainer: :class:`LISACallback` (a ``transformers.TrainerCallback``; :meth:`LISACallback.switch`
  also works in a hand-written loop) flips ``requires_grad`` and rebuilds the ``torch.optim`` state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import TrainerCallback

from ..errors import ConfigError, TargetError
from .base import GradientTransformation, rebuild_like, resync_state

__all__ = ["LISACallback", "LISAConfig", "LISASchedule", "find_layers", "lisa_active_layers"]

Tree = TypeVar("Tree", bound=Mapping[str, torch.Tensor])


@dataclass(frozen=True)
class LISAConfig:
    """LISA's settings (SWIFT's command-line names: ``lisa_activated_layers``, ``lisa_step_interval``).

    :param n_layers: decoder layers trainable at a time (SWIFT's ``lisa_activated_layers``).
    :param step_interval: steps between re-sampling (SWIFT's ``lisa_step_interval``, default 20).
    :param seed: seeds the schedule; the same seed gives the same layers at every step.
    :param layers_attribute: dotted path of the decoder ``nn.ModuleList`` (e.g. ``"model.layers"``);
        ``None`` takes the model's first ``nn.ModuleList``, as the references do.
    """

    n_layers: int = 2
    step_interval: int = 20
    seed: int = 0
    layers_attribute: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise ConfigError(f"LISAConfig.n_layers must be a positive int, got {self.n_layers!r}; use e.g. n_layers=2")
        if not isinstance(self.step_interval, int) or self.step_interval < 1:
            raise ConfigError(
                f"LISAConfig.step_interval must be a positive int, got {self.step_interval!r}; use e.g. step_interval=20"
            )


def _period_seed(seed: int, period: int) -> int:
    digest = hashlib.blake2b(f"functuner.lisa:{seed}:{period}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def lisa_active_layers(
    step: int, *, num_layers: int, n_layers: int, step_interval: int, seed: int = 0
) -> tuple[int, ...]:
    """The sorted indices of the decoder layers trainable at ``step`` (0-based): a pure function.

    Uniform over the ``n_layers``-subsets of ``range(num_layers)``, re-drawn every ``step_interval`` steps
    from a ``torch.Generator`` seeded by ``(seed, step // step_interval)``.
    """
    if not 1 <= n_layers <= num_layers:
        raise ConfigError(
            f"LISA: n_layers={n_layers} must lie in [1, {num_layers}] (the model has {num_layers} decoder layers);"
            " lower LISAConfig.n_layers"
        )
    if step < 0:
        raise ConfigError(f"LISA: step must be >= 0, got {step}")
    gen = torch.Generator().manual_seed(_period_seed(seed, step // step_interval))
    return tuple(sorted(torch.randperm(num_layers, generator=gen)[:n_layers].tolist()))


def find_layers(model: nn.Module, layers_attribute: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(dotted name, module list)`` of the decoder layers: ``layers_attribute`` or the first ``nn.ModuleList``."""
    if layers_attribute is not None:
        try:
            layers = model.get_submodule(layers_attribute)
        except AttributeError as exc:
            raise TargetError(
                f"LISAConfig.layers_attribute={layers_attribute!r} is not a submodule of {type(model).__name__};"
                " give the dotted path of its decoder nn.ModuleList (e.g. 'model.layers')"
            ) from exc
        if not isinstance(layers, nn.ModuleList):
            raise TargetError(
                f"LISAConfig.layers_attribute={layers_attribute!r} is a {type(layers).__name__}, expected nn.ModuleList"
            )
        return layers_attribute, layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            return name, module
    raise TargetError(
        f"LISA found no nn.ModuleList in {type(model).__name__}; set LISAConfig.layers_attribute to its decoder layers"
    )


class LISASchedule:
    """LISA's schedule bound to one model's parameter names; immutable and pure.

    :meth:`active_layers`, :meth:`trainable_names` and :meth:`trainable` depend on ``step`` and the
    config only.  Names follow ``model.named_parameters()`` (optionally under a ``prefix``).
    """

    def __init__(
        self, names: Sequence[str], layers_attribute: str, num_layers: int, config: LISAConfig, prefix: str = ""
    ) -> None:
        self.config = config
        self.layers_attribute = layers_attribute
        self.num_layers = num_layers
        lead = f"{prefix}{layers_attribute}."
        self.always: tuple[str, ...] = tuple(n for n in names if not n.startswith(lead))
        per_layer: list[list[str]] = [[] for _ in range(num_layers)]
        for n in names:
            if n.startswith(lead):
                idx = int(n[len(lead) :].split(".", 1)[0])
                per_layer[idx].append(n)
        self.layer_names: tuple[tuple[str, ...], ...] = tuple(tuple(x) for x in per_layer)
        self._order = {n: i for i, n in enumerate(names)}
        lisa_active_layers(0, num_layers=num_layers, n_layers=config.n_layers, step_interval=config.step_interval)

    @classmethod
    def from_model(cls, model: nn.Module, config: LISAConfig, *, prefix: str = "") -> LISASchedule:
        """The schedule for ``model``'s parameters (frozen or not: LISA decides what trains)."""
        attr, layers = find_layers(model, config.layers_attribute)
        names = [prefix + n for n, _ in model.named_parameters()]
        return cls(names, attr, len(layers), config, prefix)

    def active_layers(self, step: int) -> tuple[int, ...]:
        c = self.config
        return lisa_active_layers(
            step, num_layers=self.num_layers, n_layers=c.n_layers, step_interval=c.step_interval, seed=c.seed
        )

    def switches_at(self, step: int) -> bool:
        """Whether ``step`` starts a new sampling period (the references' ``global_step % step_interval == 0``)."""
        return step % self.config.step_interval == 0

    def trainable_names(self, step: int) -> tuple[str, ...]:
        """Every parameter outside the decoder layers, plus the active layers' parameters, in model order."""
        chosen = [*self.always, *(n for i in self.active_layers(step) for n in self.layer_names[i])]
        return tuple(sorted(chosen, key=self._order.__getitem__))

    def sync_state(
        self,
        transform: GradientTransformation,
        state: Mapping[str, Any] | None,
        trainable: Mapping[str, torch.Tensor],
        step: int,
    ) -> dict[str, Any]:
        """The optimizer state for ``trainable`` at ``step``, with the reference's reset rule.

        At a period start (``step > 0``) the state of every decoder-layer leaf is dropped and re-initialized
        (LMFlow's ``LISATrainer`` deletes the optimizer state of all previously active layers); the leaves
        outside the layers keep theirs.  Otherwise new leaves get fresh state (:func:`resync_state`).
        """
        if state is not None and step > 0 and self.switches_at(step):
            keep = set(self.always)
            state = {n: s for n, s in state.items() if n in keep}
        return resync_state(transform, state, trainable)

    def trainable(self, params: Tree, step: int) -> Tree:
        """The sub-pytree of ``params`` (a ``{name: tensor}`` dict or TunerParams) trainable at ``step``."""
        names = self.trainable_names(step)
        absent = [n for n in names if n not in params]
        if absent:
            raise TargetError(
                f"LISASchedule.trainable: params lacks {absent[:3]} ({len(absent)} missing); pass every parameter of"
                " the model the schedule was built from (e.g. dict(model.named_parameters()))"
            )
        return rebuild_like(params, {n: params[n] for n in names})  # type: ignore[return-value]


def _unwrap(optimizer: Any) -> torch.optim.Optimizer | None:
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class LISACallback(TrainerCallback):
    """LISA for ``transformers.Trainer`` (and eager loops through :meth:`switch`).

    Construction freezes every decoder layer except those active at step 0 (the Trainer builds its
    optimizer afterwards, over the parameters that require grad).  At ``on_step_begin`` of a step that
    starts a new period, :meth:`switch` flips ``requires_grad``, deletes the optimizer state of the
    deactivated layers' parameters, removes them from their parameter groups, and appends the newly
    active ones to the group that holds the same parameter of another layer (so weight decay and GaLore
    keys carry over), as LMFlow's ``LISATrainer`` rebuilds its groups.
    """

    def __init__(self, model: nn.Module, config: LISAConfig) -> None:
        super().__init__()
        self.model = model
        self.schedule = LISASchedule.from_model(model, config)
        _, self.layers = find_layers(model, config.layers_attribute)
        self.active: tuple[int, ...] = ()
        self.history: list[tuple[int, tuple[int, ...]]] = []
        self._group_of: dict[str, int] = {}
        self._set_requires_grad(self.schedule.active_layers(0))
        self.history.append((0, self.active))

    def _set_requires_grad(self, active: tuple[int, ...]) -> None:
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                p.requires_grad_(i in active)
        self.active = active

    def _learn_groups(self, opt: torch.optim.Optimizer) -> None:
        where = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}
        for i in self.active:
            for rel, p in self.layers[i].named_parameters():
                if id(p) in where:
                    self._group_of.setdefault(rel, where[id(p)])

    def switch(self, step: int, optimizer: Any = None) -> bool:
        """Re-sample at a period start (``step > 0``, ``step % step_interval == 0``); returns whether it did.

        As LMFlow's ``LISATrainer``, every previously active layer loses its optimizer state, even one
        sampled again.  ``optimizer`` (a ``torch.optim.Optimizer``, or a wrapper with ``.optimizer`` such
        as accelerate's) has its state and groups rebuilt; without it only ``requires_grad`` changes.
        A step off the period boundary whose layers differ from the current ones (a resumed run) also
        switches; a second call for the same step does nothing.
        """
        new = self.schedule.active_layers(step)
        if step == self.history[-1][0] or (not (step > 0 and self.schedule.switches_at(step)) and new == self.active):
            return False  # the same step twice (idempotent), or nothing to change
        opt = _unwrap(optimizer)
        if opt is not None:
            self._learn_groups(opt)
            leaving = {id(p): p for i in self.active for p in self.layers[i].parameters()}
            for p in leaving.values():
                opt.state.pop(p, None)
            for g in opt.param_groups:
                g["params"] = [p for p in g["params"] if id(p) not in leaving]
        self._set_requires_grad(new)
        if opt is not None:
            present = {id(p) for g in opt.param_groups for p in g["params"]}
            for i in new:
                for rel, p in self.layers[i].named_parameters():
                    if id(p) not in present:
                        opt.param_groups[self._group_of.get(rel, 0)]["params"].append(p)
        self.history.append((step, new))
        return True

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.switch(int(state.global_step), kwargs.get("optimizer"))
