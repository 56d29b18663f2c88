"""What PEFT's prompt-learning tuners share: config checks, the embedding forward slot, PEFT's layout.

Prompt tuning and P-tuning use the forward slot below; prefix tuning (its own slot, a KV cache)
shares the config checks and PEFT's layout.

PEFT's ``PeftModelForCausalLM.forward`` (peft 0.21) runs a prompt-learning adapter as:
embed ``input_ids`` with the model's word embeddings (unless ``inputs_embeds`` is given),
prepend the ``num_virtual_tokens`` virtual token embeddings, prepend ones to ``attention_mask``
and ``-100`` to ``labels``, and call the model with ``inputs_embeds``.  Here the same happens in a
*pre slot* on the model given to ``functuner.apply`` (its top-level ``forward``), so nothing is
written to the model and the params stay a pure pytree.

Task types (``CAUSAL_LM``, ``SEQ_CLS``, ``TOKEN_CLS``, ``FEATURE_EXTRACTION``), KV caches and generation:
:mod:`.calls`.  ``modules_to_save`` (PEFT's classifier heads for ``SEQ_CLS`` / ``TOKEN_CLS``): :mod:`.heads`.
Refused with a typed error, never ignored: ``SEQ_2_SEQ_LM`` and ``num_transformer_submodules`` other than 1
(encoder-decoder models).

PEFT's files hold ``prompt_embeddings`` (no prefix): the virtual tokens' final embeddings,
``(num_virtual_tokens, token_dim)``, and the ``modules_to_save`` copies at ``base_model.<module>.<param>``
(PEFT's prompt-learning model wraps the transformers model directly, without ``base_model.model.``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import nn

from ...core.params import TunerParams
from ...core.routing import Routes, ensure_slots
from ...errors import CheckpointError, ConfigError, ParamsMismatchError
from ..spec import PeftFormat
from . import calls, heads

__all__ = [
    "PEFT_VERSION",
    "PROMPT_KEY",
    "TASK_TYPES",
    "check_common",
    "as_kwargs",
    "check_table",
    "embedding_key",
    "fill_from_model",
    "peft_format",
    "prompt_routes",
    "with_heads",
    "word_embeddings",
]

PEFT_VERSION = "0.21.2"  # the PEFT release whose layout these files follow (PEFT writes its version into the config)
PROMPT_KEY = "prompt_embeddings"  # PEFT's on-disk name, stored without any prefix
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION")


def embedding_key(adapter_name: str) -> str:
    """functuner's (= PEFT's in-memory) name of the virtual token table: ``prompt_encoder.<adapter>.embedding.weight``."""
    return f"prompt_encoder.{adapter_name}.embedding.weight"


def _positive_int(value: Any, field: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field} must be a positive int, got {value!r}")


def check_common(config: Any, complete: bool) -> None:
    """Checks of PEFT's ``PromptLearningConfig`` fields (names the field; ``complete``: required ones too)."""
    cls = type(config).__name__
    _positive_int(config.num_virtual_tokens, f"{cls}.num_virtual_tokens", optional=not complete)
    for field in ("token_dim", "num_attention_heads", "num_layers"):
        _positive_int(getattr(config, field), f"{cls}.{field}", optional=True)
    if config.num_transformer_submodules not in (None, 1):
        raise ConfigError(
            f"{cls}.num_transformer_submodules={config.num_transformer_submodules!r}: functuner's prompt learning runs"
            " one transformer stack (1); encoder-decoder models (2, PEFT's SEQ_2_SEQ_LM) are not implemented"
        )
    if config.task_type is not None and config.task_type not in TASK_TYPES:
        why = " (encoder-decoder models are not implemented)" if config.task_type == "SEQ_2_SEQ_LM" else ""
        raise ConfigError(f"{cls}.task_type={config.task_type!r}{why}: expected one of {list(TASK_TYPES)}")
    if complete and config.task_type is None:
        raise ConfigError(
            f"{cls}.task_type is None: set it to one of {list(TASK_TYPES)} (PEFT's base PeftModel silently runs no"
            " prompt without a task type)"
        )
    mts = config.modules_to_save
    if mts is not None and not (isinstance(mts, (list, tuple)) and all(isinstance(m, str) and m for m in mts)):
        raise ConfigError(f"{cls}.modules_to_save must be a list of module names, got {mts!r}")
    if not isinstance(config.inference_mode, bool):
        raise ConfigError(f"{cls}.inference_mode must be True or False, got {config.inference_mode!r}")


def word_embeddings(model: nn.Module) -> nn.Module:
    """The model's word embeddings (``get_input_embeddings()``, else ``embeddings.word_embeddings`` as PEFT)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        try:
            emb = model.get_submodule("embeddings.word_embeddings")
        except AttributeError:
            emb = None
    if not isinstance(emb, nn.Module):
        raise ConfigError(
            f"prompt learning needs the model's word embeddings; {type(model).__name__} has no get_input_embeddings()"
            " nor an 'embeddings.word_embeddings' module"
        )
    return emb


def fill_from_model(model: nn.Module, config: Any) -> dict[str, Any]:
    """PEFT's ``_prepare_prompt_learning_config``: fields left ``None`` filled from the model's config."""
    mc = getattr(model, "config", None)
    if mc is not None and hasattr(mc, "get_text_config"):
        mc = mc.get_text_config()

    def first(*names: str) -> Any:
        return next((getattr(mc, n) for n in names if getattr(mc, n, None) is not None), None)

    out: dict[str, Any] = {"num_transformer_submodules": 1}
    if config.task_type in ("SEQ_CLS", "TOKEN_CLS"):  # PEFT trains the classifier head beside the virtual tokens
        have = tuple(config.modules_to_save or ())
        out["modules_to_save"] = have + tuple(h for h in heads.CLASSIFIER_HEADS if h not in have)
    for field, names in (
        ("num_layers", ("num_hidden_layers", "num_layers", "n_layer")),
        ("token_dim", ("hidden_size", "n_embd", "d_model")),
        ("num_attention_heads", ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")),
    ):
        if getattr(config, field) is None:
            value = first(*names)
            if value is None:
                raise ConfigError(
                    f"{type(config).__name__}.{field} is None and the model has no config to read it from; set it"
                )
            out[field] = int(value)
    return out


def as_kwargs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments as keywords of ``model.forward`` (so a slot can rewrite them by name)."""
    if not args:
        return dict(kwargs)
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(
            f"prompt learning: cannot bind the arguments of {type(model).__name__}.forward: {e}"
        ) from None
    return {**bound.arguments.pop("kwargs", {}), **bound.arguments}


def prompt_routes(model: nn.Module, params: TunerParams, prompts_of: Callable[[], torch.Tensor], what: str) -> Routes:
    """A pre slot on ``model`` prepending ``prompts_of()`` (``(num_virtual_tokens, token_dim)``), as PEFT's forward
    for the config's ``task_type`` (:func:`.calls.prompt_call`), plus the ``modules_to_save`` copies' slots."""
    n, task = int(params.config.num_virtual_tokens), str(params.config.task_type)
    ensure_slots([model], pre=True)

    def slot(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), calls.prompt_call(
            module, as_kwargs(module, args, kwargs), n, task, prompts_of, word_embeddings, what
        )

    return with_heads(model, params, Routes(forward={}, pre={model: [slot]}))


def with_heads(model: nn.Module, params: TunerParams, routes: Routes) -> Routes:
    """``routes`` plus the forward slots of the params' ``modules_to_save`` copies (:mod:`.heads`)."""
    copies = heads.split(params)[1]
    if not copies:
        return routes
    extra = heads.head_routes(model, copies)
    return Routes(forward={**routes.forward, **extra.forward}, pre=dict(routes.pre))


def check_table(model: nn.Module | None, params: TunerParams, what: str) -> torch.Tensor:
    """The virtual token table of ``params``, checked: ``(num_virtual_tokens, token_dim)``."""
    key = embedding_key(params.adapter_name)
    if key not in params:
        raise ParamsMismatchError(f"{what} params lack {key!r} (have {sorted(params)[:4]})")
    t = params[key]
    cfg = params.config
    if t.dim() != 2 or t.shape[0] != cfg.num_virtual_tokens:
        raise ParamsMismatchError(
            f"params[{key!r}] has shape {tuple(t.shape)}; expected (num_virtual_tokens={cfg.num_virtual_tokens}, dim)"
        )
    if model is not None:
        heads.validate_heads(model, heads.split(params)[1], params.adapter_name)
        emb = cast(torch.Tensor, getattr(word_embeddings(model), "weight", None))
        if emb is not None and emb.shape[-1] != t.shape[1]:
            raise ParamsMismatchError(
                f"params[{key!r}] has token_dim {t.shape[1]}; the model's word embeddings have {emb.shape[-1]}"
            )
    return t


def peft_format(
    peft_type: str,
    what: str,
    to_embeddings: Callable[[Mapping[str, torch.Tensor], str], torch.Tensor],
) -> PeftFormat:
    """PEFT's layout: ``adapter_config.json`` = fields + ``peft_type``; one bare ``prompt_embeddings`` tensor.

    ``to_embeddings(state, adapter_name)`` gives the final virtual token embeddings PEFT saves
    (P-tuning runs its encoder; PEFT then loads them as an inference-only table).
    """

    def config_to_json(config: Any) -> dict[str, Any]:
        data = cast(dict[str, Any], config.to_dict())
        data.pop("swift_type", None)
        data["peft_type"] = peft_type
        data["inference_mode"] = True  # PeftModel.save_pretrained writes True: the file holds the final embeddings
        if data.get("peft_version") is None:
            data["peft_version"] = PEFT_VERSION
        return data

    def to_keys(state: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        prefix = f"prompt_encoder.{adapter_name}."
        foreign = [k for k in state if not k.startswith(prefix)]
        if foreign or embedding_key(adapter_name) not in state:
            raise CheckpointError(
                f"keys {(foreign or sorted(state))[:4]} are not the {what} tensors of adapter {adapter_name!r}"
                f" ({embedding_key(adapter_name)!r} and its encoder); cannot name them for PEFT"
            )
        return {PROMPT_KEY: to_embeddings(state, adapter_name).detach()}

    def from_keys(state: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        if set(state) != {PROMPT_KEY}:
            raise CheckpointError(
                f"a PEFT {peft_type} file holds exactly one tensor {PROMPT_KEY!r}; found {sorted(state)[:4]}"
            )
        return {embedding_key(adapter_name): state[PROMPT_KEY]}

    return PeftFormat(
        peft_type=peft_type,
        config_to_json=config_to_json,
        to_keys=to_keys,
        from_keys=from_keys,
        shim_reads=False,
        top_level=(PROMPT_KEY,),
        model_prefix="base_model.",  # PEFT's prompt-learning PeftModel wraps the model itself (no tuner model)
    )
