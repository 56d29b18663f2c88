"""The registry of quantized linear kinds functuner can adapt, and the refusal of every other quantized layer.

A quantized linear layer stores its weight in a packed or integer form
(bitsandbytes ``Params4bit`` / ``Int8Params``, torchao tensor subclasses,
optimum-quanto ``QTensor``, HQQ's ``W_q`` plus a meta dict), so ``module.weight``
tells neither its true shape nor its dtype.  Each supported backend describes
its layers once, as a :class:`QuantKind`: how to recognise one, its true
``(out, in)`` shape, its compute dtype, how to dequantize its weight (fp32,
detached) and how to re-quantize a float weight into a new layer of the same
kind (``None`` where the backend cannot).

:func:`kind_of` answers "which kind is this module" (``None`` for a float
layer); :func:`check_supported` refuses, with :class:`UnsupportedModuleError`
naming the module and its type, anything that looks quantized but is not in
the registry (GPTQ/AWQ kernels, torchao int4 tensors, an unknown tensor
subclass...), so a tuner can refuse before it changes anything.

Backends are recognised only when their package is already imported
(``sys.modules``): functuner never imports a quantization library itself just
to look at a model.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from .kind import QuantKind

__all__ = ["KINDS", "check_supported", "is_quantized", "kind_of", "looks_quantized"]


def _kinds() -> tuple[QuantKind, ...]:
    from . import bnb, hqq, quanto, torchao

    return (*bnb.KINDS, *torchao.KINDS, *quanto.KINDS, *hqq.KINDS)


KINDS: tuple[QuantKind, ...] = ()


# torch's own float layers: a plain Parameter weight of a floating dtype is never quantized (the fast answer for
# the common case; quantized backends use subclasses of these layers or of Parameter, which take the slow path)
_PLAIN_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def kind_of(module: nn.Module) -> QuantKind | None:
    """The registered quantized kind of ``module``, else ``None`` (a float layer, or an unsupported one)."""
    if type(module) in _PLAIN_LAYERS:
        weight = module._parameters.get("weight")
        if type(weight) is nn.Parameter and weight.is_floating_point():
            return None
    global KINDS
    if not KINDS:
        KINDS = _kinds()
    for kind in KINDS:
        if kind.package in sys.modules and kind.matches(module):
            return kind
    return None


# packages whose layers are quantized linear layers (GPTQ/AWQ/EETQ/AQLM... kernels)
_QUANT_PACKAGES = (
    "bitsandbytes",
    "torchao",
    "optimum",
    "hqq",
    "auto_gptq",
    "gptqmodel",
    "awq",
    "eetq",
    "aqlm",
    "fbgemm_gpu",
    "compressed_tensors",
    "exllama",
    "exllamav2",
    "vptq",
    "quark",
    "higgs",
)
_QUANT_ATTRS = ("qweight", "W_q", "qzeros", "weight_packed", "codes")


def looks_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds a quantized weight by any sign functuner knows (registered or not)."""
    top = type(module).__module__.partition(".")[0]
    if top in _QUANT_PACKAGES and ("Linear" in type(module).__name__ or hasattr(module, "weight")):
        return True
    if any(isinstance(getattr(module, a, None), torch.Tensor) for a in _QUANT_ATTRS):
        return True
    weight = module._parameters.get("weight")
    if weight is None:
        return False
    if type(weight) not in (torch.Tensor, nn.Parameter) and type(weight).__module__.partition(".")[0] != "torch":
        return True  # a tensor subclass from another package: a quantized (or otherwise packed) weight
    return not (weight.is_floating_point() or weight.is_complex())


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a registered quantized linear layer."""
    return kind_of(module) is not None


def check_supported(module: nn.Module, name: str) -> QuantKind | None:
    """The kind of ``module`` if it is a registered quantized layer, ``None`` if it is a float layer.

    Raises :class:`UnsupportedModuleError` naming ``name`` and the module's (and
    its weight's) type when the module looks quantized but no registered kind
    handles it.
    """
    kind = kind_of(module)
    if kind is not None or not looks_quantized(module):
        return kind
    weight = module._parameters.get("weight")
    wtype = f", weight {type(weight).__module__}.{type(weight).__name__} {weight.dtype}" if weight is not None else ""
    raise UnsupportedModuleError(
        f"module {name!r} is a quantized layer functuner does not support ({type(module).__module__}."
        f"{type(module).__name__}{wtype}); supported quantized layers: bitsandbytes Linear4bit / Linear8bitLt,"
        " torchao int8 weight-only (Int8Tensor), optimum-quanto QLinear, HQQ HQQLinear. Exclude it"
        " (exclude_modules) or dequantize the model first"
    )
