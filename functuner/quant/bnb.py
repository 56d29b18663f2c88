"""bitsandbytes ``Linear4bit`` (NF4/FP4) and ``Linear8bitLt`` (LLM.int8) as :class:`QuantKind` entries.

* 4-bit: the weight is a ``Params4bit`` (packed ``uint8`` plus a ``quant_state``
  with the block absmax and the true shape).  On CPU bitsandbytes may repack it
  for its AVX512 kernel at the first eval forward; dequantizing undoes that
  repacking on a copy first.  Re-quantizing builds a new ``Linear4bit`` with the
  same quant type, block size, nested statistics and storage dtype.
* 8-bit: the weight is an ``Int8Params`` (``int8`` rows plus per-row scales
  ``SCB``; after the first forward the scales live in ``module.state``).
  ``W = CB * SCB / 127``.  Re-quantizing builds a new ``Linear8bitLt``
  (inference form, ``has_fp16_weights=False``).
"""

from __future__ import annotations

import importlib
from typing import Any, cast

import torch
from torch import nn

from .kind import QuantKind

__all__ = ["KINDS"]


def _bnb() -> Any:
    """The bitsandbytes package, untyped (it ships no type information for its layers)."""
    return importlib.import_module("bitsandbytes")


def _is_4bit(module: nn.Module) -> bool:
    bnb = _bnb()

    weight = module._parameters.get("weight")
    return isinstance(module, bnb.nn.Linear4bit) and isinstance(weight, bnb.nn.Params4bit) and weight.bnb_quantized


def _is_8bit(module: nn.Module) -> bool:
    bnb = _bnb()

    return isinstance(module, bnb.nn.Linear8bitLt) and isinstance(module.weight, bnb.nn.Int8Params)


def _shape(module: nn.Module) -> tuple[int, int]:
    return int(cast(Any, module).out_features), int(cast(Any, module).in_features)


def _compute_dtype_4bit(module: nn.Module) -> torch.dtype:
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _dequantize_4bit(module: nn.Module) -> torch.Tensor:
    bf: Any = importlib.import_module("bitsandbytes.functional")

    weight: Any = module.weight
    data, state = weight.data, weight.quant_state
    if state is None:
        state = getattr(module, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):  # repacked for the CPU kernel: unpack a copy
        data, state = bf._convert_weight_packed_for_cpu_inverse(data, state)
    with torch.no_grad():
        dense: torch.Tensor = bf.dequantize_4bit(data, state).float()
        return dense.reshape(_shape(module))


def _requantize_4bit(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    bnb = _bnb()

    old: Any = module
    state = old.weight.quant_state if old.weight.quant_state is not None else old.quant_state
    new = bnb.nn.Linear4bit(
        old.in_features,
        old.out_features,
        bias=old.bias is not None,
        compute_dtype=old.compute_dtype,
        compress_statistics=bool(getattr(state, "nested", old.weight.compress_statistics)),
        quant_type=getattr(state, "quant_type", old.weight.quant_type),
        quant_storage=old.weight.quant_storage,
        device="meta",
    )
    new.weight = bnb.nn.Params4bit(
        weight.detach().float().contiguous().to(old.weight.device),
        requires_grad=False,
        blocksize=getattr(state, "blocksize", old.weight.blocksize),
        compress_statistics=bool(getattr(state, "nested", old.weight.compress_statistics)),
        quant_type=getattr(state, "quant_type", old.weight.quant_type),
        quant_storage=old.weight.quant_storage,
        module=new,
    ).to(old.weight.device)
    if old.bias is not None:
        new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=old.bias.requires_grad)
    new.train(old.training)
    return cast(nn.Module, new)


def _compute_dtype_8bit(module: nn.Module) -> torch.dtype:
    """LLM.int8 runs in the input's dtype; the bias (cast to it at each forward) tells which, else fp32."""
    bias = getattr(module, "bias", None)
    return bias.dtype if isinstance(bias, torch.Tensor) else torch.float32


def _scales_8bit(module: nn.Module) -> torch.Tensor:
    weight: Any = module.weight
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else cast(Any, module).state.SCB
    if scb is None:
        raise RuntimeError("bitsandbytes Linear8bitLt without row scales (SCB): the layer was never quantized")
    return cast(torch.Tensor, scb)


def _dequantize_8bit(module: nn.Module) -> torch.Tensor:
    weight: Any = module.weight
    cb = weight.CB if getattr(weight, "CB", None) is not None else weight.data
    with torch.no_grad():
        dense: torch.Tensor = cb.float() * (_scales_8bit(module).float().view(-1, 1) / 127.0)
        return dense.reshape(_shape(module))


def _requantize_8bit(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    bnb = _bnb()

    old: Any = module
    new = bnb.nn.Linear8bitLt(
        old.in_features,
        old.out_features,
        bias=old.bias is not None,
        has_fp16_weights=False,
        threshold=float(old.state.threshold),
        device="meta",
    )
    device = old.weight.device
    new.weight = bnb.nn.Int8Params(
        weight.detach().float().contiguous().to("cpu"), requires_grad=False, has_fp16_weights=False
    ).to(device)
    if old.bias is not None:
        new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=old.bias.requires_grad)
    new.train(old.training)
    return cast(nn.Module, new)


def _before_swap_8bit(module: nn.Module) -> None:
    """Move the row statistics back onto the weight (where a fresh layer keeps them), so the layer reads them from
    whichever weight object is in place: the first forward after a swap re-initialises ``module.state`` from it."""
    old: Any = module
    if getattr(old.weight, "CB", None) is None and old.state.CB is not None:
        old.weight.CB, old.weight.SCB = old.state.CB, old.state.SCB


KINDS: tuple[QuantKind, ...] = (
    QuantKind(
        "bitsandbytes-4bit", "bitsandbytes", _is_4bit, _shape, _compute_dtype_4bit, _dequantize_4bit, _requantize_4bit
    ),
    QuantKind(
        "bitsandbytes-8bit",
        "bitsandbytes",
        _is_8bit,
        _shape,
        _compute_dtype_8bit,
        _dequantize_8bit,
        _requantize_8bit,
        before_swap=_before_swap_8bit,
    ),
)
