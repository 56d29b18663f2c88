"""QLoRA preparation (PEFT's ``prepare_model_for_kbit_training``): a pure plan, and the function that applies it.

PEFT's preparation of a quantized model for adapter training, step by step:

1. freeze every base parameter;
2. cast every float16 / bfloat16 parameter that is not quantized storage
   (layer norms, embeddings, the LM head, biases) to float32, except on
   torchao / HQQ models (and GPTQ / AQLM / EETQ ones), whose layers compute in
   their own dtype;
3. on a quantized model with gradient checkpointing: make the input
   embeddings' output require grad (so reentrant checkpointing has a graph to
   recompute) and turn gradient checkpointing on (transformers 5:
   ``activation_checkpointing_enable``, whose default is ``use_reentrant=False``
   where PEFT passes ``{}``, which torch warns it will refuse).

:func:`kbit_training_plan` computes steps 2 and 3 without touching the model
(the float32 copies and the two flags); :func:`prepare_model_for_kbit_training`
applies the plan in place, as PEFT does, and returns the model.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import nn

from .registry import kind_of

__all__ = ["KbitPlan", "kbit_training_plan", "prepare_model_for_kbit_training"]

# backends whose layers PEFT leaves in their own dtype (it keys on model.quantization_method / hqq_quantized)
_NO_UPCAST = ("torchao", "hqq")
_NO_UPCAST_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


class KbitPlan(NamedTuple):
    """What preparing a model for k-bit training changes (see :func:`kbit_training_plan`)."""

    casts: dict[str, torch.Tensor]  # {parameter name: float32 copy} for fp16/bf16 non-quantized parameters
    quantized: bool  # the model has quantized layers (or says it was loaded in 4/8 bit)
    input_grads: bool  # make the input embeddings' output require grad (reentrant gradient checkpointing)
    gradient_checkpointing: bool  # turn gradient checkpointing on


def _is_quantized_storage(module: nn.Module, pname: str) -> bool:
    return kind_of(module) is not None and pname != "bias"


def kbit_training_plan(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> KbitPlan:
    """PEFT's ``prepare_model_for_kbit_training`` as data: which parameters become fp32, which flags are set. Pure."""
    kinds = {k.package for m in model.modules() if (k := kind_of(m)) is not None}
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)
    quantized = bool(kinds) or bool(
        getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    )
    no_upcast = bool(kinds & set(_NO_UPCAST)) or method in _NO_UPCAST_METHODS or getattr(model, "hqq_quantized", False)
    casts: dict[str, torch.Tensor] = {}
    if not no_upcast:
        for mname, module in model.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if full in casts or _is_quantized_storage(module, pname):
                    continue
                if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                    casts[full] = param.detach().float()
    kwargs = gradient_checkpointing_kwargs or {}
    checkpointing = quantized and use_gradient_checkpointing
    input_grads = checkpointing and ("use_reentrant" not in kwargs or bool(kwargs["use_reentrant"]))
    return KbitPlan(casts, quantized, input_grads, checkpointing)


def _make_inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Apply :func:`kbit_training_plan` to ``model`` in place (as PEFT's function of the same name) and return it."""
    plan = kbit_training_plan(model, use_gradient_checkpointing, gradient_checkpointing_kwargs)
    for param in model.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        for name, value in plan.casts.items():
            model.get_parameter(name).data = value
    if plan.input_grads:
        enable = getattr(model, "enable_input_require_grads", None)
        if callable(enable):
            enable()
        else:
            get_embeddings: Any = model.get_input_embeddings
            get_embeddings().register_forward_hook(_make_inputs_require_grad)
    if plan.gradient_checkpointing:
        kwargs = gradient_checkpointing_kwargs or {}
        activation: Any = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
        if callable(activation):
            # None: transformers' default use_reentrant=False (PEFT passes {}, which torch.utils.checkpoint
            # warns about and will refuse: "use_reentrant should be passed explicitly")
            activation(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            gc_enable: Any = model.gradient_checkpointing_enable
            if "gradient_checkpointing_kwargs" in inspect.signature(gc_enable).parameters:
                gc_enable(gradient_checkpointing_kwargs=kwargs)
            else:
                gc_enable()
    return model
