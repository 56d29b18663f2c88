"""The ``Tuner`` value and the types of its optional hooks (what ``functional``, ``io`` and the shim call).

Kept apart from :mod:`functuner.tuners.base` (which also holds ``TunerConfig`` and the config's disk
methods) so that :mod:`functuner.tuners.registry` and :mod:`functuner.tuners.config_json` can name these
types without an import cycle.  See :mod:`functuner.tuners.base` for the shape of a tuner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes

__all__ = [
    "CallContext",
    "DataInit",
    "KeyNaming",
    "PeftFormat",
    "PerSample",
    "ShardMergePlan",
    "Training",
    "Tuner",
    "module_local",
]


@dataclass(frozen=True)
class CallContext:
    """Per-call options every tuner's ``routes`` sees.

    ``generator`` drives random ops (dropout, noise); ``None`` means torch's
    global RNG (the stateful shim's behaviour, like PEFT).
    """

    generator: torch.Generator | None = None


def _same_keys(state: Mapping[str, torch.Tensor], config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """Default key hook: SWIFT's on-disk names are functuner's names."""
    return dict(state)


def _no_model_check(model: nn.Module, config: Any, source: str) -> None:
    """Default model check: nothing to check before params are built."""


def module_local(model: nn.Module, params: TunerParams) -> str | None:
    """The ``sub_batch`` hook of a tuner whose slots all read only their own module's inputs and output."""
    return None


class DataInit(NamedTuple):
    """A tuner's init from data (LoRA's EVA and CorDA): which module inputs the shim records, and the init."""

    # config -> what its init reads ("activations", "covariances"), or None when this config reads no data
    needs: Callable[[Any], str | None]
    # (model, config) -> the names of the modules whose inputs are recorded
    targets: Callable[[nn.Module, Any], list[str]]
    # (model, config, generator, adapter_name, {module: [each call's input]}) -> (params, {state key: new base
    # weight}); pure: the model is read, never written
    init: Callable[
        [nn.Module, Any, torch.Generator, str, Mapping[str, Sequence[torch.Tensor]]],
        tuple[TunerParams, dict[str, torch.Tensor]],
    ]


class KeyNaming(NamedTuple):
    """Where the adapter name sits inside a tuner's param keys, so io can rename it component-wise.

    ``after``: key components followed by the adapter name as its own component
    (LoRA's ``q_proj.lora_A.<adapter>.weight``: ``"lora_A"``).  ``glued``:
    ``(prefix, following)`` pairs for components that are ``<prefix><adapter>``
    (Adapter's ``adapter_<adapter>.linear1``: ``("adapter_", ("linear1", "linear2"))``);
    ``following`` lists the components allowed next (``None``: any), so a module
    that merely looks alike is never renamed.
    """

    after: tuple[str, ...] = ()
    glued: tuple[tuple[str, tuple[str, ...] | None], ...] = ()


class PeftFormat(NamedTuple):
    """How a tuner's adapters look in PEFT's format (``PeftModel.save_pretrained``).

    ``peft_type``: PEFT's name (``adapter_config.json``'s ``peft_type``).
    ``config_to_json(config)``: PEFT's ``adapter_config.json`` dict; raises
    :class:`~functuner.errors.CheckpointError` naming the field PEFT cannot express.
    ``to_keys(state, adapter_name)``: functuner names -> PEFT's on-disk names
    *without* the ``base_model.model.`` prefix (io adds it and handles
    ``modules_to_save``); ``CheckpointError`` naming a key that is not this tuner's.
    ``from_keys(state, adapter_name)``: the inverse (prefix already removed).
    ``check_json(data, source)``: refuse a raw SWIFT ``adapter_config.json`` dict
    (read from ``source``) whose fields PEFT's format cannot hold, before a config
    is built from it (so a conversion says why PEFT cannot take it).
    ``shim_reads``: whether ``Swift.from_pretrained`` reads PEFT directories of
    this type into a ``SwiftModel`` (LoRA); ``False``: the shim hands them to
    ``peft`` and returns a ``PeftModel`` (SWIFT's contract for PEFT's own tuners),
    while ``functuner.load`` / ``functuner.save`` still read and write them natively.
    """

    peft_type: str
    config_to_json: Callable[[Any], dict[str, Any]]
    to_keys: Callable[[Mapping[str, torch.Tensor], str], dict[str, torch.Tensor]]
    from_keys: Callable[[Mapping[str, torch.Tensor], str], dict[str, torch.Tensor]]
    check_json: Callable[[Mapping[str, Any], str], None] = lambda data, source: None
    shim_reads: bool = True
    # bare names (from ``to_keys``) PEFT stores at ``base_model.<name>``, outside the model (VeRA's shared projections)
    outside_model: tuple[str, ...] = ()
    # bare names (from ``to_keys``) PEFT stores with no prefix at all (prompt learning's ``prompt_embeddings``)
    top_level: tuple[str, ...] = ()
    # the prefix of the other keys; None: ``base_model.model.`` (prompt learning's heads: ``base_model.``)
    model_prefix: str | None = None


class PerSample(NamedTuple):
    """How a tuner runs a different adapter for each sample of one batch (PEFT's ``adapter_names=``).

    ``kind``: the name messages use (``"LoRA"``).  ``unsupported(model, params)``:
    why these params cannot run per sample, completing "it ..." (``None``: they can).
    ``stack(model, {name: params})``: the adapters prepared for per-sample use, an
    immutable value; pure and differentiable w.r.t. the params.  ``routes(model,
    stack, names)``: one call's routes, sample ``b`` running ``names[b]``
    (``"__base__"``: no adapter).  ``depends_on(model, params)``: tensors besides the
    params' own whose values a stack reads (DoRA's base weights), so a cached stack
    is rebuilt when they change.  ``routes`` also takes a ``LongTensor`` of positions (``-1``: no adapter).
    """

    kind: str
    unsupported: Callable[[nn.Module, TunerParams], str | None]
    stack: Callable[[nn.Module, Mapping[str, TunerParams]], Any]
    routes: Callable[[nn.Module, Any, Sequence[str] | torch.Tensor], Routes]
    depends_on: Callable[[nn.Module, TunerParams], Sequence[torch.Tensor]] = lambda model, params: ()


class ShardMergePlan(NamedTuple):
    """How a streaming merge changes a base checkpoint, key by key (see the ``plan_shard_merge`` hook).

    ``merges`` maps a base key to a pure function of its current tensor returning the merged tensor (float32;
    the caller rounds once to the output dtype); ``replacements`` maps a base key to a tensor stored with the
    adapter that replaces the base's (applied before a merge function of the same key).
    """

    merges: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
    replacements: Mapping[str, torch.Tensor]


class Training(NamedTuple):
    """What a shim training loop runs for a tuner besides forward and backward (AdaLoRA's, as PEFT's model does).

    ``loss(params, outputs)``: the outputs of a ``SwiftModel`` call with the tuner's loss term added (AdaLoRA:
    its orthogonal regulariser added to ``outputs.loss``, as PEFT's forward does), run for each active adapter.
    ``step_name``: the method a ``SwiftModel`` (and its wrapped model, PEFT's ``model.base_model``) offers for
    the step between ``optimizer.step()`` and ``zero_grad()`` (AdaLoRA: ``"update_and_allocate"``).
    ``init_state()``: the step's state before the first step.  ``step(params, grads, state, global_step)``:
    pure, ``(new params, new state)``.  ``saved(params, state)``: the adapter as ``save_pretrained`` writes it
    (AdaLoRA: only the allocated ranks, with ``rank_pattern``, as PEFT saves them).
    """

    loss: Callable[[TunerParams, Any], Any]
    step_name: str
    init_state: Callable[[], Any]
    step: Callable[[TunerParams, Mapping[str, torch.Tensor], Any, int], tuple[TunerParams, Any]]
    saved: Callable[[TunerParams, Any], TunerParams]


class Tuner(NamedTuple):
    """A tuner: its SWIFT type name, config class and pure functions."""

    swift_type: str
    config_cls: type
    init: Callable[[nn.Module, Any, torch.Generator, str], TunerParams]
    routes: Callable[[nn.Module, TunerParams, CallContext], Routes]
    validate: Callable[[nn.Module, TunerParams], None]
    # merge(model_or_weights, params, base) / unmerge(model_or_weights, params, merged): the first argument is the
    # nn.Module, or (only where merges_weights) a {name: tensor} weights mapping: merging is weight arithmetic
    merge: Callable[[Any, TunerParams, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    unmerge: Callable[[Any, TunerParams, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    # whether merge/unmerge accept a weights mapping in place of the model (False: functuner.merge asks for the model)
    merges_weights: bool = False
    needs_generator: Callable[[nn.Module, TunerParams], bool] = lambda model, params: False
    # -- optional hooks the disk layer (functuner.io) calls; defaults mean "nothing special" --
    # functuner names -> SWIFT's on-disk names (beyond modules_to_save, which io handles); config may be None
    to_swift_keys: Callable[[Mapping[str, torch.Tensor], Any, str], dict[str, torch.Tensor]] = _same_keys
    # SWIFT's on-disk names -> functuner names (inverse of to_swift_keys; CheckpointError for a foreign key)
    from_swift_keys: Callable[[Mapping[str, torch.Tensor], Any, str], dict[str, torch.Tensor]] = _same_keys
    # where the adapter name sits in this tuner's keys (adapter renaming, SWIFT's shared-file quirk)
    key_naming: KeyNaming = KeyNaming()
    # PEFT's format for this tuner; None means "no PEFT format" (writing one is refused before any file is written)
    peft: PeftFormat | None = None
    # check a config read from ``source`` against a model before any tensor is allocated (CheckpointError/TargetError)
    check_model: Callable[[nn.Module, Any, str], None] = _no_model_check
    # check tensors read from ``source`` (functuner names) against their own config, no model needed
    check_state: Callable[[Any, Mapping[str, torch.Tensor], str], None] = lambda config, state, source: None
    # streaming merge into a checkpoint read shard by shard: (tensors, config, adapter_name, {base key: shape},
    # fan_in_fan_out, source) -> ShardMergePlan; None means "no streaming merge" (functuner merge refuses it)
    plan_shard_merge: (
        Callable[
            [Mapping[str, torch.Tensor], Any, str, Mapping[str, tuple[int, ...]], bool, str],
            ShardMergePlan,
        ]
        | None
    ) = None
    # -- optional hooks the shim (functuner.shim) calls; defaults mean "nothing special" --
    # per-sample adapters (adapter_names=): a tuner's own fast path (LoRA's stacked factors); None: none of its own
    per_sample: PerSample | None = None
    # the general per-sample path (functuner.tuners.sub_batch: each adapter runs on the sub-batch of its samples):
    # (model, params) -> why these params cannot (completes "it ..."), None when they can; ``module_local`` for a
    # tuner whose slots all read only their own module's inputs and output. None: not supported per sample
    sub_batch: Callable[[nn.Module, TunerParams], str | None] | None = None
    # optimizer param groups of one adapter: (config, {key: trainable param}, defaults, is_decayed) -> groups, or None
    # for "no groups of its own" (its params then join the shim's decay / no-decay groups); LoRA+ uses it
    optimizer_groups: (
        Callable[
            [Any, Mapping[str, nn.Parameter], Mapping[str, Any], Callable[[torch.Tensor], bool]],
            list[dict[str, Any]] | None,
        ]
        | None
    ) = None
    # a new adapter combining adapters of this tuner (PEFT's add_weighted_adapter); None means "cannot be combined"
    combine: Callable[..., TunerParams] | None = None
    # base weights a freshly initialised adapter runs on instead of the model's own: (model, initial params) ->
    # {state key: new tensor}; LoRA's PiSSA/OLoRA/CorDA residual ``W - s B A``. Pure; the shim writes them into
    # the model when it creates (or loads) the adapter, as PEFT does; {} (default): the base stays as it is
    init_base_weights: Callable[[nn.Module, TunerParams], dict[str, torch.Tensor]] = lambda model, params: {}
    # an init that reads data recorded from the model's modules (functuner.shim.data_init); None: no such init
    data_init: DataInit | None = None
    # whether adding an adapter of this tuner freezes the base model's parameters (SWIFT's has_additional_modules);
    # False for a tuner that adds no tensors and leaves the model fully trainable (NEFTune)
    freezes_base: bool = True
    # a context ``SwiftModel.generate`` runs ``generate`` in while an adapter of this tuner is loaded (prompt
    # learning: calls take PEFT's generation semantics, as its ``prepare_inputs_for_generation``); None: nothing
    generation: Callable[[], AbstractContextManager[None]] | None = None
    # a loss term and a step between optimizer steps that the shim runs for this tuner (AdaLoRA's); None: nothing
    training: Training | None = None
    # a structural change the shim makes to the model in place before it creates an adapter of this tuner
    # (LLaMA-Pro: SWIFT's real layers inserted): (model, config, adapter_name) -> (the config the adapter is created
    # with, undo); the shim calls undo when creating the adapter fails. None: the model keeps its structure
    restructure: Callable[[nn.Module, Any, str], tuple[Any, Callable[[], None]]] | None = None
    # files of another library's layout that io reads when a folder has no adapter_model file (ms-swift's ReFT:
    # pyreft's intkey_*.bin): (glob, convert(config, {file name: tensors}, adapter_name, folder) -> functuner
    # names); io reads each file with torch's restricted loader only (functuner.io.tuner_files). None: none
    read_files: (
        tuple[str, Callable[[Any, Mapping[str, Mapping[str, torch.Tensor]], str, str], dict[str, torch.Tensor]]] | None
    ) = None
    # the reverse of read_files, for save_pretrained(..., safe_serialization=False) in SWIFT's layout (ms-swift's
    # ReFT .bin files): (config, functuner's tensors, adapter_name) -> {file name: state_dict}; io torch.saves each
    # inside the adapter's atomic write (functuner.io.tuner_files). None: adapter_model.bin, as for any tuner
    write_files: Callable[[Any, Mapping[str, torch.Tensor], str], dict[str, dict[str, torch.Tensor]]] | None = None
