"""optimum-quanto's ``QLinear`` (``quantize(model, weights=qint8 | qint4 | qint2)`` then ``freeze``).

A frozen ``QLinear`` holds a ``QTensor`` weight (``WeightQBytesTensor`` for
int8, ``WeightQBitsTensor`` for int4/int2 with group-wise scale and shift); an
unfrozen one holds the float weight and quantizes it at each forward
(``qweight``).  Either way the layer computes with ``qweight``, so that is
what is dequantized.  Re-quantizing runs the layer's own optimizer on the new
float weight with its qtype, axis and group size, exactly as ``freeze`` does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .kind import QuantKind

__all__ = ["KINDS"]


def _is_qlinear(module: nn.Module) -> bool:
    from optimum.quanto.nn import QLinear

    return isinstance(module, QLinear) and getattr(module, "weight_qtype", None) is not None


def _shape(module: nn.Module) -> tuple[int, int]:
    m: Any = module
    return int(m.out_features), int(m.in_features)


def _compute_dtype(module: nn.Module) -> torch.dtype:
    return module._parameters["weight"].dtype  # type: ignore[union-attr]


def _dequantize(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module.qweight.dequantize().float().reshape(_shape(module))  # type: ignore[operator]


def _requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    from optimum.quanto import quantize_weight
    from optimum.quanto.tensor.optimizers import SymmetricOptimizer

    m: Any = module
    w = weight.detach().to(dtype=_compute_dtype(module), device=m._parameters["weight"].device)
    if isinstance(m.optimizer, SymmetricOptimizer):
        scale, shift = m.optimizer(w, qtype=m.weight_qtype, axis=0), None
    else:
        scale, shift = m.optimizer(w, qtype=m.weight_qtype, axis=0, group_size=m.weight_group_size)
    q = quantize_weight(
        w,
        qtype=m.weight_qtype,
        axis=0,
        scale=scale,
        shift=shift,
        group_size=m.weight_group_size,
        activation_qtype=m.activation_qtype,
    )
    new = copy.copy(m)  # the layer's settings; its own parameter/buffer/hook dicts below
    new.__dict__ = dict(m.__dict__)
    new._parameters = dict(m._parameters)
    new._buffers = {k: (v.clone() if v is not None else None) for k, v in m._buffers.items()}
    new._modules = dict(m._modules)
    new._forward_hooks = type(m._forward_hooks)()
    new._forward_pre_hooks = type(m._forward_pre_hooks)()
    new._quantize_hooks = {}
    if m.activation_qtype is not None:  # as QModuleMixin.__init__: activation quantization hooks on the new layer
        if "input" in m._quantize_hooks:
            new._quantize_hooks["input"] = new.register_forward_pre_hook(new.quantize_input)
        new._quantize_hooks["output"] = new.register_forward_hook(new.quantize_output)
    new.weight = nn.Parameter(q, requires_grad=False)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    return new  # type: ignore[no-any-return]


KINDS: tuple[QuantKind, ...] = (
    QuantKind("optimum-quanto", "optimum", _is_qlinear, _shape, _compute_dtype, _dequantize, _requantize),
)
