"""functuner: parameter-efficient fine-tuning as immutable pytrees and pure functions.

Functional API::

    import functuner as ft
    params = ft.init(model, ft.LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]), generator=0)
    out = ft.apply(model, params, (input_ids,))          # model untouched
    grads = torch.func.grad(loss_fn)(params, batch)      # params is a pytree
    merged = ft.merge(model, params)                     # new weights, model untouched
"""

from __future__ import annotations

from . import errors, keys, routing
from .core import apply, bind_routes, init, merge, unmerge, validate
from .grads import per_sample_grads, value_and_grad
from .keys import from_peft_state_dict, rename_adapter, to_peft_state_dict
from .params import TunerParams, tree_map
from .routing import checkpoint_context_fn, gradient_checkpointing_enable, remove_slots
from .swift import Swift, SwiftConfig, SwiftModel
from .tuners import REGISTRY, Tuner, TunerConfig, register, tuner_for
from .tuners.adapter import AdapterConfig
from .tuners.llamapro import LLaMAProConfig
from .tuners.longlora import LongLoRAConfig
from .tuners.lora import LoRAConfig, LoraConfig, lora_delta
from .tuners.neftune import NEFTuneConfig
from .tuners.part import PartConfig
from .tuners.prompt import PromptConfig
from .tuners.reft import ReftConfig
from .tuners.restuning import ResTuningConfig
from .tuners.scetuning import SCETuningConfig
from .tuners.side import SideConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "NEFTuneConfig",
    "PartConfig",
    "PromptConfig",
    "SideConfig",
    "LoRAConfig",
    "LongLoRAConfig",
    "ReftConfig",
    "LLaMAProConfig",
    "SCETuningConfig",
    "ResTuningConfig",
    "LoraConfig",
    "REGISTRY",
    "Swift",
    "SwiftConfig",
    "SwiftModel",
    "Tuner",
    "TunerConfig",
    "TunerParams",
    "apply",
    "checkpoint_context_fn",
    "gradient_checkpointing_enable",
    "bind_routes",
    "errors",
    "from_peft_state_dict",
    "init",
    "keys",
    "lora_delta",
    "merge",
    "per_sample_grads",
    "register",
    "remove_slots",
    "rename_adapter",
    "routing",
    "to_peft_state_dict",
    "tree_map",
    "tuner_for",
    "unmerge",
    "validate",
    "value_and_grad",
]
