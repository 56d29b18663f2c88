"""LoftQ (``init_lora_weights="loftq"``): a quantized base weight plus LoRA factors for its quantization error.

PEFT's ``peft.utils.loftq_utils.loftq_init`` (peft 0.21), as pure torch on any device:
starting from ``res = W``, each of ``loftq_iter`` rounds quantizes ``res`` and
dequantizes it (``Q``), then takes the top-``r`` SVD of ``W - Q`` as ``L R``
(``L = U sqrt(S)``, ``R = sqrt(S) V^T``) and, unless it is the last round, sets
``res = W - L R``.  The adapter gets ``A = R``, ``B = L`` (PEFT does *not* divide
by the scaling, so ``W ~ Q + B A`` and the adapter's forward is ``Q x + s B A x``),
and the base weight becomes ``Q`` (the dequantized values in the weight's dtype,
which PEFT writes into the model and functuner returns as a new tensor).

The quantizers are the bitsandbytes ones PEFT calls, written out:

* ``loftq_bits=4``: NF4, blocks of 64 consecutive elements (row-major), each
  scaled by its absolute maximum and rounded to the nearest of the 16 NF4 levels
  (``bnb.nn.Params4bit(..., quant_type="nf4", compress_statistics=False)``).
* ``loftq_bits=8``: LLM.int8's row-wise absmax (``bnb.nn.Int8Params``): the weight
  is cast to float16, each row scaled to ``[-127, 127]`` and rounded.

peft 0.21 accepts only 4 and 8 bits (its older pure-torch 2-bit quantizer was
removed in peft 0.20); other values raise :class:`ConfigError` as PEFT raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ....errors import ConfigError

__all__ = ["LOFTQ_DEFAULTS", "NF4_LEVELS", "int8_roundtrip", "loftq", "loftq_options", "low_rank", "nf4_roundtrip"]

LOFTQ_DEFAULTS: dict[str, int] = {"loftq_bits": 4, "loftq_iter": 1}  # PEFT's LoftQConfig defaults
NF4_LEVELS = (  # bitsandbytes.functional.get_4bit_type("nf4")
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_BLOCKSIZE = 64
_INV_127 = 7.874015718698502e-3  # bitsandbytes' 1 / 127 for int8 dequantization


def loftq_options(value: Any) -> dict[str, int]:
    """``loftq_config`` (a dict or PEFT's ``LoftQConfig``) checked and merged over PEFT's defaults."""
    if value is None or (isinstance(value, Mapping) and not value):
        raise ConfigError(
            "init_lora_weights='loftq' needs loftq_config={'loftq_bits': 4 or 8, 'loftq_iter': n} (or PEFT's"
            " LoftQConfig), as PEFT requires"
        )
    data = dict(value) if isinstance(value, Mapping) else dict(vars(value))
    unknown = sorted(set(data) - set(LOFTQ_DEFAULTS))
    if unknown:
        raise ConfigError(f"loftq_config has no field(s) {unknown}; known: {sorted(LOFTQ_DEFAULTS)}")
    opts = {**LOFTQ_DEFAULTS, **data}
    bits, iters = opts["loftq_bits"], opts["loftq_iter"]
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ConfigError(
            f"loftq_config['loftq_bits'] must be 4 (NF4) or 8 (int8), got {bits!r} (peft >= 0.20 supports only these)"
        )
    if isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
        raise ConfigError(f"loftq_config['loftq_iter'] must be a positive integer, got {iters!r}")
    return {"loftq_bits": int(bits), "loftq_iter": int(iters)}


def nf4_roundtrip(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> torch.Tensor:
    """``weight`` quantized to NF4 and dequantized, in float32 (bitsandbytes' arithmetic). Pure."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1).values
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:  # a last, short block (bitsandbytes divides it by its own absmax)
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=weight.device)
    values = levels[torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2)]
    out = torch.empty(n, dtype=torch.float32, device=weight.device)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(full)
    if full < n:
        out[full:] = values[full:] * absmax[-1]
    return out.reshape(weight.shape)


def int8_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (2-D) quantized row-wise to int8 (LLM.int8, via float16) and dequantized, in float32. Pure."""
    half = weight.to(torch.float16)
    stats = half.abs().max(dim=1).values.float()
    safe = torch.where(stats > 0, stats, torch.ones_like(stats))
    q = torch.round(half * (127.0 / safe.unsqueeze(-1))).to(torch.int8)
    return q * stats.view(-1, 1) * _INV_127


def low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_low_rank_decomposition``: ``L = U sqrt(diag S)[:, :r]``, ``R = sqrt(diag S)[:r] V^T``."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    return U @ torch.sqrt(torch.diag(S)[:, 0:r]), torch.sqrt(torch.diag(S)[0:r, :]) @ Vh


def loftq(
    weight: torch.Tensor, r: int, bits: int, num_iter: int, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r), Q (out, in))`` in float32 for a base weight ``(out, in)``. Pure.

    ``Q`` is the dequantized base weight of the last round (the caller casts it to the weight's dtype).
    """
    if weight.dim() != 2:
        raise ConfigError(f"LoftQ on {name!r}: needs a 2-D weight, got shape {tuple(weight.shape)}")
    if r > min(weight.shape):
        raise ConfigError(
            f"LoftQ on {name!r}: r={r} is larger than the weight's rank bound {min(weight.shape)}"
            f" (shape {tuple(weight.shape)}); lower r or rank_pattern for this module"
        )
    quantize = nf4_roundtrip if bits == 4 else int8_roundtrip
    w = weight.detach().float()
    res = w.clone()
    L = R = deq = w
    for i in range(num_iter):
        deq = quantize(res)
        L, R = low_rank(w - deq, r)
        if i + 1 == num_iter:
            break
        res = w - L @ R
    return R.contiguous(), L.contiguous(), deq
