"""Tiny Llamas quantized by each backend functuner supports on CPU, built identically on every call.

``quantized_llama(backend)`` quantizes every linear layer of the decoder
(``lm_head`` stays float, as transformers' quantizers do) of ``tiny_llama``
with hidden size 64 and intermediate size 128 (bitsandbytes' 4-bit blocks and
HQQ's groups need in-features that are multiples of 64).  Quantization is
deterministic, so two calls give bitwise-equal models: one for functuner and
one for PEFT.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from typing import Any

import torch
from models import tiny_llama
from torch import nn

# torchao logs missing CUDA-only extension libraries at import (not a warning, not an error on CPU)
logging.getLogger("torchao").setLevel(logging.ERROR)
os.environ.setdefault("TORCH_LOGS", "-all")

BACKENDS = ("bnb4", "bnb8", "torchao8", "quanto8", "quanto4", "hqq4")
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def float_llama(seed: int = 0) -> nn.Module:
    return tiny_llama(seed, **LLAMA)


def _replace_linears(model: nn.Module, make: Any) -> nn.Module:
    for _name, parent in list(model.named_modules()):
        for cname, child in list(parent.named_children()):
            if type(child) is nn.Linear and cname != "lm_head":
                setattr(parent, cname, make(child))
    return model


def _bnb4(lin: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32, quant_type="nf4"
    )
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")


def _bnb8(lin: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")


def _hqq4(lin: nn.Linear) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=4, group_size=64)
    return HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu")


def quantized_llama(backend: str, seed: int = 0) -> nn.Module:
    """``float_llama(seed)`` with its decoder's linear layers quantized by ``backend`` (one of :data:`BACKENDS`).

    HQQ (whose quantizer is the slow part): a deep copy of one model built per seed; the others are rebuilt
    (optimum-quanto's tensors cannot be deep-copied).
    """
    if backend == "hqq4":
        return copy.deepcopy(_hqq_llama(seed))
    return _quantized(backend, seed)


@functools.cache
def _hqq_llama(seed: int) -> nn.Module:
    return _quantized("hqq4", seed)


def _quantized(backend: str, seed: int) -> nn.Module:
    model = float_llama(seed)
    if backend in ("bnb4", "bnb8"):
        _replace_linears(model, _bnb4 if backend == "bnb4" else _bnb8)
        # what transformers sets when it loads with a BitsAndBytesConfig (PEFT dispatches its bnb layers on it)
        model.is_loaded_in_4bit, model.is_loaded_in_8bit = backend == "bnb4", backend == "bnb8"
        return model.eval()
    if backend == "hqq4":
        return _replace_linears(model, _hqq4).eval()
    if backend == "torchao8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, n: type(m) is nn.Linear and n != "lm_head")
        return model.eval()
    if backend in ("quanto8", "quanto4"):
        import optimum.quanto as q

        q.quantize(model, weights=q.qint8 if backend == "quanto8" else q.qint4, exclude="lm_head")
        q.freeze(model)
        return model.eval()
    raise ValueError(backend)


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))
