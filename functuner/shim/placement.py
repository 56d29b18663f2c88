"""Where the shim's adapter tensors live: registered parameters, offloaded copies, and their bookkeeping.

Design note: SWIFT's interface expects adapter tensors to be ``nn.Parameter``s
*inside* the wrapped model (``named_parameters()`` shows
``...q_proj.lora_A.default.weight``), so ordinary optimizers and
``transformers.Trainer`` train them.  This module owns that placement: creating
adapters (:func:`add_adapters`, all tensors prepared and checked before the model
changes, rolled back on error), deleting them, and moving their tensors to host
memory or to a private disk cache and back (:func:`offload`, :func:`reload`:
the only file I/O of the shim outside checkpoints).  No tuner math: tensors come
from each tuner's ``init``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.params import TunerParams
from ..core.routing import set_default_routes
from ..core.targets import INTERNAL_MARKER
from ..errors import AdapterNameError, ParamsMismatchError
from ..functional import bind_routes
from ..tuners import tuner_for
from . import live
from .state import AdapterEntry, ShimState
from .training import attach

__all__ = [
    "add_adapters",
    "delete_adapter",
    "filled",
    "global_generator",
    "offload",
    "path_modules",
    "register",
    "reload",
    "set_registered",
    "unregister",
]


class _Holder(nn.Module):
    """Holds tuner tensors so they appear under SWIFT's parameter names.

    It is not a layer, but a holder placed inside an ``nn.Sequential`` (SWIFT's Side
    tuner on a Sequential backbone) is called by the container with the running
    activation: it then passes that through unchanged, so the container computes
    exactly what it did before the holder was added.  It carries :data:`functuner.core.targets.INTERNAL_MARKER`, so target matching and
    :func:`~functuner.core.targets.own_named_parameters` (LLaMA-Pro's copies of a layer)
    never take the shim's placed tensors for a layer's own.  Its ``_parameters`` is a
    :class:`~.live.WatchedParams`: when FSDP2, ``load_state_dict(assign=True)`` or
    ``to_empty()`` put another object there, the shim's routes follow (:mod:`.live`).
    """

    def __init__(self) -> None:
        super().__init__()
        live.watch(self)

    def __setstate__(self, state: dict[str, Any]) -> None:  # a copy or unpickled holder stays watched
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        live.watch(self)

    def train(self, mode: bool = True) -> _Holder:
        """Holders carry no mode of their own; an unchanged holder without sub-holders is skipped (so ``eval()``
        does not grow with the number of adapters loaded: one holder per adapter sits below each shared one)."""
        self.training = mode
        for child in self._modules.values():
            if child is not None and (child.training != mode or child._modules):
                child.train(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs:  # as nn.Sequential calls its children: identity
            return args[0]
        raise RuntimeError("a functuner parameter holder is not a layer; only nn.Sequential passes through it")


setattr(_Holder, INTERNAL_MARKER, True)


def global_generator() -> torch.Generator:
    """A generator seeded from torch's global RNG: the shim's init follows ``torch.manual_seed`` like SWIFT/PEFT."""
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# adapters in, adapters out
# ---------------------------------------------------------------------------
def add_adapters(
    state: ShimState, configs: Mapping[str, Any], loaded: Mapping[str, Mapping[str, torch.Tensor]], trainable: bool
) -> None:
    """Create (and optionally fill) adapters: all tensors prepared and checked before the model changes."""
    model = state.model
    for name in configs:
        if name in state.adapters:
            raise AdapterNameError(f"adapter {name!r} already exists; pass {{new_name: config}} to add another")
    prepared: list[tuple[str, TunerParams]] = []
    base_updates: dict[str, torch.Tensor] = {}  # residual base weights (PiSSA/OLoRA/CorDA), written as PEFT does
    for name, cfg in configs.items():
        gen = torch.Generator().manual_seed(0) if name in loaded else global_generator()
        params = tuner_for(cfg).init(model, cfg, gen, name)
        base_updates.update(tuner_for(cfg).init_base_weights(model, params))
        if name in loaded:
            params = filled(params, loaded[name])
        prepared.append((name, params))
    # the model's own parameters are looked up by path (no walk over every parameter: loading must not grow with
    # the adapters already loaded); only the ones this call may change get their flags recorded
    base_names = {
        k: p for k in {*base_updates, *(k for _, ps in prepared for k in ps)} if (p := _param_at(model, k)) is not None
    }
    was_frozen = bool(getattr(model, "_functuner_frozen", False))
    freeze = not was_frozen and any(tuner_for(c).freezes_base for c in configs.values())  # NEFTune alone: as SWIFT
    flags = [(p, p.requires_grad) for p in (model.parameters() if freeze else base_names.values())]
    registered: list[str] = []
    overwritten: dict[str, torch.Tensor] = {}
    added: list[str] = []
    try:
        if freeze:
            for p in model.parameters():
                p.requires_grad_(False)
            model.__dict__["_functuner_frozen"] = True
        for key, value in base_updates.items():
            overwritten.setdefault(key, base_names[key].detach().clone())
            with torch.no_grad():
                base_names[key].copy_(value)
        for name, params in prepared:
            tensors: dict[str, nn.Parameter] = {}
            shared: set[str] = set()
            for key, value in params.items():
                if key in base_names:  # a trainable bias: the model's own parameter (as SWIFT/PEFT train it)
                    tensors[key] = base_names[key]
                    shared.add(key)
                    if name in loaded:
                        overwritten.setdefault(key, base_names[key].detach().clone())
                        with torch.no_grad():
                            base_names[key].copy_(value)
                else:
                    tensors[key] = register(model, key, value)
                    registered.append(key)
            adapter = AdapterEntry(name, params.config, tensors, frozenset(shared), ())
            adapter.owners = live.owners_of(model, tensors)
            adapter.seen = live.epoch()
            own = adapter.params
            routes = bind_routes(model, own)
            state.seed_routes(own, routes)
            adapter.modules = tuple(dict.fromkeys([*routes.forward, *routes.pre]))
            set_default_routes(list(adapter.modules), state.provider)
            for p in tensors.values():
                p.requires_grad_(trainable)
            state.adapters[name] = adapter
            added.append(name)
            state.active.add(name)
            ts = state.thread_state(create=False)
            if ts is not None:
                ts.active.add(name)
    except BaseException:  # leave the model as it was
        for key in reversed(registered):
            unregister(model, key)
        with torch.no_grad():
            for key, old in overwritten.items():
                base_names[key].copy_(old)
        for p, flag in flags:
            p.requires_grad_(flag)
        if not was_frozen:
            model.__dict__.pop("_functuner_frozen", None)
        for name in added:
            state.adapters.pop(name, None)
            state.active.discard(name)
        state.refresh()
        raise
    attach(state, added)  # a tuner's training step as a method of the model (AdaLoRA's update_and_allocate)
    state.refresh()


def delete_adapter(state: ShimState, name: str) -> None:
    """Remove adapter ``name``: its registered parameters, its offload file, its activation everywhere."""
    state.mixed = None
    adapter = state.adapters.pop(name)
    for key in adapter.tensors:
        if key not in adapter.shared:
            unregister(state.model, key)
    if adapter.offload_file:
        os.unlink(adapter.offload_file)
    state.active.discard(name)
    for ts in list(state.thread_states):
        ts.active.discard(name)
    state.refresh()


# ---------------------------------------------------------------------------
# offloading (deactivate_adapter(offload=...)) and reloading
# ---------------------------------------------------------------------------
def offload(state: ShimState, adapter: AdapterEntry, where: str) -> None:
    """Move ``adapter``'s own tensors to host memory (``'cpu'``) or to a private disk cache (``'meta'``)."""
    if adapter.offload is not None:
        return
    state.mixed = None
    own = {k: p for k, p in adapter.tensors.items() if k not in adapter.shared}
    adapter.devices = {k: p.device for k, p in own.items()}
    if where == "meta":
        if state.offload_dir is None:
            state.offload_dir = tempfile.TemporaryDirectory(prefix="functuner-offload-")
        path = os.path.join(state.offload_dir.name, f"{adapter.name}.safetensors")
        save_file({k: p.detach().to("cpu").contiguous() for k, p in own.items()}, path)
        adapter.offload_file = path
    for k, p in own.items():
        p.grad = None
        if where == "cpu":
            p.data = p.data.to("cpu")
        else:
            # torch cannot re-point a parameter at a meta tensor: the registered parameter becomes a meta
            # one (so named_parameters shows where the data is) and the live object keeps an empty placeholder
            set_registered(state.model, k, nn.Parameter(torch.empty_like(p.data, device="meta"), p.requires_grad))
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    adapter.offload = where


def reload(state: ShimState, adapter: AdapterEntry) -> None:
    """Bring an offloaded adapter's tensors back, bit-identical, on the devices they had (no-op if not offloaded)."""
    if adapter.offload is None:
        return
    if adapter.offload == "meta":
        assert adapter.offload_file is not None
        values = load_file(adapter.offload_file, device="cpu")  # the file stays until the adapter is deleted
    else:
        values = {k: adapter.tensors[k].data for k in adapter.devices}
    for k, dev in adapter.devices.items():
        adapter.tensors[k].data = values[k].to(dev)
        if adapter.offload == "meta":
            set_registered(state.model, k, adapter.tensors[k])
    adapter.offload = None


# ---------------------------------------------------------------------------
# parameter placement (names only)
# ---------------------------------------------------------------------------
def _param_at(model: nn.Module, key: str) -> nn.Parameter | None:
    """The parameter registered at ``key`` (as ``named_parameters`` names it), or ``None``: a walk down one path."""
    node: nn.Module | None = model
    path, _, leaf = key.rpartition(".")
    for part in path.split(".") if path else ():
        node = node._modules.get(part) if node is not None else None
    return node._parameters.get(leaf) if node is not None else None


def path_modules(model: nn.Module, keys: Iterable[str]) -> list[nn.Module]:
    """The existing modules on the paths of ``keys`` (what placing tensors there may change), each once."""
    out: dict[nn.Module, None] = {model: None}
    for key in keys:
        node: nn.Module | None = model
        for part in key.split(".")[:-1]:
            node = node._modules.get(part) if node is not None else None
            if node is None:
                break
            out[node] = None
    return list(out)


def _owner_and_rest(model: nn.Module, key: str) -> tuple[nn.Module, list[str]]:
    """The deepest existing non-holder module on ``key``'s path, and the remaining path parts."""
    parts = key.split(".")
    owner, depth = model, 0
    for i, part in enumerate(parts[:-1]):
        child = owner._modules.get(part)
        if child is None or isinstance(child, _Holder):
            break
        owner, depth = child, i + 1
    return owner, parts[depth:]


def register(model: nn.Module, key: str, value: torch.Tensor) -> nn.Parameter:
    """Register ``value`` as a Parameter at ``key`` inside ``model`` (holder modules for missing path parts)."""
    owner, rest = _owner_and_rest(model, key)
    node = owner
    for part in rest[:-1]:
        child = node._modules.get(part)
        if child is None and (part in node._parameters or part in node._buffers or part in node.__dict__):
            raise ParamsMismatchError(f"cannot place {key!r}: the model already has something named {part!r} there")
        if child is None:
            child = _Holder()
            node.add_module(part, child)
        elif not isinstance(child, _Holder):
            raise ParamsMismatchError(f"cannot place {key!r}: {part!r} is an existing {type(child).__name__}")
        node = child
    leaf = rest[-1]
    if leaf in node._parameters or leaf in node._buffers or (leaf in node._modules):
        raise ParamsMismatchError(f"cannot place {key!r}: the model already has something named {leaf!r} there")
    p = nn.Parameter(value.detach().clone(), requires_grad=True)
    node.register_parameter(leaf, p)
    return p


def set_registered(model: nn.Module, key: str, value: nn.Parameter) -> None:
    """Point the registered parameter at ``key`` to ``value`` (offload bookkeeping)."""
    owner_path, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    owner._parameters[leaf] = value


def unregister(model: nn.Module, key: str) -> None:
    """Remove the Parameter at ``key`` and prune holder modules left empty."""
    parts = key.split(".")
    chain: list[nn.Module] = [model]
    for part in parts[:-1]:
        child = chain[-1]._modules[part]
        assert child is not None
        chain.append(child)
    del chain[-1]._parameters[parts[-1]]
    for i in range(len(chain) - 1, 0, -1):
        node = chain[i]
        if isinstance(node, _Holder) and not node._parameters and not node._modules:
            del chain[i - 1]._modules[parts[i - 1]]
        else:
            break


def filled(params: TunerParams, values: Mapping[str, torch.Tensor]) -> TunerParams:
    """``params`` with every tensor replaced by ``values`` (same keys and shapes required; dtype/device of params)."""
    missing = sorted(set(params) - set(values))
    unexpected = sorted(set(values) - set(params))
    if missing or unexpected:
        raise ParamsMismatchError(
            f"adapter {params.adapter_name!r}: loaded tensors do not match the config; missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    bad = [
        f"{k}: {tuple(values[k].shape)} vs {tuple(params[k].shape)}"
        for k in params
        if tuple(values[k].shape) != tuple(params[k].shape)
    ]
    if bad:
        raise ParamsMismatchError(f"adapter {params.adapter_name!r}: shape mismatch (loaded vs model): {bad[:8]}")
    kinds = [
        f"{k}: {values[k].dtype} for a {params[k].dtype} parameter"
        for k in params
        if params[k].is_floating_point() and not values[k].is_floating_point()
    ]
    if kinds:  # an integer or bool tensor would be cast silently into nonsense weights
        raise ParamsMismatchError(f"adapter {params.adapter_name!r}: wrong dtype (loaded vs model): {kinds[:8]}")
    return params.replace({k: values[k].to(device=params[k].device, dtype=params[k].dtype) for k in params})
