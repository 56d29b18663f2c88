"""torchao's quantized weight tensors on a plain ``nn.Linear`` (``quantize_(model, Int8WeightOnlyConfig())``).

torchao keeps the module an ``nn.Linear`` and swaps ``weight`` for a tensor
subclass (``Int8Tensor``: ``int8`` ``qdata`` plus per-row or per-tensor
``scale``) that reports the float dtype and the true shape.  Dequantizing is
the tensor's own ``dequantize()``; re-quantizing is ``Int8Tensor.from_hp``
with the same granularity (rows or tensor) and activation-quantization
settings, so int8 dynamic-activation layers keep their kind too.

torchao's int4 weight-only tensors need a kernel package (``mslk``) that has
no CPU build here: they are not registered and are refused with the generic
:class:`UnsupportedModuleError` (the docs page "Quantized bases" says why).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .kind import QuantKind

__all__ = ["KINDS"]


def _weight(module: nn.Module) -> Any:
    return module._parameters.get("weight")


def _is_int8(module: nn.Module) -> bool:
    from torchao.quantization import Int8Tensor

    return isinstance(module, nn.Linear) and isinstance(_weight(module), Int8Tensor)


def _shape(module: nn.Module) -> tuple[int, int]:
    out_f, in_f = _weight(module).shape
    return int(out_f), int(in_f)


def _compute_dtype(module: nn.Module) -> torch.dtype:
    return _weight(module).dtype  # type: ignore[no-any-return]


def _dequantize(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return _weight(module).dequantize().float()  # type: ignore[no-any-return]


def _granularity(weight: Any) -> Any:
    from torchao.quantization.granularity import PerRow, PerTensor

    block = list(weight.block_size)
    if block == list(weight.shape):
        return PerTensor()
    if block == [1, int(weight.shape[1])]:
        return PerRow()
    raise NotImplementedError(f"torchao Int8Tensor with block_size {block}: only per-row and per-tensor re-quantize")


def _requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    old = _weight(module)
    new_weight = type(old).from_hp(
        weight.detach().to(dtype=old.dtype, device=old.device),
        _granularity(old),
        act_quant_kwargs=old.act_quant_kwargs,
    )
    bias = getattr(module, "bias", None)
    new = nn.Linear(int(old.shape[1]), int(old.shape[0]), bias=bias is not None, device="meta")
    new.weight = nn.Parameter(new_weight, requires_grad=False)
    if isinstance(bias, torch.Tensor):
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    new.train(module.training)
    return new


KINDS: tuple[QuantKind, ...] = (
    QuantKind("torchao-int8", "torchao", _is_int8, _shape, _compute_dtype, _dequantize, _requantize),
)
