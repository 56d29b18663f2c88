"""The description of one kind of quantized linear layer (:class:`QuantKind`), shared by every backend module."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["QuantKind"]


class QuantKind(NamedTuple):
    """One supported kind of quantized linear layer (one backend's layer class or weight type)."""

    name: str  # e.g. "bitsandbytes-4bit"
    package: str  # the top-level package that must be imported for a module to be of this kind
    matches: Callable[[nn.Module], bool]
    shape: Callable[[nn.Module], tuple[int, int]]  # the true (out_features, in_features)
    compute_dtype: Callable[[nn.Module], torch.dtype]
    dequantize: Callable[[nn.Module], torch.Tensor]  # fp32 (out, in), detached, on the module's device
    # a new layer of the same kind holding ``weight`` (fp32 (out, in)) re-quantized; None: cannot re-quantize
    requantize: Callable[[nn.Module, torch.Tensor], nn.Module] | None
    # True when the quantized storage is ``module.weight`` alone (the shim can swap it in and out exactly)
    single_tensor: bool = True
    # called on the module before the shim swaps its weight out (bitsandbytes 8-bit moves its statistics back)
    before_swap: Callable[[nn.Module], None] | None = None
