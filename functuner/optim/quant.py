"""Group-wise min-max quantization with round-to-nearest or stochastic rounding (Q-GaLore's storage).

Q-GaLore (Zhang et al., 2024, arXiv:2407.08296) keeps the trained weights in 8-bit integers and the
GaLore projectors in 4 bits.  Both use asymmetric min-max quantization over groups of ``group_size``
consecutive elements: per group ``scale = (max - min) / (2**bits - 1)`` and the code of ``x`` is
``(x - min) / scale`` rounded.  The weights are re-quantized after every update with **stochastic
rounding** (round up with probability equal to the fractional part), which is unbiased, so updates
smaller than one quantization step still move the weight in expectation; the projectors use
round-to-nearest.

Differences from the reference ``q_galore_torch`` (VITA-Group/Q-GaLore, commit 5bd2f1c), on purpose:

* the zero point is the group's float minimum, not ``round(min / scale)``: with an integer zero point
  the reference's codes of the group minimum can fall below 0 and are clamped, which biases the
  stochastic rounding at the edges; here every code lies in ``[0, 2**bits - 1]`` before rounding and
  the rounding is exactly unbiased (``tests/optim/test_qgalore.py`` checks it with hypothesis);
* the random numbers come from an explicit ``torch.Generator`` (the reference draws from the global one);
* codes of fewer than 8 bits are packed (two 4-bit codes per byte), so a 4-bit projector takes half
  the bytes of an 8-bit one (the reference stores 4-bit codes one per ``uint8``);
* 8-bit codes are stored as ``torch.int8`` (code - 128).

A trailing group shorter than ``group_size`` is its own group; ``group_size <= 0`` means one group per
row (the last dimension), as in the reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import ConfigError

__all__ = ["QUANT_BITS", "QuantizedTensor", "dequantize", "quantize", "stochastic_round"]

QUANT_BITS = (2, 4, 8)


class QuantizedTensor(NamedTuple):
    """A tensor as group-wise codes: ``x ~ code * scale + min`` per group of ``group_size`` elements.

    ``codes`` is ``int8`` (``code - 128``, in ``shape``) for 8 bits, else flat ``uint8`` with ``8 // bits``
    codes per byte;
    ``scales`` and ``mins`` are float32, one per group; ``shape`` and ``dtype`` are the original's.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    bits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        """Bytes held: the codes plus one scale and one minimum per group."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins))

    @property
    def device(self) -> torch.device:
        return self.codes.device


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``floor(x) + 1`` with probability ``x - floor(x)``, else ``floor(x)``: unbiased, ``E[result] = x``.

    ``generator`` must live on ``x``'s device; ``None`` uses torch's global generator.
    """
    low = torch.floor(x)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return low + (u < (x - low)).to(x.dtype)


def _groups(flat: torch.Tensor, group_size: int, row: int) -> tuple[torch.Tensor, int]:
    """``flat`` as ``(groups, size)`` (a short last group padded with its own last value), and the padding."""
    size = group_size if group_size > 0 else row
    pad = (-flat.numel()) % size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, size), pad


def _check(bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ConfigError(f"quantization bits must be one of {QUANT_BITS}, got {bits!r}")


def quantize(
    x: torch.Tensor,
    *,
    bits: int = 8,
    group_size: int = 256,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Group-wise min-max quantization of ``x`` to ``bits`` bits (nearest, or stochastic with ``generator``).

    Pure: ``x`` is not modified.  ``x`` must be finite and non-empty.
    """
    _check(bits)
    if x.numel() == 0:
        raise ConfigError("quantize: cannot quantize an empty tensor")
    shape = tuple(x.shape)
    groups, pad = _groups(x.detach().reshape(-1).float(), group_size, shape[-1] if shape else 1)
    qmax = (1 << bits) - 1
    lo = groups.amin(dim=1, keepdim=True)
    hi = groups.amax(dim=1, keepdim=True)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ConfigError("quantize: the tensor holds NaN/inf values; refusing to quantize it")
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0, exact
    level = ((groups - lo) / scale).clamp_(0, qmax)
    codes = stochastic_round(level, generator) if stochastic else torch.round(level)
    codes = codes.clamp_(0, qmax).to(torch.uint8).reshape(-1)
    if pad:
        codes = codes[:-pad]
    if bits == 8:
        stored = (codes.to(torch.int16) - 128).to(torch.int8).reshape(shape)  # the weight's own shape
    else:
        per = 8 // bits
        padded = torch.cat([codes, codes.new_zeros((-codes.numel()) % per)]).view(-1, per).to(torch.int32)
        shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
        stored = (padded << shifts).sum(dim=1).to(torch.uint8)
    return QuantizedTensor(stored, scale.reshape(-1), lo.reshape(-1), shape, x.dtype, bits, group_size)


def codes_of(q: QuantizedTensor) -> torch.Tensor:
    """The integer codes ``0 .. 2**bits - 1`` of ``q``, unpacked, as a flat ``int32`` tensor."""
    n = math.prod(q.shape)
    if q.bits == 8:
        return q.codes.reshape(-1).to(torch.int32) + 128
    per = 8 // q.bits
    shifts = torch.arange(per, device=q.codes.device, dtype=torch.int32) * q.bits
    return ((q.codes.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << q.bits) - 1)).reshape(-1)[:n]


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """``code * scale + min`` per group, in the original shape and dtype."""
    flat = codes_of(q).float()
    groups, pad = _groups(flat, q.group_size, q.shape[-1] if q.shape else 1)
    values = (groups * q.scales.unsqueeze(1) + q.mins.unsqueeze(1)).reshape(-1)
    if pad:
        values = values[:-pad]
    return values.reshape(q.shape).to(q.dtype)
