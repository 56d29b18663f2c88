"""Q-GaLore's int8 weights: quantized storage, stochastic-rounding updates, functional and eager forms.

Q-GaLore (Zhang et al., 2024, arXiv:2407.08296) is GaLore with the trained weights kept in int8 and the
projectors in 4 bits.  The projector side (low-bit projectors, lazy layer-wise refresh by the cosine
similarity of successive projectors) lives in :func:`functuner.optim.galore.refresh_projection`; this
module is the weight side.  After each optimizer step a weight is rebuilt as
``quantize(dequantize(w) + update)`` with **stochastic rounding** from an explicit ``torch.Generator``:
unbiased, so steps smaller than one int8 level still move the weight in expectation.

* functional: :func:`quantize_params` turns the target leaves of a ``{name: tensor}`` pytree into
  :class:`~functuner.optim.quant.QuantizedTensor` leaves, :func:`dequantize_params` gives the dense
  weights for ``torch.func.functional_call``, and :func:`apply_quantized_updates` applies
  :func:`~functuner.optim.galore.galore_adamw`'s updates (re-quantizing the int8 leaves);
* eager / Trainer: :func:`quantize_model` swaps the target ``nn.Linear`` modules for
  :class:`QGaLoreLinear` (int8 ``weight`` parameter, per-group scales and minima as buffers; the
  forward dequantizes one layer at a time; backward leaves the float gradient of the weight in
  ``module.float_grad``), which :class:`functuner.optim.GaLoreAdamW` steps; :func:`dequantize_model`
  swaps them back to ``nn.Linear`` (to save or merge).

The reference (``q_galore_torch``, VITA-Group/Q-GaLore commit 5bd2f1c) also keeps Adam's low-rank
moments in 8 bits (bitsandbytes' blockwise AdamW8bit); here they stay in the weight's float dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TargetError
from .base import rebuild_like
from .galore import GaLoreConfig, galore_targets
from .quant import QuantizedTensor, dequantize, quantize

__all__ = [
    "QGaLoreLinear",
    "apply_quantized_updates",
    "dequantize_model",
    "dequantize_params",
    "quantize_model",
    "quantize_params",
    "quantized_modules",
    "tree_nbytes",
]


def _generator(generator: torch.Generator | int | None, device: torch.device, where: str) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator(device=device).manual_seed(generator)
    raise ConfigError(
        f"{where}: Q-GaLore's stochastic rounding needs an explicit generator (a torch.Generator on the"
        f" weights' device or an int seed), got {generator!r}; pass generator=torch.Generator().manual_seed(0)"
    )


# ---------------------------------------------------------------------------
# functional
# ---------------------------------------------------------------------------
def quantize_params(
    params: Mapping[str, torch.Tensor],
    targets: Collection[str] | Callable[[str, torch.Tensor], bool],
    *,
    group_size: int = 256,
) -> Mapping[str, Any]:
    """``params`` with the 2-D ``targets`` leaves as int8 :class:`QuantizedTensor` (round to nearest).

    Same container type as ``params``; other leaves are kept as they are.  Raises
    :class:`~functuner.errors.TargetError` for a target that is missing or not 2-D.
    """
    chosen = [n for n, t in params.items() if (targets(n, t) if callable(targets) else n in targets)]
    if not callable(targets):
        missing = sorted(set(targets) - set(params))
        if missing:
            raise TargetError(f"quantize_params: targets {missing[:3]} are not in params ({len(missing)} missing)")
    bad = [n for n in chosen if not isinstance(params[n], torch.Tensor) or params[n].dim() != 2]
    if bad:
        raise TargetError(f"quantize_params: Q-GaLore quantizes 2-D weights only; {bad[:3]} are not")
    new = {n: (quantize(t.detach(), bits=8, group_size=group_size) if n in chosen else t) for n, t in params.items()}
    return rebuild_like(params, new)  # type: ignore[arg-type]


def dequantize_params(params: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """Dense weights for a forward pass: every :class:`QuantizedTensor` leaf dequantized (same container)."""
    new = {n: (dequantize(t) if isinstance(t, QuantizedTensor) else t) for n, t in params.items()}
    return rebuild_like(params, new)


def apply_quantized_updates(
    params: Mapping[str, Any],
    updates: Mapping[str, torch.Tensor],
    *,
    generator: torch.Generator | int | None,
    stochastic: bool = True,
) -> Mapping[str, Any]:
    """``params + updates`` where int8 leaves are re-quantized: ``quantize(dequantize(w) + u)``.

    Stochastic rounding (``stochastic=True``, Q-GaLore's ``stochastic_round``) draws from ``generator``
    (a ``torch.Generator`` or an int seed; required).  Dense leaves get ``t + u`` as
    :func:`~functuner.optim.base.apply_updates` does; leaves without an update are kept.  Pure.
    """
    gen: torch.Generator | None = None
    out: dict[str, Any] = {}
    for name, t in params.items():
        if name not in updates:
            out[name] = t
        elif isinstance(t, QuantizedTensor):
            if stochastic and gen is None:
                gen = _generator(generator, t.device, "apply_quantized_updates")
            moved = dequantize(t) + updates[name].to(t.dtype)
            out[name] = quantize(moved, bits=t.bits, group_size=t.group_size, stochastic=stochastic, generator=gen)
        else:
            out[name] = t + updates[name].to(t.dtype)
    return rebuild_like(params, out)


def tree_nbytes(params: Mapping[str, Any]) -> int:
    """Bytes held by a pytree's leaves (a :class:`QuantizedTensor` counts its codes, scales and minima)."""
    return sum(t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size() for t in params.values())


# ---------------------------------------------------------------------------
# eager: an int8 linear layer
# ---------------------------------------------------------------------------
class _Int8Matmul(torch.autograd.Function):
    """``x W^T + b`` with ``W`` dequantized for the product only; the weight's float gradient goes to the module."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, module: QGaLoreLinear) -> torch.Tensor:
        weight = module.dequantized_weight().to(x.dtype)
        ctx.module = module
        ctx.save_for_backward(x)
        ctx.has_bias = bias is not None
        out = x @ weight.t()
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        (x,) = ctx.saved_tensors
        module: QGaLoreLinear = ctx.module
        weight = module.dequantized_weight().to(grad_out.dtype)
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = (flat_out.t() @ x.reshape(-1, x.shape[-1])).to(module.float_dtype)
        module.float_grad = grad_w if module.float_grad is None else module.float_grad + grad_w
        for hook in list(module.grad_hooks):
            hook(module)
        grad_b = flat_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x, grad_b, None


class QGaLoreLinear(nn.Module):
    """An ``nn.Linear`` whose weight is stored in int8 (Q-GaLore), trained by :class:`~functuner.optim.GaLoreAdamW`.

    ``weight`` is an ``int8`` parameter that does not require grad (codes - 128), ``weight_scales`` and
    ``weight_mins`` are float32 buffers (one per group of ``group_size`` elements).  Backward accumulates
    the gradient of the dequantized weight in :attr:`float_grad` (in ``float_dtype``); the optimizer
    consumes it and re-quantizes the weight.  The bias, if any, is a normal float parameter.
    """

    def __init__(self, linear: nn.Linear, *, group_size: int = 256) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size
        self.float_dtype = linear.weight.dtype
        q = quantize(linear.weight.detach(), bits=8, group_size=group_size)
        self.weight = nn.Parameter(q.codes, requires_grad=False)
        self.register_buffer("weight_scales", q.scales)
        self.register_buffer("weight_mins", q.mins)
        self.bias = linear.bias
        self.weight_scales: torch.Tensor
        self.weight_mins: torch.Tensor
        self.float_grad: torch.Tensor | None = None
        self.grad_hooks: list[Callable[[QGaLoreLinear], None]] = []

    def quantized(self) -> QuantizedTensor:
        """The weight as a :class:`QuantizedTensor` (sharing this module's storage)."""
        return QuantizedTensor(
            self.weight.data,
            self.weight_scales,
            self.weight_mins,
            (self.out_features, self.in_features),
            self.float_dtype,
            8,
            self.group_size,
        )

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in ``float_dtype``."""
        return dequantize(self.quantized())

    @torch.no_grad()
    def set_weight(self, value: torch.Tensor, *, stochastic: bool, generator: torch.Generator | None) -> None:
        """Re-quantize the weight from a float ``value`` (in place: same parameter object)."""
        q = quantize(value, bits=8, group_size=self.group_size, stochastic=stochastic, generator=generator)
        self.weight.data.copy_(q.codes)
        self.weight_scales.copy_(q.scales)
        self.weight_mins.copy_(q.mins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:  # the weight's gradient needs a backward through here
            x = x.detach().requires_grad_(True)
        return _Int8Matmul.apply(x, self.bias, self)  # type: ignore[no-untyped-call,no-any-return]

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (and this module's bias)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.to(device=self.weight.device, dtype=self.float_dtype)
        with torch.no_grad():
            out.weight.copy_(self.dequantized_weight())
        if self.bias is not None:
            out.bias = self.bias
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, group_size={self.group_size}"


def quantize_model(model: nn.Module, config: GaLoreConfig) -> tuple[str, ...]:
    """Swap ``config``'s target ``nn.Linear`` modules for :class:`QGaLoreLinear` (in place); returns their names.

    Every target must be an ``nn.Linear`` (:class:`~functuner.errors.TargetError` otherwise, before anything
    changes).  The weights are quantized with ``config.weight_group_size`` (round to nearest, as the
    reference's initial quantization).
    """
    names = tuple(n[: -len(".weight")] for n in galore_targets(model, config))
    mods = {n: model.get_submodule(n) for n in names}
    bad = sorted(n for n, m in mods.items() if type(m) is not nn.Linear)
    if bad:
        raise TargetError(
            f"Q-GaLore quantizes nn.Linear weights only; {bad[:3]} are not nn.Linear: narrow"
            " GaLoreConfig.target_modules or add them to exclude_modules"
        )
    for n, m in mods.items():
        parent, _, child = n.rpartition(".")
        assert isinstance(m, nn.Linear)
        setattr(
            model.get_submodule(parent) if parent else model,
            child,
            QGaLoreLinear(m, group_size=config.weight_group_size),
        )
    return names


def dequantize_model(model: nn.Module) -> tuple[str, ...]:
    """Swap every :class:`QGaLoreLinear` back to an ``nn.Linear`` (in place); returns their names."""
    names = tuple(n for n, m in model.named_modules() if isinstance(m, QGaLoreLinear))
    for n in names:
        parent, _, child = n.rpartition(".")
        m = model.get_submodule(n)
        assert isinstance(m, QGaLoreLinear)
        setattr(model.get_submodule(parent) if parent else model, child, m.to_linear())
    return names


def quantized_modules(model: nn.Module) -> dict[torch.Tensor, QGaLoreLinear]:
    """``{int8 weight parameter: its QGaLoreLinear}`` for every Q-GaLore layer of ``model``."""
    return {m.weight: m for m in model.modules() if isinstance(m, QGaLoreLinear)}
