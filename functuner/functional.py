"""The functional API: ``init``, ``apply``, ``merge``, ``unmerge``, dispatching on the config's tuner.

Every function here is pure with respect to tensors: it never writes to the
model's parameters or buffers, nor to the params it is given.  The only
structural effect is that :func:`apply` gives each adapted module a dormant
*slot* the first time (see :mod:`functuner.routing`): a hook that does nothing
outside an ``apply`` call, leaves ``state_dict`` and module names unchanged, and
is removed by :func:`functuner.routing.remove_slots`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .core.params import TunerParams
from .core.routing import Routes, call_routed, slot_epoch
from .errors import ConfigError, ParamsMismatchError
from .tuners import CallContext, tuner_for

__all__ = ["apply", "bind_routes", "guard_static", "init", "merge", "unmerge", "as_params_list"]

ParamsLike = TunerParams | Sequence[TunerParams] | Mapping[str, TunerParams]


def _generator(seed_or_generator: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    if isinstance(seed_or_generator, int) and not isinstance(seed_or_generator, bool):
        return torch.Generator().manual_seed(seed_or_generator)
    raise TypeError(
        "init needs explicit randomness: pass generator=<int seed> or a torch.Generator (functuner never uses"
        f" the global RNG), got {seed_or_generator!r}"
    )


def init(
    model: nn.Module, config: Any, *, generator: int | torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh params for ``config``'s tuner on ``model``.

    ``generator`` is an int seed or a ``torch.Generator`` (the only randomness
    used).  Pure: ``model`` is only read.  Raises
    :class:`~functuner.errors.TargetError` when the targets match nothing,
    :class:`~functuner.errors.ConfigError` for invalid fields, and
    :class:`~functuner.errors.UnsupportedModuleError` for a layer type the tuner
    cannot adapt.  ``config`` may also be a ``peft.PeftConfig`` of a tuner
    functuner implements (LoRA, IA3, LoHa, LoKr, VeRA...): it is converted
    losslessly (a field functuner cannot express raises ``ConfigError``).
    """
    from .core.naming import check_adapter_name

    check_adapter_name(adapter_name)
    try:
        tuner = tuner_for(config)
    except ConfigError as e:  # PEFT's own config object of a tuner functuner implements: converted losslessly
        from .tuners.config_json import config_from_peft

        config = config_from_peft(config, e)
        tuner = tuner_for(config)
    return tuner.init(model, config, _generator(generator), adapter_name)


def as_params_list(params: ParamsLike) -> list[TunerParams]:
    """Normalise one params, a sequence of them, or a ``{name: params}`` mapping to a list."""
    if isinstance(params, TunerParams):
        return [params]
    if isinstance(params, Mapping):
        items: Iterable[Any] = params.values()
    elif isinstance(params, Sequence):
        items = params
    else:
        raise TypeError(f"expected TunerParams, a sequence or a mapping of them, got {type(params).__name__}")
    out = list(items)
    for p in out:
        if not isinstance(p, TunerParams):
            raise TypeError(f"expected TunerParams, got {type(p).__name__}")
    return out


_STATIC_SEEN: dict[Any, None] = {}


def guard_static(plist: Sequence[TunerParams]) -> None:
    """Under ``torch.compile``: make the compiled graph depend on each params' static data.

    Dynamo does not guard on a pytree node's aux data (our config and adapter
    name), so a graph traced for one config would silently run for another of
    the same shapes (e.g. a different ``lora_alpha``).  Looking up the config's
    identity and the adapter name here installs guards on them: a different
    config object recompiles instead.  A no-op outside tracing.
    """
    for p in plist:
        _STATIC_SEEN.get(id(p.config))
        _STATIC_SEEN.get(p.adapter_name)


# Routes of params values seen before, per model.  A TunerParams never changes, so the routes built for it on
# one model stay right as long as the params live and no slot was removed since (routing.slot_epoch): an
# inference loop, a server switching between loaded adapters, or the shim calling again with the same adapter
# set pays a dictionary lookup instead of a route build.  Entries hold the params weakly and go away with
# them (a training loop makes new params every step; its routes are freed with those params).  Calls with a
# generator (training with dropout) are not cached: their routes hold the generator.
_RouteEntry = tuple[tuple["weakref.ref[TunerParams]", ...], int, Routes]
_ROUTES_SEEN: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], _RouteEntry]] = weakref.WeakKeyDictionary()
_ROUTES_SEEN_MAX = 256  # per model; the oldest entry goes first


def _cached_routes(model: nn.Module, plist: Sequence[TunerParams]) -> Routes | None:
    per_model = _ROUTES_SEEN.get(model)
    entry = per_model.get(tuple(map(id, plist))) if per_model is not None else None
    if entry is None or entry[1] != slot_epoch():
        return None
    refs = entry[0]
    for ref, p in zip(refs, plist, strict=True):
        if ref() is not p:
            return None
    return entry[2]


def _remember_routes(model: nn.Module, plist: Sequence[TunerParams], routes: Routes) -> None:
    key = tuple(map(id, plist))
    per_model = _ROUTES_SEEN.get(model)
    if per_model is None:
        per_model = _ROUTES_SEEN.setdefault(model, {})
    model_ref = weakref.ref(model)

    def forget(_: Any, seen: Any = _ROUTES_SEEN) -> None:  # a params value died: drop its entry, never a newer one
        owner = model_ref()  # (``seen`` bound now: at interpreter exit the module's globals may be gone)
        d = seen.get(owner) if owner is not None else None
        if d is not None and (e := d.get(key)) is not None and e[0] is refs:
            d.pop(key, None)

    refs = tuple(weakref.ref(p, forget) for p in plist)
    if len(per_model) >= _ROUTES_SEEN_MAX:
        per_model.pop(next(iter(per_model)), None)
    per_model[key] = (refs, slot_epoch(), routes)


def bind_routes(model: nn.Module, params: ParamsLike, generator: torch.Generator | None = None) -> Routes:
    """The routes that run ``params`` on ``model`` (validated; slots installed). Used by :func:`apply` and the shim.

    Without a generator, the routes of a params value already bound to ``model`` are reused (see
    ``_ROUTES_SEEN``): the same value is the same routes.
    """
    plist = as_params_list(params)
    cache = generator is None and not torch.compiler.is_compiling()
    if cache:
        hit = _cached_routes(model, plist)
        if hit is not None:
            return hit
    routes = _build_routes(model, plist, generator)
    if cache:
        _remember_routes(model, plist, routes)
    return routes


def _build_routes(model: nn.Module, plist: Sequence[TunerParams], generator: torch.Generator | None) -> Routes:
    ctx = CallContext(generator=generator)
    fwd: dict[nn.Module, list[Any]] = {}
    pre: dict[nn.Module, list[Any]] = {}
    for p in plist:
        r = tuner_for(p.config).routes(model, p, ctx)
        for m, fns in r.forward.items():
            fwd.setdefault(m, []).extend(fns)
        for m, pre_fns in r.pre.items():
            pre.setdefault(m, []).extend(pre_fns)
    return Routes(forward=fwd, pre=pre)


def apply(
    model: nn.Module,
    params: ParamsLike,
    args: Any = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Any:
    """Run ``model(*args, **kwargs)`` with the tuner(s) in ``params`` applied; return its output.

    Mirrors ``torch.func.functional_call(module, params, args, kwargs)``:
    ``args`` is a tuple (a single tensor is accepted), ``kwargs`` a dict.
    ``params`` is one :class:`TunerParams`, a sequence or a ``{name: params}``
    mapping; several are applied together (their effects add up, in order).

    Purity and isolation: nothing is written to the model or to ``params``; each
    call's params reach the modules through a context variable, so two threads
    (or asyncio tasks) calling ``apply`` on one model with different params each
    get their own result.  Works under ``torch.func.grad``/``vmap`` and
    ``torch.compile`` (see the docs).

    ``generator`` drives random ops such as LoRA dropout when the model is in
    training mode; it is required then (functuner never draws from the global
    RNG in the functional API).
    """
    if not isinstance(args, tuple):
        args = (args,)
    plist = as_params_list(params)
    if torch.compiler.is_compiling():
        guard_static(plist)
    if generator is None:
        for p in plist:
            if tuner_for(p.config).needs_generator(model, p):
                raise ConfigError(
                    f"adapter {p.adapter_name!r} draws random numbers in training mode (e.g. lora_dropout="
                    f"{getattr(p.config, 'lora_dropout', '?')}): pass apply(..., generator=torch.Generator()"
                    ".manual_seed(...)), or call model.eval()"
                )
    if model.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        _check_activation_checkpointing(model)
    return call_routed(bind_routes(model, plist, generator), model, *args, **dict(kwargs or {}))


def _check_activation_checkpointing(model: nn.Module) -> None:
    """Refuse transformers' activation checkpointing unless it carries the call's routes into the recomputation.

    Without :func:`functuner.routing.checkpoint_context_fn` the backward pass
    recomputes blocks with no tuner applied: torch then fails on a saved-tensor
    mismatch (non-reentrant) or, worse, the tuner params silently get no
    gradient (reentrant).
    """
    from .core.routing import checkpoint_context_fn

    for m in model.modules():  # hot path (every training call): names are looked up only on failure
        if getattr(m, "gradient_checkpointing", False) is not True:
            continue
        fn = getattr(m, "_gradient_checkpointing_func", None)
        keywords = getattr(fn, "keywords", None) or {}
        if keywords.get("context_fn") is not checkpoint_context_fn or keywords.get("use_reentrant", True):
            name = next(n for n, x in model.named_modules() if x is m)
            raise ConfigError(
                f"module {name or type(model).__name__!r} uses activation checkpointing without functuner's"
                " context_fn, so the backward pass would recompute it without the adapter; enable it with"
                " functuner.gradient_checkpointing_enable(model) (non-reentrant, carries each call's params)"
            )
        return


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    return state


def _weights_and_model(
    model_or_weights: nn.Module | Mapping[str, torch.Tensor], what: str
) -> tuple[nn.Module | Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None]:
    """``(what tuners get as the model, the weights mapping or None)``; ConfigError for anything else."""
    if isinstance(model_or_weights, nn.Module):
        return model_or_weights, None
    if isinstance(model_or_weights, Mapping):
        return model_or_weights, model_or_weights
    raise ConfigError(
        f"functuner.{what}: expected an nn.Module or a {{name: tensor}} weights mapping as the first argument,"
        f" got {type(model_or_weights).__name__}"
    )


def _needs_model(t: Any, what: str) -> ConfigError:
    return ConfigError(
        f"functuner.{what}: {t.swift_type} cannot {what} a weights mapping (its {what} reads the modules);"
        f" pass the model: functuner.{what}(model, params, ...)"
    )


def merge(
    model_or_weights: nn.Module | Mapping[str, torch.Tensor],
    params: ParamsLike,
    base: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Base weights with every adapter in ``params`` folded in (applied in order).

    ``model_or_weights`` is the model, or just its weights as a ``{name: tensor}``
    mapping (a ``state_dict``, a safetensors file's tensors): merging is weight
    arithmetic.  LoRA finds each layer's kind from the params and the weight
    shapes (a square 2-D weight is a Linear unless the config says
    ``fan_in_fan_out=True``, as for GPT-2's ``Conv1D``); tuners whose merge
    reads the modules raise :class:`~functuner.errors.ConfigError` asking for
    the model.  Both forms give bitwise the same weights.

    Returns a new ``{name: tensor}`` dict covering ``base`` (default: the
    model's parameters and buffers, tied weights under each name, or the
    mapping itself); only merged entries are new tensors.  Feed it to
    ``torch.func.functional_call`` or ``model.load_state_dict``.  Pure: neither
    the model nor ``base`` changes.  Each delta is computed in fp32 and rounded
    once to the weight's dtype.
    """
    model, weights = _weights_and_model(model_or_weights, "merge")
    if weights is not None and base is not None:
        raise ConfigError("functuner.merge: got a weights mapping and base=; pass the weights once")
    state: Mapping[str, torch.Tensor]
    if isinstance(model, nn.Module):
        state = _state(model) if base is None else base
    else:
        state = model
    original = state
    for p in as_params_list(params):
        t = tuner_for(p.config)
        if t.merge is None:
            raise ConfigError(f"{t.swift_type} has no merged form; keep it as an adapter")
        if weights is not None and not t.merges_weights:
            raise _needs_model(t, "merge")
        if state is not original and "unmerged" in (getattr(t.merge, "__kwdefaults__", None) or {}):
            # weight-dependent merges (DoRA's norm) must see the weights before earlier adapters were folded in
            merge_with_unmerged: Any = t.merge  # the Tuner field's type does not name this optional keyword
            state = merge_with_unmerged(model, p, state, unmerged=original)
        else:
            state = t.merge(model, p, state)
    return dict(state)


def unmerge(
    model_or_weights: nn.Module | Mapping[str, torch.Tensor],
    params: ParamsLike,
    merged: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`merge` (adapters removed in reverse order). Pure.

    ``model_or_weights`` as in :func:`merge`; with a weights mapping,
    ``merged`` defaults to that mapping (the merged weights).  Weight
    arithmetic can only restore the originals up to one rounding of the dtype;
    when you have the original weights, use them (that is exact).
    """
    model, weights = _weights_and_model(model_or_weights, "unmerge")
    if weights is not None and merged is not None:
        raise ConfigError("functuner.unmerge: got a weights mapping and merged=; pass the merged weights once")
    state: Mapping[str, torch.Tensor]
    if merged is not None:
        state = merged
    elif isinstance(model, Mapping):
        state = model
    else:
        raise ConfigError("functuner.unmerge(model, params, merged): pass the merged weights")
    for p in reversed(as_params_list(params)):
        t = tuner_for(p.config)
        if t.unmerge is None:
            raise ConfigError(f"{t.swift_type} has no unmerge")
        if weights is not None and not t.merges_weights:
            raise _needs_model(t, "unmerge")
        state = t.unmerge(model, p, state)
    return dict(state)


def validate(model: nn.Module, params: ParamsLike) -> None:
    """Raise :class:`~functuner.errors.ParamsMismatchError` if any params do not fit ``model``."""
    for p in as_params_list(params):
        try:
            tuner_for(p.config).validate(model, p)
        except ParamsMismatchError:
            raise
