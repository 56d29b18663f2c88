"""GaLore as ``torch.optim.Optimizer`` objects, for eager loops and ``transformers.Trainer``.

* :class:`GaLoreAdamW`: the same parameter-group interface as the authors' ``galore_torch.GaLoreAdamW``
  (a group with ``rank``, ``update_proj_gap``, ``scale``, ``proj_type`` keys is projected; other groups
  are plain AdamW), stepping with :func:`functuner.optim.galore.adam_direction`, the one implementation
  shared with the functional :func:`~functuner.optim.galore.galore_adamw`.
* :func:`galore_param_groups` / :func:`create_galore_optimizer`: SWIFT's ``GaLoreConfig`` to groups
  (GaLore weights, then decayed and non-decayed other trainable parameters) and to an optimizer.
* :class:`PerParameterOptimizer`: SWIFT's ``optim_per_parameter``.  Every trainable parameter gets its
  own optimizer, stepped by a ``register_post_accumulate_grad_hook`` hook the moment its gradient is
  complete, after which the gradient is freed; so at most one full-size gradient is alive during
  backward instead of all of them.  Its ``param_groups`` are the inner optimizers' own group dicts, so
  one LR scheduler on it drives all of them (SWIFT keeps a scheduler per parameter instead).
  Gradient accumulation and gradient clipping do not apply in this mode (each backward steps).

Q-GaLore (``GaLoreConfig(quantize=True)`` / ``proj_quant=True``): the groups carry the reference's extra
keys (``quant``, ``quant_n_bit``, ``quant_group_size``, ``cos_threshold``, ``gamma_proj``, ``queue_size``)
and the int8 weights of :class:`functuner.optim.qgalore.QGaLoreLinear` layers are stepped from their
``float_grad`` and re-quantized with stochastic rounding from the optimizer's ``generator``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .galore import GaLoreConfig, Hyper, ParamState, Projection, adam_direction, galore_targets, init_param_state
from .qgalore import QGaLoreLinear, quantized_modules
from .quant import QuantizedTensor

__all__ = ["GaLoreAdamW", "PerParameterOptimizer", "create_galore_optimizer", "galore_param_groups"]

_GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
_QT_FIELDS = ("codes", "scales", "mins")


def _hyper(group: dict[str, Any]) -> Hyper:
    galore = "rank" in group
    quant = bool(group.get("quant", False))
    return Hyper(
        lr=float(group["lr"]),
        betas=tuple(group["betas"]),
        eps=float(group["eps"]),
        weight_decay=float(group["weight_decay"]),
        correct_bias=bool(group["correct_bias"]),
        rank=int(group["rank"]) if galore else None,
        update_proj_gap=int(group.get("update_proj_gap", 200)),
        scale=float(group.get("scale", 1.0)),
        proj_type=str(group.get("proj_type", "std")),
        lazy="cos_threshold" in group,
        cos_threshold=float(group.get("cos_threshold", 0.4)),
        gamma_proj=float(group.get("gamma_proj", 2)),
        queue_size=int(group.get("queue_size", 5)),
        proj_bits=int(group.get("quant_n_bit", 4)) if quant else None,
        proj_group_size=int(group.get("quant_group_size", 256)),
    )


def _encode_mat(m: torch.Tensor | QuantizedTensor) -> Any:
    if isinstance(m, QuantizedTensor):
        # no strings: load_state_dict rebuilds every iterable in the state, and a str becomes garbage;
        # the dtype travels as an empty tensor of that dtype
        meta = {
            "shape": list(m.shape),
            "dtype": torch.empty(0, dtype=m.dtype),
            "bits": m.bits,
            "group_size": m.group_size,
        }
        return {**{f: getattr(m, f) for f in _QT_FIELDS}, **meta}
    return m


def _decode_mat(m: Any) -> torch.Tensor | QuantizedTensor:
    if isinstance(m, dict):
        # load_state_dict casts every tensor of a floating-point parameter's state to its dtype; codes are small
        # integers (exact in any float dtype), so the cast back to their integer dtype is lossless
        dtype = m["dtype"].dtype
        bits = int(m["bits"])
        codes = m["codes"].to(torch.int8 if bits == 8 else torch.uint8)
        return QuantizedTensor(
            codes, m["scales"].float(), m["mins"].float(), tuple(m["shape"]), dtype, bits, int(m["group_size"])
        )
    return m  # type: ignore[no-any-return]


def _decode(stored: dict[str, list[Any]] | None) -> Projection | None:
    """The state dict keeps a projection as ``{side: [factors]}`` (plain containers survive ``load_state_dict``)."""
    if not stored:
        return None
    side, mats = next(iter(stored.items()))
    return Projection(side, tuple(_decode_mat(m) for m in mats))


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore projection for groups that carry ``rank`` (``galore_torch.GaLoreAdamW``'s interface).

    :param params: parameters or groups; a group with ``rank`` (and optionally ``update_proj_gap``,
        ``scale``, ``proj_type``) is trained with its gradient projected, Adam's moments low-rank.
    :param lr: learning rate (``galore_torch``'s default).
    :param betas: Adam's moment decay rates.
    :param eps: added to the square root of the second moment.
    :param weight_decay: decoupled weight decay, applied after the step as ``galore_torch`` does.
    :param correct_bias: fold Adam's bias correction into the step size.

    The state of a parameter is ``step``, ``exp_avg``, ``exp_avg_sq`` and (GaLore groups) ``projection``
    (``{side: [orthogonal factors]}``), all plain containers, so ``state_dict`` / ``load_state_dict`` round-trip.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        model: nn.Module | None = None,
        generator: torch.Generator | int | None = None,
        stochastic_round: bool = True,
    ) -> None:
        if lr < 0.0:
            raise ConfigError(f"GaLoreAdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"GaLoreAdamW: betas must lie in [0, 1), got {betas}")
        if eps < 0.0:
            raise ConfigError(f"GaLoreAdamW: eps must be >= 0, got {eps}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if "proj_type" in group and group["proj_type"] not in ("std", "reverse_std", "right", "left", "full"):
                raise ConfigError(
                    f"GaLoreAdamW: a group has proj_type={group['proj_type']!r}; use std, reverse_std,"
                    " right, left or full"
                )
        self.quantized: dict[torch.Tensor, QGaLoreLinear] = quantized_modules(model) if model is not None else {}
        self.stochastic_round = stochastic_round
        self.generator: torch.Generator | None = None
        ints = [p for g in self.param_groups for p in g["params"] if not (p.is_floating_point() or p.is_complex())]
        unknown = [p for p in ints if p not in self.quantized]
        if unknown:
            raise ConfigError(
                f"GaLoreAdamW: {len(unknown)} integer parameter(s) of shape {tuple(unknown[0].shape)} are not"
                " Q-GaLore int8 weights of the model; pass model=<the model> (with QGaLoreLinear layers from"
                " functuner.optim.quantize_model) or leave integer tensors out of the groups"
            )
        if ints and stochastic_round:
            if isinstance(generator, int) and not isinstance(generator, bool):
                generator = torch.Generator(device=ints[0].device).manual_seed(generator)
            if not isinstance(generator, torch.Generator):
                raise ConfigError(
                    "GaLoreAdamW: Q-GaLore's stochastic rounding of the int8 weights needs an explicit generator;"
                    " pass generator=torch.Generator().manual_seed(0) (or an int seed), or stochastic_round=False"
                )
            self.generator = generator

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW / GaLore-AdamW step on every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hp = _hyper(group)
            for p in group["params"]:
                module = self.quantized.get(p)
                grad = module.float_grad if module is not None else p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise ConfigError("GaLoreAdamW does not support sparse gradients")
                raw = self.state[p]
                weight = module.dequantized_weight() if module is not None else p
                st = (
                    ParamState(
                        raw["step"],
                        raw["exp_avg"],
                        raw["exp_avg_sq"],
                        _decode(raw.get("projection")),
                        raw.get("gap"),
                        tuple(raw.get("queue", ())),
                        raw.get("past"),
                    )
                    if "exp_avg" in raw
                    else init_param_state(weight, hp)
                )
                direction, step_size, new = adam_direction(grad, st, hp, inplace=True)
                raw.update(step=new.step, exp_avg=new.exp_avg, exp_avg_sq=new.exp_avg_sq)
                if new.proj is not None:
                    raw["projection"] = {new.proj.side: [_encode_mat(m) for m in new.proj.mats]}
                if new.gap is not None:
                    raw.update(gap=new.gap, queue=list(new.queue), past=new.past)
                weight.add_(direction.to(weight.dtype), alpha=-step_size)
                if hp.weight_decay > 0.0:
                    weight.add_(weight, alpha=-hp.lr * hp.weight_decay)
                if module is not None:
                    module.set_weight(weight, stochastic=self.stochastic_round, generator=self.generator)
                    module.float_grad = None
        return loss


def _decay_names(model: nn.Module) -> set[str]:
    """``transformers.Trainer``'s rule: every parameter except biases and those of normalization layers."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        for p_name, _ in module.named_parameters(recurse=False):
            if not is_norm and "bias" not in p_name:
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def galore_param_groups(model: nn.Module, config: GaLoreConfig, *, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """SWIFT's grouping: the selected 2-D weights (with GaLore keys), then other trainable parameters
    split into weight-decayed and not (biases and norms), as ``transformers.Trainer`` splits them.

    Only parameters with ``requires_grad`` are included, and the int8 weights of
    :class:`~functuner.optim.qgalore.QGaLoreLinear` layers.  Empty groups are dropped.
    """
    targets = set(galore_targets(model, config))
    decay = _decay_names(model)
    int8 = quantized_modules(model)
    galore, decayed, plain = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad and p not in int8:
            continue
        if name in targets:
            galore.append(p)
        elif name in decay:
            decayed.append(p)
        else:
            plain.append(p)
    keys = {
        "rank": config.rank,
        "update_proj_gap": config.update_proj_gap,
        "scale": config.galore_scale,
        "proj_type": config.proj_type,
    }
    if config.q_galore:  # the reference q_galore_torch's group keys
        keys.update(
            quant=config.proj_quant,
            quant_n_bit=config.proj_bits,
            quant_group_size=config.proj_group_size,
            cos_threshold=config.cos_threshold,
            gamma_proj=config.gamma_proj,
            queue_size=config.queue_size,
        )
    groups = [
        {"params": galore, "weight_decay": weight_decay, **keys},
        {"params": decayed, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class PerParameterOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, each stepped from the parameter's post-accumulate-grad hook.

    ``step()`` and ``zero_grad()`` do nothing (the work happened during backward), so it can stand in
    wherever a ``torch.optim.Optimizer`` is expected, such as ``Trainer(optimizers=(opt, scheduler))``.
    ``param_groups`` are the inner optimizers' group dicts, so an LR scheduler built on this object
    changes every inner optimizer's rate.  Call :meth:`remove` to detach the hooks.
    """

    def __init__(self, optimizers: dict[torch.Tensor, torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ConfigError("PerParameterOptimizer: no parameters; give at least one trainable parameter")
        super().__init__([torch.zeros(1)], {"lr": 0.0})
        self.optimizers = optimizers
        self.param_groups = [g for opt in optimizers.values() for g in opt.param_groups]
        self.handles: list[Any] = []
        for p, opt in optimizers.items():
            module = getattr(opt, "quantized", {}).get(p)
            if module is not None:  # a Q-GaLore int8 weight: its layer calls back once float_grad is complete
                module.grad_hooks.append(self._int8_hook)
                self.handles.append(_ListHandle(module.grad_hooks, self._int8_hook))
            else:
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook))  # type: ignore[no-untyped-call]

    def _hook(self, param: torch.Tensor) -> None:
        opt = self.optimizers[param]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _int8_hook(self, module: QGaLoreLinear) -> None:
        self.optimizers[module.weight].step()  # consumes and clears module.float_grad

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """No-op: every parameter was stepped during backward (a ``closure``, if given, is still called)."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: the hooks free each gradient after its step."""

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizers' state dicts, in parameter order."""
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("per_parameter")
        if not isinstance(inner, list) or len(inner) != len(self.optimizers):
            raise ConfigError(
                "PerParameterOptimizer.load_state_dict: expected {'per_parameter': [one state dict per parameter"
                f" ({len(self.optimizers)})]}}, got keys {sorted(state_dict)}; save it with this optimizer's state_dict()"
            )
        for opt, sd in zip(self.optimizers.values(), inner, strict=True):
            opt.load_state_dict(sd)
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]

    def remove(self) -> None:
        """Detach the hooks (the parameters stop being stepped during backward)."""
        for h in self.handles:
            h.remove()
        self.handles = []


class _ListHandle:
    """``remove()`` takes ``item`` out of ``items`` (a removable handle for a plain hook list)."""

    def __init__(self, items: list[Any], item: Any) -> None:
        self.items, self.item = items, item

    def remove(self) -> None:
        if self.item in self.items:
            self.items.remove(self.item)


def create_galore_optimizer(
    model: nn.Module,
    config: GaLoreConfig,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    correct_bias: bool = True,
    generator: torch.Generator | int | None = None,
) -> torch.optim.Optimizer:
    """A :class:`GaLoreAdamW` over :func:`galore_param_groups`, or with ``config.optim_per_parameter`` a
    :class:`PerParameterOptimizer` holding one :class:`GaLoreAdamW` per trainable parameter.

    Q-GaLore with ``config.quantize``: call :func:`functuner.optim.quantize_model` first (the target
    layers become int8 :class:`~functuner.optim.qgalore.QGaLoreLinear`); ``generator`` (a
    ``torch.Generator`` or an int seed) drives the stochastic rounding (``config.stochastic_round``).
    A ``quantize=True`` config on a model without Q-GaLore layers raises :class:`ConfigError`.
    """
    int8 = quantized_modules(model)
    if config.quantize and not int8:
        raise ConfigError(
            "create_galore_optimizer: GaLoreConfig(quantize=True) but the model has no int8 Q-GaLore layers;"
            " call functuner.optim.quantize_model(model, config) first"
        )
    groups = galore_param_groups(model, config, weight_decay=weight_decay)
    kwargs: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps, "correct_bias": correct_bias}
    if int8:
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator(device=next(iter(int8)).device).manual_seed(generator)
        kwargs.update(model=model, generator=generator, stochastic_round=config.stochastic_round)
    if not config.optim_per_parameter:
        return GaLoreAdamW(groups, **kwargs)
    per: dict[torch.Tensor, torch.optim.Optimizer] = {}
    for group in groups:
        extra = {k: v for k, v in group.items() if k != "params"}
        params: Sequence[torch.Tensor] = group["params"]
        for p in params:
            per[p] = GaLoreAdamW([{"params": [p], **extra}], **kwargs)
    return PerParameterOptimizer(per)
