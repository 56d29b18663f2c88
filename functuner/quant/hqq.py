"""HQQ's ``HQQLinear`` (half-quadratic quantization, 1-8 bits, group-wise scale and zero).

``HQQLinear`` is not an ``nn.Linear``: its storage is ``W_q`` plus a ``meta``
dict (scales, zeros, shape), read by its ``dequantize()``, which runs on CPU
with the PyTorch backend.  Re-quantizing builds a new ``HQQLinear`` from a
float ``nn.Linear`` with the layer's quant config and compute dtype.  Its
storage is not one tensor, so the shim cannot swap a merged weight in and out
of the layer; :func:`functuner.quant.merge_quantized` gives the merged float
weight and a new re-quantized layer instead.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn

from .kind import QuantKind

__all__ = ["KINDS"]


def _is_hqq(module: nn.Module) -> bool:
    from hqq.core.quantize import HQQLinear

    return isinstance(module, HQQLinear) and bool(getattr(module, "ready", False))


def _shape(module: nn.Module) -> tuple[int, int]:
    m: Any = module
    return int(m.out_features), int(m.in_features)


def _compute_dtype(module: nn.Module) -> torch.dtype:
    return module.compute_dtype  # type: ignore[return-value]


def _dequantize(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        dense: torch.Tensor = cast(Any, module).dequantize().float()
        return dense.reshape(_shape(module))


def _requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    from hqq.core.quantize import HQQLinear

    m: Any = module
    out_f, in_f = _shape(module)
    lin = nn.Linear(in_f, out_f, bias=m.bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().to(m.compute_dtype), requires_grad=False)
    if m.bias is not None:
        lin.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
    config = copy.deepcopy(m.quant_config)
    if m.offload_meta is not None:
        config["offload_meta"] = m.offload_meta
    new = HQQLinear(lin, quant_config=config, compute_dtype=m.compute_dtype, device=str(m.device))
    new.train(m.training)
    return cast(nn.Module, new)


KINDS: tuple[QuantKind, ...] = (
    QuantKind("hqq", "hqq", _is_hqq, _shape, _compute_dtype, _dequantize, _requantize, single_tensor=False),
)
