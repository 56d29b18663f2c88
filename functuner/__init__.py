"""functuner: parameter-efficient fine-tuning as immutable pytrees and pure functions.

Functional API::

    import functuner as ft
    params = ft.init(model, ft.LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]), generator=0)
    out = ft.apply(model, params, (input_ids,))          # model untouched
    grads = torch.func.grad(loss_fn)(params, batch)      # params is a pytree
    merged = ft.merge(model, params)                     # new weights, model untouched
    ft.save(params, "out/")                              # SWIFT's layout (format="peft" for PEFT's)
    params = ft.load("out/", model=model)

The package layout (each concern has one home):

* :mod:`functuner.core`: mechanisms that know no tuner (the params pytree, routing, target matching,
  adapter names, the filesystem helper, hub resolution);
* :mod:`functuner.tuners`: the registry, the ``Tuner`` shape and one module (or package, for LoRA) per tuner;
* :mod:`functuner.io`: key renames, the one adapter-directory reader/writer, the streaming shard merge,
  PEFT pass-through;
* :mod:`functuner.shim`: the SWIFT-compatible stateful ``Swift`` / ``SwiftModel``;
* :mod:`functuner.cli`: the ``functuner`` console script and its demo.

Public names are imported lazily (PEP 562), so ``import functuner`` (and the console script's
``--help``) does not load torch until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "AdapterConfig": "functuner.tuners.adapter",
    "GaLoreAdamW": "functuner.optim",
    "GaLoreConfig": "functuner.optim",
    "LISACallback": "functuner.optim",
    "LISAConfig": "functuner.optim",
    "LISASchedule": "functuner.optim",
    "create_galore_optimizer": "functuner.optim",
    "galore_adamw": "functuner.optim",
    "IA3Config": "functuner.tuners.ia3",
    "LoHaConfig": "functuner.tuners.loha",
    "LoKrConfig": "functuner.tuners.lokr",
    "LLaMAProConfig": "functuner.tuners.llamapro",
    "LoRAConfig": "functuner.tuners.lora",
    "LoraInit": "functuner.tuners.lora.inits.api",
    "LoraConfig": "functuner.tuners.lora",
    "LongLoRAConfig": "functuner.tuners.longlora",
    "NEFTuneConfig": "functuner.tuners.neftune",
    "PartConfig": "functuner.tuners.part",
    "PromptConfig": "functuner.tuners.prompt",
    "PromptEncoderConfig": "functuner.tuners.prompt_learning.p_tuning",
    "PromptTuningConfig": "functuner.tuners.prompt_learning.prompt_tuning",
    "PrefixTuningConfig": "functuner.tuners.prompt_learning.prefix_tuning",
    "ReftConfig": "functuner.tuners.reft",
    "ResTuningConfig": "functuner.tuners.restuning",
    "SCETuningConfig": "functuner.tuners.scetuning",
    "SideConfig": "functuner.tuners.side",
    "Swift": "functuner.shim",
    "SwiftConfig": "functuner.shim",
    "SwiftCheckpointCallback": "functuner.shim",
    "SwiftModel": "functuner.shim",
    "SwiftTrainerMixin": "functuner.shim",
    "to_peft_config": "functuner.shim",
    "reference_model": "functuner.shim",
    "TrainableTokensConfig": "functuner.tuners.trainable_tokens",
    "Tuner": "functuner.tuners",
    "TunerConfig": "functuner.tuners",
    "TunerParams": "functuner.core.params",
    "apply": "functuner.functional",
    "checkpoint_context_fn": "functuner.core.routing",
    "from_peft_state_dict": "functuner.io.keys",
    "gradient_checkpointing_enable": "functuner.core.routing",
    "init": "functuner.functional",
    "initialize_lora_eva_weights": "functuner.shim.data_init",
    "load": "functuner.io.checkpoint",
    "load_extra_states": "functuner.io.checkpoint",
    "lora_delta": "functuner.tuners.lora",
    "lora_init": "functuner.tuners.lora.inits.api",
    "lora_mark_residual_base": "functuner.tuners.lora.inits.api",
    "lora_replace_weights_loftq": "functuner.tuners.lora.inits.api",
    "lora_residual_weights": "functuner.tuners.lora.inits.api",
    "lora_to_plain": "functuner.tuners.lora.inits.api",
    "merge": "functuner.functional",
    "per_sample_grads": "functuner.grads",
    "preprocess_corda": "functuner.shim.data_init",
    "register": "functuner.tuners",
    "rename_adapter": "functuner.io.keys",
    "save": "functuner.io.checkpoint",
    "to_peft_state_dict": "functuner.io.keys",
    "tree_map": "functuner.core.params",
    "tuner_for": "functuner.tuners",
    "unmerge": "functuner.functional",
    "validate": "functuner.functional",
    "value_and_grad": "functuner.grads",
}
_SUBMODULES = ("cli", "core", "distributed", "errors", "functional", "grads", "io", "optim", "shim", "tuners")

__all__ = [
    "AdapterConfig",
    "GaLoreAdamW",
    "GaLoreConfig",
    "IA3Config",
    "LISACallback",
    "LISAConfig",
    "LISASchedule",
    "LLaMAProConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoRAConfig",
    "LongLoRAConfig",
    "LoraConfig",
    "LoraInit",
    "NEFTuneConfig",
    "PartConfig",
    "PrefixTuningConfig",
    "PromptConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "ReftConfig",
    "ResTuningConfig",
    "SCETuningConfig",
    "SideConfig",
    "Swift",
    "SwiftCheckpointCallback",
    "SwiftConfig",
    "SwiftModel",
    "SwiftTrainerMixin",
    "TrainableTokensConfig",
    "Tuner",
    "TunerConfig",
    "TunerParams",
    "apply",
    "checkpoint_context_fn",
    "create_galore_optimizer",
    "errors",
    "from_peft_state_dict",
    "galore_adamw",
    "gradient_checkpointing_enable",
    "init",
    "initialize_lora_eva_weights",
    "load",
    "load_extra_states",
    "lora_delta",
    "lora_init",
    "lora_mark_residual_base",
    "lora_replace_weights_loftq",
    "lora_residual_weights",
    "lora_to_plain",
    "merge",
    "per_sample_grads",
    "preprocess_corda",
    "reference_model",
    "register",
    "rename_adapter",
    "save",
    "to_peft_config",
    "to_peft_state_dict",
    "tree_map",
    "tuner_for",
    "unmerge",
    "validate",
    "value_and_grad",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"functuner.{name}")
    raise AttributeError(f"module 'functuner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


if TYPE_CHECKING:  # what type checkers and IDEs see; the same names __getattr__ loads on first use
    from . import errors
    from .core.params import TunerParams, tree_map
    from .core.routing import checkpoint_context_fn, gradient_checkpointing_enable
    from .functional import apply, init, merge, unmerge, validate
    from .grads import per_sample_grads, value_and_grad
    from .io.checkpoint import load, load_extra_states, save
    from .io.keys import from_peft_state_dict, rename_adapter, to_peft_state_dict
    from .optim import (
        GaLoreAdamW,
        GaLoreConfig,
        LISACallback,
        LISAConfig,
        LISASchedule,
        create_galore_optimizer,
        galore_adamw,
    )
    from .shim import (
        Swift,
        SwiftCheckpointCallback,
        SwiftConfig,
        SwiftModel,
        SwiftTrainerMixin,
        reference_model,
        to_peft_config,
    )
    from .shim.data_init import initialize_lora_eva_weights, preprocess_corda
    from .tuners import Tuner, TunerConfig, register, tuner_for
    from .tuners.adapter import AdapterConfig
    from .tuners.ia3 import IA3Config
    from .tuners.llamapro import LLaMAProConfig
    from .tuners.loha import LoHaConfig
    from .tuners.lokr import LoKrConfig
    from .tuners.longlora import LongLoRAConfig
    from .tuners.lora import LoRAConfig, LoraConfig, lora_delta
    from .tuners.lora.inits.api import (
        LoraInit,
        lora_init,
        lora_mark_residual_base,
        lora_replace_weights_loftq,
        lora_residual_weights,
        lora_to_plain,
    )
    from .tuners.neftune import NEFTuneConfig
    from .tuners.part import PartConfig
    from .tuners.prompt import PromptConfig
    from .tuners.prompt_learning.p_tuning import PromptEncoderConfig
    from .tuners.prompt_learning.prefix_tuning import PrefixTuningConfig
    from .tuners.prompt_learning.prompt_tuning import PromptTuningConfig
    from .tuners.reft import ReftConfig
    from .tuners.restuning import ResTuningConfig
    from .tuners.scetuning import SCETuningConfig
    from .tuners.side import SideConfig
    from .tuners.trainable_tokens import TrainableTokensConfig
