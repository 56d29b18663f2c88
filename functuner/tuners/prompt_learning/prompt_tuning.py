"""PEFT's prompt tuning (Lester et al. 2021, ``PromptTuningConfig``) as a config plus pure functions.

The adapter is one table ``E`` of ``num_virtual_tokens`` learned embeddings ``(n, token_dim)``,
prepended to the input embeddings (see :mod:`.calls` for the forward per task type, caches, generation).  ``init``
follows PEFT's ``PromptEmbedding``: ``RANDOM`` = ``nn.Embedding``'s standard normal; ``SAMPLE_VOCAB``
= the word embeddings of random vocabulary ids; ``TEXT`` = the word embeddings of
``prompt_tuning_init_text`` tokenized with ``tokenizer_name_or_path`` (repeated / cut to ``n``).
Draws use only the generator, so the values differ from PEFT's global-RNG draws; shapes, names and
the forward are PEFT's.

Param name (PEFT's in-memory name): ``prompt_encoder.<adapter>.embedding.weight`` (float32, as PEFT), plus
``modules_to_save`` copies (:mod:`.heads`).
No merged form (functuner.merge refuses it with ``ConfigError``); no per-sample adapters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ...core.params import TunerParams
from ...core.routing import Routes
from ...errors import ConfigError, ParamsMismatchError
from ..base import CallContext, KeyNaming, Tuner, TunerConfig
from . import calls, common, heads

__all__ = ["PEFT_FORMAT", "PromptTuningConfig", "init", "routes", "tuner", "validate"]

_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass(frozen=True, eq=False)
class PromptTuningConfig(TunerConfig):
    """PEFT's ``PromptTuningConfig`` fields and defaults (peft 0.21).

    ``num_virtual_tokens`` is required; ``token_dim``, ``num_layers``, ``num_attention_heads`` and
    ``num_transformer_submodules`` are filled from the model at ``init`` (as PEFT does); the params
    carry the filled config.  ``task_type``: one of :data:`.common.TASK_TYPES` (see :mod:`.calls`).
    """

    num_virtual_tokens: Any = None
    token_dim: Any = None
    num_transformer_submodules: Any = None
    num_attention_heads: Any = None
    num_layers: Any = None
    modules_to_save: Any = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Any = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: Any = None
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    auto_mapping: Any = None
    peft_version: Any = None
    swift_type: str = "PROMPT_TUNING"
    peft_type: str = "PROMPT_TUNING"

    def check(self, *, complete: bool = True) -> None:
        """PEFT's checks (``PromptTuningConfig.__post_init__``) plus functuner's scope (:func:`.common.check_common`)."""
        common.check_common(self, complete)
        init = self.prompt_tuning_init
        if init not in _INITS:
            raise ConfigError(f"PromptTuningConfig.prompt_tuning_init={init!r}: expected one of {list(_INITS)}")
        if init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ConfigError(
                    "PromptTuningConfig.prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a tokenizer to encode"
                    " prompt_tuning_init_text)"
                )
            if not self.prompt_tuning_init_text:
                raise ConfigError("PromptTuningConfig.prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ConfigError(
                f"PromptTuningConfig.tokenizer_kwargs is only used with prompt_tuning_init='TEXT', got {init!r}"
            )
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, Mapping):
            raise ConfigError(f"PromptTuningConfig.tokenizer_kwargs must be a dict, got {self.tokenizer_kwargs!r}")


def _text_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """PEFT's TEXT init ids: the tokenized text, repeated and cut to ``total`` (no ``trust_remote_code``)."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # as PEFT: a checkpoint's config must not run remote code
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(
            f"PromptTuningConfig.prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to no ids"
        )
    ids = ids * math.ceil(total / len(ids))
    return ids[:total]


def init(
    model: nn.Module, config: PromptTuningConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """A fresh virtual token table (float32, on the word embeddings' device); the params carry the filled config.

    Pure: the model is only read (its word embeddings for ``SAMPLE_VOCAB`` / ``TEXT``).
    """
    if not isinstance(config, PromptTuningConfig):
        raise ConfigError(f"prompt_tuning.init needs a PromptTuningConfig, got {type(config).__name__}")
    config.check()
    config = dataclasses.replace(config, **common.fill_from_model(model, config))
    emb = common.word_embeddings(model)
    weight = cast(torch.Tensor, emb.weight)
    n, dim = int(config.num_virtual_tokens), int(config.token_dim)
    if weight.shape[-1] != dim:
        raise ConfigError(f"PromptTuningConfig.token_dim={dim} does not match the word embeddings' {weight.shape[-1]}")
    if config.prompt_tuning_init == "RANDOM" or config.inference_mode:
        table = torch.randn(n, dim, generator=generator)
    else:
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, int(weight.shape[0]), (n,), generator=generator)
        else:
            ids = torch.tensor(_text_ids(config, n), dtype=torch.long)
        with torch.no_grad():
            table = emb(ids.to(weight.device)).detach().clone().float()
    tensors = {common.embedding_key(adapter_name): table.to(weight.device)}
    return TunerParams({**tensors, **heads.copies(model, config, adapter_name)}, config, adapter_name)


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` if ``params`` is not one ``(num_virtual_tokens, token_dim)`` table. Pure."""
    common.check_table(model, params, "prompt tuning")
    extra = sorted(set(heads.split(params)[0]) - {common.embedding_key(params.adapter_name)})
    if extra:
        raise ParamsMismatchError(f"prompt tuning params hold unexpected keys {extra[:4]}")


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """A pre slot on the model prepending the table to the input embeddings (PEFT's CausalLM forward)."""
    validate(model, params)
    table = params[common.embedding_key(params.adapter_name)]
    return common.prompt_routes(model, params, lambda: table, "prompt tuning")


def _check_state(config: Any, state: Mapping[str, torch.Tensor], source: str) -> None:
    n = config.num_virtual_tokens
    for key, t in heads.split(state)[0].items():
        if t.dim() != 2 or t.shape[0] != n or (config.token_dim is not None and t.shape[1] != config.token_dim):
            raise ParamsMismatchError(
                f"{source}: {key!r} has shape {tuple(t.shape)}; expected ({n}, token_dim={config.token_dim})"
            )


PEFT_FORMAT = common.peft_format(
    "PROMPT_TUNING", "prompt tuning", lambda state, name: state[common.embedding_key(name)]
)

tuner = Tuner(
    swift_type="PROMPT_TUNING",
    config_cls=PromptTuningConfig,
    init=init,
    routes=routes,
    validate=validate,
    key_naming=KeyNaming(after=("prompt_encoder",)),
    peft=PEFT_FORMAT,
    generation=calls.generating,
    check_state=_check_state,
)
