"""Data-driven inits in the shim: PEFT's ``initialize_lora_eva_weights`` and ``preprocess_corda``, by the same names.

EVA and CorDA initialise LoRA from the inputs each targeted layer sees on
calibration data.  The functional API takes that data as tensors
(:func:`functuner.lora_init`); these two functions run the model for the caller
the way PEFT does and then set the adapter up in a :class:`SwiftModel`:

* EVA, as in PEFT: ``sm = Swift.prepare_model(model, LoRAConfig(init_lora_weights="eva", ...))``
  (``A`` drawn as usual, ``B`` zero), then ``initialize_lora_eva_weights(sm, dataloader)``:
  one pass over ``dataloader`` (``forward_fn(sm, batch)``) records every targeted
  layer's inputs (through ``prepare_model_inputs_fn`` / ``prepare_layer_inputs_fn``,
  PEFT's defaults mask padding and ignored labels), and the adapter is replaced by
  the EVA one (ranks redistributed, so its config changes as PEFT's does).
* CorDA: PEFT writes the covariances onto the modules in ``preprocess_corda`` and
  reads them in ``get_peft_model``; functuner keeps nothing on the modules, so
  ``preprocess_corda(model, lora_config, run_model)`` does both steps and returns
  the :class:`SwiftModel` (its base weights hold the residual, as PEFT's).

Differences from PEFT: EVA computes the exact PCA of everything the one pass
recorded (PEFT's incremental PCA cycles through the loader until it converges
to it); the recording hooks are removed in a ``finally``; nothing changes in the
model or the adapter unless the whole init succeeded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConfigError
from ..tuners import tuner_for
from . import placement
from .swift import SwiftModel

__all__ = [
    "forward_fn_dict",
    "initialize_lora_eva_weights",
    "prepare_layer_inputs_fn_language_modeling",
    "prepare_model_inputs_fn_language_modeling",
    "preprocess_corda",
]


def forward_fn_dict(model: Any, inputs: Mapping[str, Any]) -> Any:
    """PEFT's default ``forward_fn``: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, Any], config: Any) -> torch.Tensor:
    """PEFT's default: the ``(batch, position)`` indices of real tokens (attention mask; labels not ignored)."""
    if not isinstance(model_input, Mapping):
        raise TypeError("prepare_model_inputs_fn_language_modeling needs dict batches (input_ids, attention_mask...)")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = getattr(config, "eva_config", None) or {}
    if eva.get("use_label_mask", True) and "labels" in model_input:  # EvaConfig's defaults, as PEFT
        mask = torch.logical_and(mask, model_input["labels"] != eva.get("label_mask_value", -100))
    return cast(torch.Tensor, mask.nonzero())


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """PEFT's default: the layer's input rows at the indices ``prepare_model_inputs_fn`` returned."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(
            f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer {layer_name!r}; pass"
            " a prepare_layer_inputs_fn of your own"
        )
    return layer_input[model_input.T.unbind()]


def _first_tensor(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return cast(torch.Tensor, x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x)


def _record(
    model: nn.Module,
    names: list[str],
    run: Callable[[Callable[[Any], None]], None],
    prepare: Callable[..., torch.Tensor] | Mapping[str, Callable[..., torch.Tensor]] | None,
) -> dict[str, list[torch.Tensor]]:
    """Each named module's inputs over ``run(set_model_input)`` (forward hooks, removed in a ``finally``)."""
    if isinstance(prepare, Mapping):
        unknown = sorted(set(prepare) - set(names))
        if unknown:
            raise ConfigError(f"prepare_layer_inputs_fn names modules LoRA does not target: {unknown[:4]}")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    current: list[Any] = [None]

    def hook_for(name: str) -> Callable[..., None]:
        fn = prepare.get(name, _first_tensor) if isinstance(prepare, Mapping) else prepare or _first_tensor

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen[name].append(fn(args, current[0], name).detach().float())

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            run(lambda value: current.__setitem__(0, value))
    finally:
        for h in handles:
            h.remove()
    return seen


def _hook(config: Any, kind: str, what: str) -> Any:
    hook = tuner_for(config).data_init
    if hook is None or hook.needs(config) != kind:
        want = "'eva'" if kind == "activations" else "'corda'"
        raise ConfigError(f"{what} needs a LoRA config with init_lora_weights={want}, got {config!r}")
    return hook


def _install(state: Any, name: str, params: Any, base_weights: Mapping[str, torch.Tensor], trainable: bool) -> None:
    """Add ``params`` as adapter ``name`` and write ``base_weights`` into the model, all or nothing."""
    model = state.model
    base = dict(model.named_parameters(remove_duplicate=False))
    old = {k: base[k].detach().clone() for k in base_weights}
    # the adapter's tensors are ready: its config is created with the plain init (which needs no data) and then
    # carries its own (EVA/CorDA, with CorDA's base fingerprints), as PEFT's saved config does
    plain = dataclasses.replace(params.config, init_lora_weights=True, base_fingerprint=None)
    try:
        with torch.no_grad():
            for k, v in base_weights.items():
                base[k].copy_(v)
        placement.add_adapters(state, {name: plain}, {name: dict(params)}, trainable=trainable)
    except BaseException:
        with torch.no_grad():
            for k, v in old.items():
                base[k].copy_(v)
        raise
    state.adapters[name].config = params.config
    state.refresh()


def initialize_lora_eva_weights(
    model: SwiftModel,
    dataloader: Iterable[Any],
    forward_fn: Callable[[Any, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, Any], Any] | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Any = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    show_progress_bar: bool = False,
) -> SwiftModel:
    """PEFT's ``initialize_lora_eva_weights`` for a :class:`SwiftModel` whose adapter has ``init_lora_weights="eva"``.

    Runs ``forward_fn(model, batch)`` for each batch of ``dataloader`` once (in eval mode, without gradients),
    records each targeted layer's ``prepare_layer_inputs_fn(layer_input, prepare_model_inputs_fn(batch, config),
    layer_name)`` (a dict ``{layer name: fn}`` gives layers their own), and replaces the adapter by its EVA
    init (new ``rank_pattern``/``alpha_pattern``/``target_modules`` in its config, as PEFT rewrites them).
    ``show_progress_bar`` is accepted for PEFT's signature; there is no bar.  Returns ``model``.
    """
    del show_progress_bar
    state = model._state
    adapter = state.require(adapter_name)
    hook = _hook(adapter.config, "activations", "initialize_lora_eva_weights")
    if len(state.active_set()) > 1:
        raise ConfigError("initialize_lora_eva_weights works with a single active adapter (as PEFT)")
    names = hook.targets(state.model, adapter.config)
    run_forward = forward_fn or (lambda m, batch: m(batch))

    def run(set_input: Callable[[Any], None]) -> None:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            for batch in dataloader:
                set_input(prepare_model_inputs_fn(batch, adapter.config) if prepare_model_inputs_fn else batch)
                run_forward(model, batch)
        finally:
            for m, mode in modes:
                m.training = mode

    inputs = _record(state.model, names, run, prepare_layer_inputs_fn)
    params, base_weights = hook.init(state.model, adapter.config, placement.global_generator(), adapter_name, inputs)
    trainable = any(p.requires_grad for k, p in adapter.tensors.items() if k not in adapter.shared)
    placement.delete_adapter(state, adapter_name)
    try:
        _install(state, adapter_name, params, base_weights, trainable)
    except BaseException:  # put the old adapter back
        placement.add_adapters(state, {adapter_name: adapter.config}, {adapter_name: dict(adapter.params)}, trainable)
        raise
    return model


def preprocess_corda(
    model: nn.Module,
    lora_config: Any,
    run_model: Callable[[], Any],
    hooked_model: nn.Module | None = None,
    adapter_name: str = "default",
) -> SwiftModel:
    """PEFT's ``preprocess_corda`` followed by ``get_peft_model``, in one call that returns the :class:`SwiftModel`.

    ``run_model()`` runs ``hooked_model`` (default: ``model``) on the calibration data; each call's input to a
    targeted layer enters its covariance as in PEFT (each call's ``(tokens, in)`` input divided by its maximum;
    run batches of one sequence).  The adapter's base weights become the residual ``W - s B A`` (as PEFT's).
    """
    hook = _hook(lora_config, "covariances", "preprocess_corda")
    target = model.model if isinstance(model, SwiftModel) else model
    hooked = target if hooked_model is None else hooked_model
    inputs = _record(hooked, hook.targets(target, lora_config), lambda set_input: run_model(), None)
    params, base_weights = hook.init(target, lora_config, placement.global_generator(), adapter_name, inputs)
    sm = model if isinstance(model, SwiftModel) else SwiftModel(model, {})
    _install(sm._state, adapter_name, params, base_weights, trainable=True)
    return sm
