"""The SWIFT-compatible stateful shim: ``Swift``, ``SwiftModel``, ``SwiftConfig``.

Switching from ModelScope SWIFT is one import::

    from functuner import Swift, SwiftModel, LoRAConfig

The shim is thin.  It *holds* state and calls the functional core for
everything else:

* each adapter's tensors, as ``nn.Parameter``s registered on small holder
  modules inside the wrapped model, so ``named_parameters()`` shows SWIFT's
  names (``base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight``)
  and ordinary optimizers / ``transformers.Trainer`` train them;
* which adapters are active (globally, or per thread with ``USE_UNIQUE_THREAD=0``);
* merged state (the original weight ``Parameter`` objects, swapped back on unmerge).

The forward goes through the core's slots: the shim installs a default routes
provider on every adapted module (:func:`functuner.routing.set_default_routes`)
returning routes built by :func:`functuner.functional.bind_routes` from the active
adapters, so ``model.generate()``, direct calls of the inner model and
gradient-checkpoint recomputation all see the active adapters.  Tuner math
lives in the tuners, key renaming in :mod:`functuner.keys`, disk I/O in
:mod:`functuner.checkpoint`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from inspect import Parameter, Signature, signature
from pathlib import Path
from types import MethodType
from typing import Any, NamedTuple, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..core.hub import resolve_model_dir
from ..core.naming import check_adapter_name
from ..core.params import TunerParams
from ..core.routing import Routes, routed, set_default_routes
from ..errors import AdapterNameError, CheckpointError, ConfigError, FunctunerError, ParamsMismatchError
from ..functional import bind_routes
from ..functional import merge as core_merge
from ..io import checkpoint as ckpt
from ..io import keys
from ..tuners import tuner_for
from ..tuners.base import TunerConfig
from ..tuners.lora.mixed import BASE, AdapterStack, mixed_routes, stack_adapters
from ..tuners.lora.tuner import LoRAConfig, _layout
from .undo import undo_on_error

__all__ = ["Swift", "SwiftConfig", "SwiftModel"]

#: SWIFT's config base class.  Every functuner config is one (``isinstance(LoRAConfig(), SwiftConfig)``);
#: ``SwiftConfig.from_pretrained(dir)`` builds the right config class from ``swift_type``.
SwiftConfig = TunerConfig

USE_UNIQUE_THREAD = "USE_UNIQUE_THREAD"
DEFAULT_ADAPTER = "default"


class _Holder(nn.Module):
    """Holds tuner tensors so they appear under SWIFT's parameter names. Never called."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - defensive
        raise RuntimeError("a functuner parameter holder is not a layer; it is never called")


@dataclass
class _Adapter:
    """One adapter held by the shim: its config, its parameters and where they live.

    ``tensors`` maps functuner names to the live ``nn.Parameter`` objects;
    ``shared`` are names that are the base model's own parameters (trainable
    biases); ``offload`` is ``None``, ``'cpu'`` or ``'meta'``.
    """

    name: str
    config: Any
    tensors: dict[str, nn.Parameter]
    shared: frozenset[str]
    modules: tuple[nn.Module, ...]
    devices: dict[str, torch.device] = field(default_factory=dict)
    offload: str | None = None
    offload_file: str | None = None

    @property
    def params(self) -> TunerParams:
        """The adapter as functuner params (the live parameters, not copies)."""
        return TunerParams(self.tensors, self.config, self.name)

    @property
    def swift_type(self) -> str:
        return tuner_for(self.config).swift_type


class _ThreadState:
    __slots__ = ("active", "routes", "version", "__weakref__")

    def __init__(self, active: set[str]) -> None:
        self.active = set(active)
        self.routes: Routes | None = None
        self.version = -1


class _State:
    """Everything the shim mutates, shared by re-wrapped ``SwiftModel``s of one model."""

    def __init__(self, model: nn.Module, per_thread: bool) -> None:
        self.model = model
        self.adapters: dict[str, _Adapter] = {}
        self.active: set[str] = set()
        self.per_thread = per_thread
        self.tls = threading.local()
        self.thread_states: weakref.WeakSet[_ThreadState] = weakref.WeakSet()
        self.merged: list[str] = []
        self.originals: dict[tuple[int, str], tuple[nn.Module, str, Any, bool]] = {}
        self.untied = False
        self.version = 0
        self.routes: Routes | None = None
        self.lock = threading.RLock()
        self.extra_state_keys: list[str] = []
        self.offload_dir: tempfile.TemporaryDirectory[str] | None = None
        self.mixed: _MixedEntry | None = None  # the stacked LoRA adapters of adapter_names= calls

    # -- activation ---------------------------------------------------------
    def thread_state(self, create: bool) -> _ThreadState | None:
        ts = getattr(self.tls, "state", None)
        if ts is None and create:
            ts = _ThreadState(self.active)
            self.tls.state = ts
            self.thread_states.add(ts)
        return ts

    def active_set(self) -> set[str]:
        if self.per_thread:
            ts = self.thread_state(create=False)
            if ts is not None:
                return set(ts.active)
        return set(self.active)

    def routes_for(self, names: set[str]) -> Routes | None:
        live = [self.adapters[n].params for n in self.adapters if n in names and n not in self.merged]
        if not live:
            return None
        return bind_routes(self.model, live, generator=None)

    def refresh(self) -> None:
        """Rebuild the global routes after any change of adapters, activation or merge state."""
        with self.lock:
            self.version += 1
            self.routes = self.routes_for(self.active)

    def provider(self) -> Routes | None:
        """Default routes of the adapted modules (called from the slot hooks; cheap)."""
        if self.per_thread:
            ts = getattr(self.tls, "state", None)
            if ts is not None:
                if ts.version != self.version:
                    with self.lock:
                        ts.routes = self.routes_for(ts.active)
                        ts.version = self.version
                return cast("Routes | None", ts.routes)
        return self.routes


@contextlib.contextmanager
def _active_sets_restored_on_error(state: _State) -> Iterator[None]:
    """Undo changes to the active sets (global and per thread) if the block raises (cheap: no tensors move)."""
    active = set(state.active)
    threads = [(ts, set(ts.active)) for ts in list(state.thread_states)]
    mine = getattr(state.tls, "state", None)
    try:
        yield
    except BaseException:
        with state.lock:
            state.active.clear()
            state.active.update(active)
            for ts, names in threads:
                ts.active.clear()
                ts.active.update(names)
            if mine is None:
                state.tls.__dict__.pop("state", None)
            state.refresh()
        raise


def _global_generator() -> torch.Generator:
    """A generator seeded from torch's global RNG: the shim's init follows ``torch.manual_seed`` like SWIFT/PEFT."""
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    return torch.Generator().manual_seed(seed)


def _decay_parameter_names(model: nn.Module) -> set[str]:
    from transformers import Trainer

    # an unbound call with self=None, exactly as ms-swift does; the method only reads the model
    return set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]


class SwiftModel(nn.Module):
    """A model with functuner adapters attached, with SWIFT's ``SwiftModel`` interface.

    Args:
        model: the model to tune, or a ``SwiftModel`` (its adapters are kept and new ones added).
        config: a config (adapter ``default``) or ``{adapter_name: config}``.
        extra_state_keys: regexes (``re.fullmatch`` on the inner model's parameter names)
            of extra parameters to train and save under ``extra_states/``.
        inference_mode: ``True`` puts the model in eval mode and leaves adapters frozen.

    The wrapped model is ``.base_model`` (also ``.model``); unknown attributes
    fall through to it, and ``forward`` has its signature.  The model is
    changed in place (holder submodules, slots, frozen base parameters), as
    SWIFT and PEFT do; the functional API (:func:`functuner.apply`) never does.
    """

    EXTRA_STATE_DIR = ckpt.EXTRA_STATE_DIR

    def __init__(
        self,
        model: nn.Module | SwiftModel,
        config: Any | Mapping[str, Any],
        extra_state_keys: Sequence[str] | None = None,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        loaded: Mapping[str, Mapping[str, torch.Tensor]] = kwargs.pop("_loaded_states", {}) or {}
        if kwargs:
            raise TypeError(f"SwiftModel got unexpected keyword(s) {sorted(kwargs)}")
        if isinstance(model, SwiftModel):
            state = model._state
            inner = state.model
        else:
            inner = model
            per_thread = not bool(int(os.environ.get(USE_UNIQUE_THREAD, "1")))
            state = _State(inner, per_thread)
        object.__setattr__(self, "_state", state)
        self.base_model = inner
        configs = self._normalise_configs(config)
        state.extra_state_keys = list(dict.fromkeys([*state.extra_state_keys, *(extra_state_keys or [])]))
        self._add_adapters(configs, loaded, trainable=not inference_mode)
        self._install_forward_signature()
        if inference_mode:
            self.eval()
        elif state.extra_state_keys:
            for n, p in inner.named_parameters():
                if any(re.fullmatch(k, n) for k in state.extra_state_keys):
                    p.requires_grad_(True)

    # -- construction helpers -------------------------------------------------
    @staticmethod
    def _normalise_configs(config: Any) -> dict[str, Any]:
        if isinstance(config, Mapping):
            configs = dict(config)
        else:
            configs = {DEFAULT_ADAPTER: config}
        for name, cfg in configs.items():
            check_adapter_name(name)
            tuner_for(cfg)  # raises ConfigError for objects that are no functuner config
        return configs

    def _install_forward_signature(self) -> None:
        def forward(self: SwiftModel, *args: Any, **kwargs: Any) -> Any:
            adapter_names = kwargs.pop("adapter_names", None)
            if adapter_names is None:
                return self.base_model(*args, **kwargs)
            with routed(self._mixed_routes(adapter_names, _batch_size(args, kwargs))):
                return self.base_model(*args, **kwargs)

        params = [Parameter("self", Parameter.POSITIONAL_ONLY)]
        params += list(signature(self.base_model.forward).parameters.values())
        forward.__signature__ = Signature(params)  # type: ignore[attr-defined]
        self.__dict__["forward"] = MethodType(forward, self)

    def _add_adapters(
        self, configs: Mapping[str, Any], loaded: Mapping[str, Mapping[str, torch.Tensor]], trainable: bool
    ) -> None:
        """Create (and optionally fill) adapters: all tensors prepared and checked before the model changes."""
        state = self._state
        model = state.model
        for name in configs:
            if name in state.adapters:
                raise AdapterNameError(f"adapter {name!r} already exists; pass {{new_name: config}} to add another")
        prepared: list[tuple[str, TunerParams]] = []
        for name, cfg in configs.items():
            gen = torch.Generator().manual_seed(0) if name in loaded else _global_generator()
            params = tuner_for(cfg).init(model, cfg, gen, name)
            if name in loaded:
                params = _filled(params, loaded[name])
            prepared.append((name, params))
        base_names = dict(model.named_parameters(remove_duplicate=False))
        flags = [(p, p.requires_grad) for p in model.parameters()]
        was_frozen = bool(getattr(model, "_functuner_frozen", False))
        registered: list[str] = []
        overwritten: dict[str, torch.Tensor] = {}
        added: list[str] = []
        try:
            if not was_frozen:
                for p in model.parameters():
                    p.requires_grad_(False)
                model.__dict__["_functuner_frozen"] = True
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
                        tensors[key] = _register(model, key, value)
                        registered.append(key)
                adapter = _Adapter(name, params.config, tensors, frozenset(shared), ())
                routes = bind_routes(model, adapter.params)
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
                _unregister(model, key)
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
        state.refresh()

    # -- SWIFT attributes -----------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The wrapped model (SWIFT's alias of ``base_model``)."""
        return cast(nn.Module, self._state.model)

    @property
    def adapters(self) -> dict[str, _Adapter]:
        """``{adapter name: adapter}``; each has ``.config``, ``.params`` (live TunerParams) and ``.swift_type``."""
        return cast("dict[str, _Adapter]", self._state.adapters)

    @property
    def active_adapters(self) -> set[str]:
        """Names of the adapters active for the calling thread (all threads with ``USE_UNIQUE_THREAD=1``)."""
        return cast("set[str]", self._state.active_set())

    @property
    def extra_state_keys(self) -> list[str]:
        return list(self._state.extra_state_keys)

    def __getattr__(self, key: str) -> Any:
        """Attributes the shim lacks come from the wrapped model."""
        try:
            return super().__getattr__(key)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "base_model" in modules:
                return getattr(modules["base_model"], key)
            raise

    # -- per-sample adapters (PEFT's adapter_names=) ----------------------------
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``; ``adapter_names=[...]`` gives each prompt its own LoRA adapter.

        With beam search or several returned sequences each name is repeated
        for the prompt's copies (as PEFT does).  Encoder-decoder models with
        more than one copy per prompt are not supported (:class:`ConfigError`).
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        gc = kwargs.get("generation_config") or getattr(self.base_model, "generation_config", None)
        copies = max(
            int(kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1),
            int(kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1),
        )
        names = _names_list(adapter_names)
        batch = _batch_size(args, kwargs)
        if batch is not None and len(names) != batch:
            raise ConfigError(
                f"adapter_names has {len(names)} entries but the batch has {batch} samples;"
                " give one adapter name per sample"
            )
        if copies > 1 and getattr(getattr(self.base_model, "config", None), "is_encoder_decoder", False):
            raise ConfigError(
                "generate(adapter_names=...) with num_beams / num_return_sequences > 1 is not"
                " supported for encoder-decoder models (the encoder runs on the unexpanded batch)"
            )
        expanded = [n for n in names for _ in range(copies)]
        with routed(self._mixed_routes(expanded, None)):
            return self.base_model.generate(*args, **kwargs)

    def _mixed_routes(self, adapter_names: Any, batch: int | None) -> Routes:
        """Routes of one ``adapter_names=`` call: sample ``b`` runs LoRA adapter ``adapter_names[b]``.

        ``'__base__'`` means no adapter.  Checks everything before any forward
        runs; the model and the shim's state are never written (the routes are
        per call, see :func:`functuner.mixed.mixed_routes`).
        """
        state = self._state
        names = _names_list(adapter_names)
        if batch is not None and len(names) != batch:
            raise ConfigError(
                f"adapter_names has {len(names)} entries but the batch has {batch} samples;"
                " give one adapter name per sample"
            )
        wanted = [n for n in dict.fromkeys(names) if n != BASE]
        unknown = [n for n in wanted if n not in state.adapters]
        if unknown:
            raise AdapterNameError(
                f"unknown adapter(s) {unknown} in adapter_names; have {sorted(state.adapters)}"
                f" and {BASE!r} (no adapter)"
            )
        if state.model.training:  # as PEFT: dropout, checkpoint recomputation and the like are per-call state
            raise ConfigError("adapter_names cannot be used while the model is in training mode; call model.eval()")
        if state.merged:
            raise ConfigError(
                f"adapter(s) {state.merged} are merged into the base weights, so every sample would"
                " get them; call Swift.unmerge(model) before using adapter_names"
            )
        skipped = sorted(n for n in state.active_set() if not isinstance(state.adapters[n].config, LoRAConfig))
        if skipped:
            raise ConfigError(
                f"adapter_names runs LoRA adapters per sample, but non-LoRA adapter(s) {skipped} are"
                " active and would be skipped; deactivate them first"
            )
        for n in wanted:
            why = _not_stackable(state.model, state.adapters[n])
            if why is not None:
                raise ConfigError(f"adapter {n!r} cannot be used in adapter_names: it {why}")
        if not wanted:
            return Routes()  # every sample runs the base model
        return mixed_routes(state.model, self._adapter_stack(wanted), names)

    def _adapter_stack(self, wanted: Sequence[str]) -> AdapterStack:
        """The stacked LoRA adapters: cached (built without autograd) unless gradients must reach the adapters.

        The cache holds every stackable LoRA adapter of the shim and is rebuilt
        when :func:`_stack_key` changes: any adapter's tensor replaced, written
        in place (version counter) or stepped by a ``torch.optim`` optimizer, an
        adapter added, deleted or offloaded.  With grad mode on and adapter
        tensors that require grad, a differentiable stack of just ``wanted`` is
        built for this call (not cached).
        """
        state = self._state
        model = state.model
        if torch.is_grad_enabled() and any(t.requires_grad for n in wanted for t in state.adapters[n].tensors.values()):
            return stack_adapters(model, {n: state.adapters[n].params for n in wanted})
        _count_optimizer_steps()
        lora = [a for a in state.adapters.values() if isinstance(a.config, LoRAConfig)]
        key = _stack_key(lora)
        entry = state.mixed
        if entry is None or entry.key != key:
            usable = [a for a in lora if _not_stackable(model, a) is None]
            keepalive = tuple(t.detach() for a in lora for t in _watched(a))
            with torch.no_grad():
                stack = stack_adapters(model, {a.name: a.params for a in usable})
            entry = _MixedEntry(key, stack, keepalive)
            state.mixed = entry
        return cast("AdapterStack", entry.stack)

    # -- activation -------------------------------------------------------------
    def activate_adapter(self, adapter_name: str) -> None:
        """Activate one adapter (for the calling thread only with ``USE_UNIQUE_THREAD=0``).

        An offloaded adapter's tensors come back first, bit-identical, on the device they had.
        """
        state = self._state
        self._require(adapter_name)
        with state.lock:
            self._reload(state.adapters[adapter_name])
            if state.per_thread:
                ts = state.thread_state(create=True)
                assert ts is not None
                ts.active.add(adapter_name)
                state.version += 1
            else:
                state.active.add(adapter_name)
                state.refresh()

    def deactivate_adapter(self, adapter_name: str, offload: str | None = None) -> None:
        """Deactivate one adapter; ``offload='cpu'`` moves its tensors to host memory, ``'meta'`` frees them.

        ``'meta'`` keeps a copy on disk (a private cache directory) that
        :meth:`activate_adapter` reads back.  Parameters report the device they
        are on.  Offloading an adapter that another thread still uses, or one
        that is merged, raises :class:`ConfigError`.
        """
        state = self._state
        self._require(adapter_name)
        if offload not in (None, "cpu", "meta"):
            raise ConfigError(f"offload must be None, 'cpu' or 'meta', got {offload!r}")
        if adapter_name in state.merged:
            raise ConfigError(f"adapter {adapter_name!r} is merged; call Swift.unmerge(model) first")
        with state.lock:
            if state.per_thread:
                me = state.thread_state(create=True)
                if offload is not None and any(
                    adapter_name in t.active for t in list(state.thread_states) if t is not me
                ):
                    raise ConfigError(f"adapter {adapter_name!r} is still active in another thread; not offloading")
                assert me is not None
                me.active.discard(adapter_name)
                if offload is not None:  # its tensors leave: threads without their own choice lose it too
                    state.active.discard(adapter_name)
                    state.refresh()
                state.version += 1
            else:
                state.active.discard(adapter_name)
                state.refresh()
            if offload is not None:
                self._offload(state.adapters[adapter_name], offload)

    def set_active_adapters(self, adapter_names: str | Sequence[str] | None, offload: str | None = None) -> None:
        """Make exactly ``adapter_names`` active; the others are deactivated (and offloaded if asked)."""
        if not adapter_names:
            names: set[str] = set()
        elif isinstance(adapter_names, str):
            names = {adapter_names}
        else:
            names = set(adapter_names)
        unknown = names - set(self.adapters)
        if unknown:
            raise AdapterNameError(f"unknown adapter(s) {sorted(unknown)}; have {sorted(self.adapters)}")
        state = self._state
        moves = offload is not None or any(state.adapters[n].offload is not None for n in names)
        # all or nothing; only a call that moves tensors pays for a full snapshot (switching stays cheap)
        guard = undo_on_error(state.model, state) if moves else _active_sets_restored_on_error(state)
        with guard:
            for name in sorted(names):
                self.activate_adapter(name)
            for name in sorted(set(self.adapters) - names):
                self.deactivate_adapter(name, offload)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside the block; the previous active set is restored afterwards."""
        before = self.active_adapters
        try:
            self.set_active_adapters([])
            yield
        finally:
            self.set_active_adapters(sorted(before))

    def _require(self, name: str) -> None:
        if name not in self._state.adapters:
            raise AdapterNameError(f"unknown adapter {name!r}; have {sorted(self._state.adapters)}")

    def _offload(self, adapter: _Adapter, where: str) -> None:
        if adapter.offload is not None:
            return
        self._state.mixed = None
        own = {k: p for k, p in adapter.tensors.items() if k not in adapter.shared}
        adapter.devices = {k: p.device for k, p in own.items()}
        if where == "meta":
            state = self._state
            if state.offload_dir is None:
                state.offload_dir = tempfile.TemporaryDirectory(prefix="functuner-offload-")
            path = os.path.join(state.offload_dir.name, f"{adapter.name}.safetensors")
            save_file({k: p.detach().to("cpu").contiguous() for k, p in own.items()}, path)
            adapter.offload_file = path
        model = self._state.model
        for k, p in own.items():
            p.grad = None
            if where == "cpu":
                p.data = p.data.to("cpu")
            else:
                # torch cannot re-point a parameter at a meta tensor: the registered parameter becomes a meta
                # one (so named_parameters shows where the data is) and the live object keeps an empty placeholder
                _set_registered(model, k, nn.Parameter(torch.empty_like(p.data, device="meta"), p.requires_grad))
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        adapter.offload = where

    def _reload(self, adapter: _Adapter) -> None:
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
                _set_registered(self._state.model, k, adapter.tensors[k])
        adapter.offload = None

    # -- merge ------------------------------------------------------------------
    def _mergeable_active(self) -> list[str]:
        state = self._state
        return [
            n
            for n in state.adapters
            if n in state.active_set()
            and n not in state.merged
            and tuner_for(state.adapters[n].config).merge is not None
        ]

    def _merge(self, names: Sequence[str]) -> None:
        """Fold ``names`` into the base weights: all new weights computed first, then swapped in."""
        state = self._state
        if not names:
            return
        with undo_on_error(state.model, state):
            self._merge_now(names)

    def _merge_now(self, names: Sequence[str]) -> None:
        state = self._state
        model = state.model
        for n in names:
            self._reload(state.adapters[n])
        live = dict(model.named_parameters(remove_duplicate=False))
        live.update(dict(model.named_buffers(remove_duplicate=False)))
        base = {k: v.detach() for k, v in live.items()}  # distinct objects: tied weights are merged per name
        with torch.no_grad():
            merged = core_merge(model, [state.adapters[n].params for n in names], base)
        changes = [(k, v) for k, v in merged.items() if k in base and v is not base[k] and v is not live[k]]
        shared_ids: dict[int, int] = {}
        for t in live.values():
            shared_ids[id(t)] = shared_ids.get(id(t), 0) + 1
        ready = []  # every new tensor made before the first swap
        for key, value in changes:
            owner_path, _, leaf = key.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            is_param = leaf in owner._parameters
            orig = owner._parameters[leaf] if is_param else owner._buffers[leaf]
            new = value.detach().to(orig.dtype)
            ready.append((owner, leaf, orig, is_param, nn.Parameter(new, requires_grad=False) if is_param else new))
        with state.lock:
            for owner, leaf, orig, is_param, new in ready:
                if is_param:
                    if shared_ids.get(id(orig), 0) > 1:
                        state.untied = True
                    state.originals.setdefault((id(owner), leaf), (owner, leaf, orig, True))
                    owner._parameters[leaf] = new
                else:
                    state.originals.setdefault((id(owner), leaf), (owner, leaf, orig, False))
                    owner._buffers[leaf] = new
            state.merged.extend(names)
            state.refresh()

    def _unmerge(self) -> None:
        """Put the original weight objects back (exact: nothing is subtracted)."""
        state = self._state
        with state.lock, undo_on_error(state.model, state):
            for owner, leaf, orig, is_param in state.originals.values():
                (owner._parameters if is_param else owner._buffers)[leaf] = orig
            state.originals.clear()
            state.merged.clear()
            state.untied = False
            state.refresh()

    def _delete_adapter(self, name: str) -> None:
        state = self._state
        state.mixed = None
        adapter = state.adapters.pop(name)
        for key in adapter.tensors:
            if key not in adapter.shared:
                _unregister(state.model, key)
        if adapter.offload_file:
            os.unlink(adapter.offload_file)
        state.active.discard(name)
        for ts in list(state.thread_states):
            ts.active.discard(name)
        state.refresh()

    # -- optimizer groups ---------------------------------------------------------
    def create_optimizer_param_groups(self, **defaults: Any) -> list[dict[str, Any]]:
        """Optimizer param groups (SWIFT's): LoRA+ groups for LoRA adapters with ``lorap_lr_ratio``, then the rest.

        For each such adapter: its ``lora_A`` tensors get ``lr``; ``lora_B``
        tensors and 1-d tensors get ``lr * lorap_lr_ratio`` (with / without
        weight decay); embedding LoRA tensors get ``lorap_emb_lr``.  Every
        other trainable parameter goes to a group with ``weight_decay`` or one
        with 0.0 (no decay for biases and norms, as transformers' Trainer).
        """
        lr = defaults.get("lr")
        wd = defaults.get("weight_decay", 0.0)
        model = self._state.model
        decay = _decay_parameter_names(model)
        names_of = {id(p): n for n, p in model.named_parameters()}
        claimed: set[int] = set()
        groups: list[dict[str, Any]] = []
        for adapter in self._state.adapters.values():
            cfg = adapter.config
            if not isinstance(cfg, LoRAConfig) or cfg.lorap_lr_ratio is None:
                continue
            if lr is None:
                raise ConfigError("create_optimizer_param_groups needs lr=... for LoRA+ (lorap_lr_ratio is set)")
            g: dict[str, list[nn.Parameter]] = {"A": [], "emb": [], "B": [], "B_nd": []}
            for key, p in adapter.tensors.items():
                if not p.requires_grad or id(p) in claimed:
                    continue
                claimed.add(id(p))
                if ".lora_embedding_" in key:
                    g["emb"].append(p)
                elif ".lora_B." in key or p.ndim == 1:
                    g["B" if names_of.get(id(p)) in decay else "B_nd"].append(p)
                else:
                    g["A"].append(p)
            groups += [
                {"params": g["A"], "weight_decay": wd, "lr": lr},
                {"params": g["emb"], "weight_decay": wd, "lr": cfg.lorap_emb_lr},
                {"params": g["B"], "weight_decay": wd, "lr": lr * cfg.lorap_lr_ratio},
                {"params": g["B_nd"], "weight_decay": 0.0, "lr": lr * cfg.lorap_lr_ratio},
            ]
        rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in claimed]
        groups += [
            {"params": [p for n, p in rest if n in decay], "weight_decay": wd},
            {"params": [p for n, p in rest if n not in decay], "weight_decay": 0.0},
        ]
        return groups

    # -- combination ----------------------------------------------------------------
    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, a weighted combination of LoRA ``adapters`` (PEFT's signature), and activate only it.

        Uses :func:`functuner.combine.add_weighted_adapter` (pure); random types
        (``dare_*``) draw from torch's global RNG, as PEFT does.
        """
        from ..tuners.lora.combine import add_weighted_adapter as combine

        check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise AdapterNameError(f"adapter {adapter_name!r} already exists")
        for n in adapters:
            self._require(n)
            self._reload(self.adapters[n])
        with torch.no_grad():
            new = combine(
                {n: self.adapters[n].params.detach() for n in adapters},
                list(weights),
                adapter_name,
                combination_type,
                svd_rank=svd_rank,
                svd_clamp=svd_clamp,
                svd_full_matrices=svd_full_matrices,
                svd_driver=svd_driver,
                density=density,
                majority_sign_method=majority_sign_method,
                generator=_global_generator() if combination_type.startswith("dare") else None,
                model=self.model,
                names=list(adapters),
            )
        self._add_adapters({adapter_name: new.config}, {adapter_name: dict(new)}, trainable=True)
        self.set_active_adapters([adapter_name])

    # -- state dicts ---------------------------------------------------------------
    def state_dict(  # type: ignore[override]  # SWIFT's extra keywords
        self,
        *args: Any,
        destination: Any = None,
        prefix: str = "",
        keep_vars: bool = False,
        adapter_name: str | None = None,
        peft_format: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The adapters' tensors (SWIFT's on-disk names) plus extra states, as SWIFT returns them.

        ``adapter_name`` selects one adapter (default: all); ``peft_format=True``
        gives PEFT's names for one LoRA adapter.  ``save_adapter`` /
        ``save_extra_states`` keywords choose the parts.  Called by a parent
        module (``destination`` or ``prefix`` given) it is torch's full state dict.
        """
        if destination is not None or prefix or args:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out: dict[str, Any] = {}
        grab: Callable[[torch.Tensor], torch.Tensor] = (lambda t: t) if keep_vars else (lambda t: t.detach())
        if kwargs.get("save_adapter", True):
            for name, adapter in self.adapters.items():
                if adapter_name is not None and name != adapter_name:
                    continue
                self._reload_if_meta(adapter)
                tensors = {k: grab(v) for k, v in adapter.tensors.items()}
                if peft_format:
                    out.update(keys.to_peft_state_dict(tensors, name))
                else:
                    out.update(keys.to_swift_state_dict(tensors, name))
        if kwargs.get("save_extra_states", True):
            out.update(self._extra_states(grab))
        return out

    def _reload_if_meta(self, adapter: _Adapter) -> None:
        if adapter.offload == "meta":
            raise ConfigError(f"adapter {adapter.name!r} is offloaded to 'meta'; activate it before reading it")

    def _extra_states(self, grab: Any = torch.Tensor.detach) -> dict[str, torch.Tensor]:
        pats = self._state.extra_state_keys
        if not pats:
            return {}
        adapter_keys = {k for a in self.adapters.values() for k in a.tensors if k not in a.shared}
        return {
            n: grab(p)
            for n, p in self._state.model.state_dict(keep_vars=True).items()
            if n not in adapter_keys and any(re.fullmatch(k, n) for k in pats)
        }

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False, adapter_name: str | None = None
    ) -> Any:
        """Load tensors into one adapter (``adapter_name``) strictly, or into the wrapped model.

        With ``adapter_name``: keys may be SWIFT's (adapter name inside) or
        PEFT's (``base_model.model.`` prefix, no adapter name); every tensor of
        the adapter must be present with its shape, else
        :class:`ParamsMismatchError` lists the differences and nothing changes.
        Without: ``base_model.load_state_dict(state_dict, strict=False)``.
        """
        if adapter_name is None:
            return self._state.model.load_state_dict(dict(state_dict), strict=False, assign=assign)
        self._require(adapter_name)
        adapter = self.adapters[adapter_name]
        named = _to_functuner_names(state_dict, adapter_name, adapter.config)
        values = _filled(adapter.params, named)
        with undo_on_error(self._state.model, self._state, overwritten=adapter.tensors.values()):
            self._reload(adapter)
            with torch.no_grad():
                for k, v in values.items():
                    adapter.tensors[k].copy_(v)
        return None

    # -- saving ------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        adapter_name: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Save adapters in SWIFT's layout (one sub-folder each), ``extra_states/`` and ``configuration.json``.

        Each adapter folder is written atomically.  ``peft_format=True`` writes
        LoRA adapters in PEFT's layout instead (``default`` at the root).
        Only safetensors are written; ``safe_serialization=False`` raises.
        """
        if not safe_serialization:
            raise CheckpointError("functuner writes safetensors only (pickled .bin files are unsafe to load)")
        peft_format = bool(kwargs.pop("peft_format", False))
        if kwargs:
            raise TypeError(f"save_pretrained got unexpected keyword(s) {sorted(kwargs)}")
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name or self.adapters)
        for n in names:
            self._require(n)
            check_adapter_name(n)
        root = Path(save_directory)
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"{root} is a file; save_pretrained needs a directory")
        snapshots = {}
        for n in names:
            adapter = self.adapters[n]
            self._reload_if_meta(adapter)
            snapshots[n] = {k: v.detach() for k, v in adapter.tensors.items()}
            if peft_format:
                ckpt.peft_config_json(adapter.config)
                keys.to_peft_state_dict(snapshots[n], n)
        extra = self._extra_states()
        if root.is_symlink():  # the user's own link: write where it points, swapping the real directory
            root = Path(os.path.realpath(root))
        # one atomic step for the whole directory: a crash leaves the old checkpoint or the new one, never a mix
        # (files kept from the old directory are hard links, and every file written is a new one)
        with ckpt.atomic_dir(root, start_from_existing=True, link_existing=True) as tmp:
            if peft_format:
                ckpt.write_peft_checkpoint(
                    tmp,
                    {
                        n: ckpt.AdapterCheckpoint(n, self.adapters[n].config, snapshots[n], "peft", str(root))
                        for n in names
                    },
                )
            else:
                for n in names:
                    ckpt.write_swift_adapter(tmp, n, self.adapters[n].config, snapshots[n])
            if extra:
                ckpt.write_extra_states(tmp, self._state.extra_state_keys, extra)
            ckpt.write_configuration_json(tmp)

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module | SwiftModel,
        model_id: str | None = None,
        adapter_name: str | Sequence[str] | Mapping[str, str] | None = None,
        inference_mode: bool = True,
        revision: str | None = None,
        **kwargs: Any,
    ) -> SwiftModel:
        """Load adapters saved in ``model_id`` (a local directory or a ModelScope hub id) onto ``model``.

        ``adapter_name``: ``None`` loads every adapter, a name or list of
        names loads those, ``{name on disk: new name}`` loads and renames
        (only the adapter-name component of keys changes).  SWIFT- and
        PEFT-format directories both load.  Keywords: ``extra_state_keys``,
        ``weights_only`` (allow torch's restricted loader for ``.bin``), and
        ``cache_dir`` / ``local_files_only`` for the hub.  Everything is read and
        checked before the model is touched.
        """
        if model_id is None:
            raise CheckpointError("from_pretrained needs model_id (a directory or a hub id)")
        weights_only = bool(kwargs.pop("weights_only", False))
        extra_state_keys = kwargs.pop("extra_state_keys", None)
        hub_kwargs = {k: kwargs.pop(k) for k in ("cache_dir", "local_files_only") if k in kwargs}
        if kwargs:
            raise TypeError(f"from_pretrained got unexpected keyword(s) {sorted(kwargs)}")
        model_dir = resolve_model_dir(model_id, revision=revision, **hub_kwargs)
        found = ckpt.read_adapter_dir(model_dir, adapter_name, weights_only=weights_only)
        patterns, extra = ckpt.read_extra_states(model_dir, weights_only=weights_only)
        if extra_state_keys is None:
            extra_state_keys = patterns
        inner = model._state.model if isinstance(model, SwiftModel) else model
        own_state = inner.state_dict()
        for ck in found.values():  # PEFT's saved copies of base weights must be the model's own
            differ = sorted(
                k
                for k, v in ck.base_weights.items()
                if k not in own_state or own_state[k].shape != v.shape or not torch.equal(own_state[k].cpu(), v)
            )
            if differ:
                raise CheckpointError(
                    f"{ck.path}: holds base weights {differ[:4]} that differ from the model's;"
                    " functuner loads adapters, not base weights (load that base model first)"
                )
        if extra:
            own = inner.state_dict()
            bad = sorted(k for k, v in extra.items() if k not in own or own[k].shape != v.shape)
            if bad:
                raise CheckpointError(f"{model_dir}/extra_states: keys that do not fit the model: {bad[:8]}")
        configs = {n: c.config for n, c in found.items()}
        if not configs and not extra:
            raise CheckpointError(
                f"{model_dir}: no adapter found (no adapter_config.json at the root or in sub-folders)"
            )
        for ck in found.values():
            ckpt.check_lora_ranks(inner, ck.config, f"{ck.path}/{ckpt.CONFIG_NAME}")
        own_p = dict(inner.state_dict(keep_vars=True))
        shim_state = model._state if isinstance(model, SwiftModel) else None
        try:
            with undo_on_error(inner, shim_state, overwritten=[own_p[k] for k in extra or {}]):
                self = cls(
                    model,
                    configs,
                    extra_state_keys,
                    inference_mode,
                    _loaded_states={n: c.state for n, c in found.items()},
                )
                if extra:
                    with torch.no_grad():
                        for k, v in extra.items():
                            own_p[k].copy_(v)
        except FunctunerError as e:  # same type, but naming the checkpoint that does not fit
            raise type(e)(f"checkpoint {model_dir}: {e}") from None
        return self

    # -- reporting ------------------------------------------------------------------------
    def get_trainable_parameters(self) -> str:
        """SWIFT's summary line: trainable / all parameter counts, percentage, CUDA memory in GiB."""
        trainable = total = 0
        for _, p in self._state.model.named_parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        mem = 0.0
        if torch.cuda.is_available():
            mem = sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) / 1024**3
        pct = 100 * trainable / total if total else 0.0
        return (
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
            f"|| cuda memory: {mem:.2f}GiB."
        )


# ---------------------------------------------------------------------------
# per-sample adapters: the cache of stacked LoRA adapters (no tuner math: bookkeeping only)
# ---------------------------------------------------------------------------
class _MixedEntry(NamedTuple):
    """A cached :class:`AdapterStack` and the key it was built for.

    ``keepalive`` holds the watched tensors' storages, so a storage address in
    ``key`` cannot be reused by a new tensor while the entry exists.
    """

    key: tuple[Any, ...]
    stack: AdapterStack
    keepalive: tuple[torch.Tensor, ...]


_OPTIMIZER_STEPS = [0]  # torch.optim steps seen since the hook was installed
_STEP_HOOK: list[Any] = []
_STEP_HOOK_LOCK = threading.Lock()


def _count_optimizer_steps() -> None:
    """Count every ``torch.optim`` step from now on (fused optimizers write without bumping version counters)."""
    if _STEP_HOOK:
        return
    with _STEP_HOOK_LOCK:
        if not _STEP_HOOK:

            def bump(optimizer: Any, args: Any, kwargs: Any) -> None:
                _OPTIMIZER_STEPS[0] += 1

            _STEP_HOOK.append(register_optimizer_step_post_hook(bump))


def _watched(adapter: _Adapter) -> list[torch.Tensor]:
    """Tensors a stacked adapter depends on: its own, plus the adapted weights for DoRA (the norm uses them)."""
    out: list[torch.Tensor] = list(adapter.tensors.values())
    if getattr(adapter.config, "use_dora", False):
        out += [w for m in adapter.modules if isinstance(w := getattr(m, "weight", None), torch.Tensor)]
    return out


def _stack_key(adapters: Sequence[_Adapter]) -> tuple[Any, ...]:
    """What a stack of ``adapters`` depends on: names, configs, offload state, each tensor's storage and version."""
    parts: list[Any] = [_OPTIMIZER_STEPS[0]]
    for a in adapters:
        parts += (a.name, a.config, a.offload)
        for t in _watched(a):
            parts += (t.data_ptr(), t._version, t.dtype, t.device)
    return tuple(parts)


def _not_stackable(model: nn.Module, adapter: _Adapter) -> str | None:
    """Why ``adapter`` cannot run per sample (completes "it ..."), or None."""
    if not isinstance(adapter.config, LoRAConfig):
        return f"is a {adapter.swift_type} adapter; per-sample adapters are LoRA only"
    if adapter.offload is not None:
        return f"is offloaded to {adapter.offload!r}; call activate_adapter({adapter.name!r}) first"
    if _layout(model, adapter.params).overrides:
        return "has modules_to_save copies or biases of modules LoRA does not adapt (not supported per sample)"
    return None


def _names_list(adapter_names: Any) -> list[str]:
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(
            f"adapter_names must be a list with one adapter name per sample, got {type(adapter_names).__name__}"
        )
    return list(adapter_names)


def _batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    """The batch size of a call: the first dimension of its main input tensor (None if there is none)."""
    for v in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("pixel_values")):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return None


# ---------------------------------------------------------------------------
# helpers (no tuner math: names and parameter placement only)
# ---------------------------------------------------------------------------
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


def _register(model: nn.Module, key: str, value: torch.Tensor) -> nn.Parameter:
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


def _set_registered(model: nn.Module, key: str, value: nn.Parameter) -> None:
    """Point the registered parameter at ``key`` to ``value`` (offload bookkeeping)."""
    owner_path, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    owner._parameters[leaf] = value


def _unregister(model: nn.Module, key: str) -> None:
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


def _filled(params: TunerParams, values: Mapping[str, torch.Tensor]) -> TunerParams:
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


def _to_functuner_names(state: Mapping[str, torch.Tensor], adapter_name: str, config: Any) -> dict[str, torch.Tensor]:
    """SWIFT on-disk or PEFT keys of one adapter -> functuner names (via :mod:`functuner.keys`)."""
    data = dict(state)
    if data and all(k.startswith(keys.PEFT_PREFIX) for k in data):
        spec = getattr(config, "modules_to_save", None) or ()
        mods = {
            k[len(keys.PEFT_PREFIX) :].rsplit(".", 1)[0]
            for k in data
            if any(
                k[len(keys.PEFT_PREFIX) :].rsplit(".", 1)[0] == m
                or k[len(keys.PEFT_PREFIX) :].rsplit(".", 1)[0].endswith("." + m)
                for m in spec
            )
        }
        return keys.from_peft_state_dict(data, adapter_name, mods)
    mts = set(getattr(config, "modules_to_save", None) or ())
    state = keys.from_swift_state_dict(data, adapter_name, mts)
    if getattr(config, "swift_type", None) == "part":  # SWIFT saves Part copies at the original keys
        state = keys.part_from_swift_state_dict(state, config.target_modules, adapter_name)
    if getattr(config, "swift_type", None) == "LLAMAPRO":  # SWIFT saves new blocks at expanded-list keys
        state = keys.llamapro_from_swift_state_dict(state, config.keys()["module_list"], adapter_name)
    return state


# ---------------------------------------------------------------------------
# Swift: the static entry points
# ---------------------------------------------------------------------------
def _is_peft_model(model: Any) -> bool:
    peft_mod = sys.modules.get("peft")  # a PeftModel instance means peft is imported
    return peft_mod is not None and isinstance(model, peft_mod.PeftModel)


class Swift:
    """SWIFT's static entry points, for functuner configs (and PEFT configs/models, passed to peft)."""

    @staticmethod
    def prepare_model(model: nn.Module | SwiftModel, config: Any, **kwargs: Any) -> Any:
        """Wrap ``model`` with the tuner(s) in ``config`` (a config or ``{name: config}``); returns a SwiftModel.

        A ``SwiftModel`` gets the new adapters added.  A PEFT ``PeftConfig``
        goes through ``peft.get_peft_model`` (returns a ``PeftModel``).
        """
        peft_mod = sys.modules.get("peft")  # a PeftConfig instance means peft is imported
        if peft_mod is not None and isinstance(config, peft_mod.PeftConfig):
            return peft_mod.get_peft_model(model, config, **kwargs)
        return SwiftModel(model, config, **kwargs)

    @staticmethod
    def merge(model: Any, **kwargs: Any) -> None:
        """Fold every active mergeable adapter into the base weights (exact, atomic; undo with :meth:`unmerge`)."""
        if _is_peft_model(model):
            _require_peft_mergeable(model)
            model.merge_adapter(**kwargs)
            return
        _require_swift(model)._merge(model._mergeable_active())

    @staticmethod
    def unmerge(model: Any, **kwargs: Any) -> None:
        """Restore the exact original base weights after :meth:`merge`."""
        if _is_peft_model(model):
            _require_peft_mergeable(model)
            model.unmerge_adapter()
            return
        _require_swift(model)._unmerge()

    @staticmethod
    def merge_and_unload(model: Any, adapter_name: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Merge adapters into the base weights permanently and remove them.

        ``adapter_name`` (a name or list) chooses adapters; default: every
        active adapter whose tuner has a merged form (all active LoRA
        adapters).  Tied weights are untied where only one side changes (so the
        merged model computes what the adapted one did).  Returns the
        ``SwiftModel`` (a ``PeftModel`` returns its unloaded base model).
        """
        if _is_peft_model(model):
            _require_peft_mergeable(model)
            if adapter_name is not None:  # PEFT's keyword for the same choice
                kwargs["adapter_names"] = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
            return model.merge_and_unload(**kwargs)
        sm = _require_swift(model)
        state = sm._state
        if adapter_name is None:
            names = sm._mergeable_active()
        else:
            names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
            for n in names:
                sm._require(n)
                if tuner_for(state.adapters[n].config).merge is None:
                    raise ConfigError(f"adapter {n!r} ({state.adapters[n].swift_type}) has no merged form")
        with undo_on_error(state.model, state):  # all or nothing
            if state.merged:
                sm._unmerge()
            sm._merge(names)
            with state.lock:
                untied = state.untied
                state.originals.clear()
                state.merged.clear()
                state.untied = False
                for n in names:
                    sm._delete_adapter(n)
            if untied and hasattr(getattr(state.model, "config", None), "tie_word_embeddings"):
                state.model.config.tie_word_embeddings = False
        return sm

    @staticmethod
    def save_to_peft_format(ckpt_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> None:
        """Convert a saved LoRA checkpoint to PEFT's layout (``default`` at the root, others in sub-folders).

        Keys lose the adapter name and get ``base_model.model.``; configs lose
        ``swift_type``.  Idempotent, and may convert in place.  Non-LoRA
        adapters, ``extra_states`` or SWIFT-only LoRA fields (``lora_dtype``
        set...) raise :class:`CheckpointError` before anything is written.
        """
        if not ckpt_dir or not output_dir:
            raise CheckpointError("save_to_peft_format needs ckpt_dir and output_dir")
        src = Path(ckpt_dir)
        if not src.is_dir():
            raise CheckpointError(f"{src}: not a directory")
        if (src / ckpt.EXTRA_STATE_DIR).exists():
            raise CheckpointError(f"{src}: has extra_states/, which PEFT's format cannot hold")
        adapters = ckpt.read_adapter_dir(src)
        if not adapters:
            raise CheckpointError(f"{src}: no adapter found")
        ckpt.write_peft_checkpoint(output_dir, adapters, copy_from=src)

    @staticmethod
    def from_pretrained(
        model: nn.Module | SwiftModel,
        model_id: str,
        adapter_name: Any = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load adapters from a local directory or a ModelScope hub id (see :meth:`SwiftModel.from_pretrained`).

        SWIFT directories and PEFT LoRA directories load into a ``SwiftModel``
        (SWIFT would return a PeftModel for the latter).  A PEFT directory of
        PEFT's other tuners (IA3, LoHa, LoKr, AdaLoRA, VeRA, BOFT, prompt or
        prefix tuning...) goes to ``peft.PeftModel.from_pretrained`` (or
        ``load_adapter`` when ``model`` is a ``PeftModel``, which also takes PEFT
        LoRA directories that way) and a ``PeftModel`` is returned; functuner's safety checks still apply (no unpickling
        without ``weights_only=True``, no NaN/inf, every key must load) and a
        failure leaves the model as it was.  ``inference_mode=False`` there
        means peft's ``is_trainable=True``; other unknown keywords go to peft.
        """
        if model_id is None:
            raise CheckpointError("from_pretrained needs model_id (a directory or a hub id)")
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "local_files_only") if k in kwargs}
        model_dir = resolve_model_dir(model_id, revision=revision, **hub_kwargs)
        native = ckpt.peft_native_adapters(model_dir, adapter_name, lora_too=_is_peft_model(model))
        if native is None:
            return SwiftModel.from_pretrained(model, model_dir, adapter_name=adapter_name, revision=revision, **kwargs)
        folders, renames = native
        if isinstance(model, SwiftModel):
            raise CheckpointError(
                f"{model_dir}: PEFT adapters {sorted(folders)} are of a type only peft implements,"
                " which a SwiftModel cannot hold; pass the plain model (a PeftModel is returned)"
            )
        for k in hub_kwargs:
            kwargs.pop(k)
        if kwargs.pop("extra_state_keys", None):
            raise ConfigError("extra_state_keys is a SWIFT feature; PEFT adapters cannot carry extra states")
        weights_only = bool(kwargs.pop("weights_only", False))
        if "inference_mode" in kwargs:
            kwargs["is_trainable"] = not kwargs.pop("inference_mode")
        from ..io.peft import load_peft_native

        return load_peft_native(model, model_dir, folders, renames, weights_only=weights_only, **kwargs)


def _require_peft_mergeable(model: Any) -> None:
    """Prompt-learning PeftModels (prompt, prefix, p-tuning) have no merged form: say so instead of an AttributeError."""
    kinds = {name: cfg.peft_type for name, cfg in model.peft_config.items() if cfg.is_prompt_learning}
    if kinds:
        raise ConfigError(f"PEFT adapters {kinds} are prompt learning, which has no merged form")


def _require_swift(model: Any) -> SwiftModel:
    if not isinstance(model, SwiftModel):
        raise TypeError(f"expected a SwiftModel or a PeftModel, got {type(model).__name__}")
    return model
