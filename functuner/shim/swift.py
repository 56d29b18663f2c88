"""The SWIFT-compatible stateful shim: ``Swift``, ``SwiftModel``, ``SwiftConfig``.

Switching from ModelScope SWIFT is one import::

    from functuner import Swift, SwiftModel, LoRAConfig

Design note: the shim is thin.  ``SwiftModel`` is SWIFT's public interface and
delegates each concern to one module of :mod:`functuner.shim`:

* :mod:`.state`: the mutable state (adapters, active sets, globally or per
  thread with ``USE_UNIQUE_THREAD=0``) and the default routes the adapted
  modules use, so ``model.generate()``, direct calls of the inner model and
  gradient-checkpoint recomputation all see the active adapters;
* :mod:`.placement`: adapter tensors as ``nn.Parameter``s on holder modules
  inside the wrapped model (``named_parameters()`` shows SWIFT's names, so
  ordinary optimizers and ``transformers.Trainer`` train them), offloading;
* :mod:`.merging`: merged state (weight objects swapped, swapped back on unmerge);
* :mod:`.per_sample`: PEFT's ``adapter_names=``; :mod:`.optim`: param groups;
* :mod:`.checkpoints`: state dicts, saving and loading; :mod:`.undo`: all or nothing;
* :mod:`.peft_names`: PEFT's model-level names; :mod:`.trainer`: ``transformers.Trainer`` checkpoints;
* :mod:`.copies`: ``copy.deepcopy`` / pickle; :mod:`.patches`: forwards patched on by libraries (TRL).

Tuner math lives in the tuners, and whatever the shim must know about a tuner
is an optional hook on :class:`functuner.tuners.base.Tuner` (``merge``,
``per_sample``, ``optimizer_groups``, ``combine``): no tuner type is named here.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.hub import resolve_model_dir
from ..core.naming import check_adapter_name
from ..core.patterns import check_patterns
from ..core.routing import routed
from ..errors import AdapterNameError, CheckpointError, ConfigError, FunctunerError
from ..io import checkpoint as ckpt
from ..io.peft import is_peft_config, is_peft_model
from ..quant.kbit import prepare_model_for_kbit_training
from ..tuners import tuner_for
from ..tuners.base import TunerConfig
from . import checkpoints, generation, merging, optim, per_sample, placement, restructure, training
from .copies import Copyable
from .patches import inner_call, move_forward_patch
from .peft_names import PeftNames
from .signature import signed_class
from .state import DEFAULT_ADAPTER, USE_UNIQUE_THREAD, AdapterEntry, ShimState
from .undo import undo_on_error

__all__ = ["Swift", "SwiftConfig", "SwiftModel"]

#: SWIFT's config base class.  Every functuner config is one (``isinstance(LoRAConfig(), SwiftConfig)``);
#: ``SwiftConfig.from_pretrained(dir)`` builds the right config class from ``swift_type``.
SwiftConfig = TunerConfig


class SwiftModel(PeftNames, Copyable):
    """A model with functuner adapters attached, with SWIFT's ``SwiftModel`` interface.

    Args:
        model: the model to tune, or a ``SwiftModel`` (its adapters are kept and new ones added).
        config: a config (adapter ``default``) or ``{adapter_name: config}``.
        extra_state_keys: regexes (``re.fullmatch`` on the inner model's parameter names)
            of extra parameters to train and save under ``extra_states/``.
        inference_mode: ``True`` puts the model in eval mode, as SWIFT does; the new adapters' own
            tensors stay trainable (SWIFT creates them trainable), while the model's own parameters an
            adapter trains (LoRA biases) and ``extra_state_keys`` are not made trainable.

    The wrapped model is ``.base_model`` (also ``.model``); unknown attributes
    fall through to it, and ``forward`` has its signature (on the class too, so
    ``transformers.Trainer`` finds the label names).  The model is changed in
    place (holder submodules, slots, frozen base parameters), as SWIFT and PEFT
    do; the functional API (:func:`functuner.apply`) never does.
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
        frozen = bool(kwargs.pop("_frozen", False))  # from_pretrained(is_trainable=False)
        if kwargs:
            raise TypeError(f"SwiftModel got unexpected keyword(s) {sorted(kwargs)}")
        if extra_state_keys is not None and not isinstance(extra_state_keys, (list, tuple)):
            raise ConfigError(f"extra_state_keys: expected a list of regexes, got {extra_state_keys!r}")
        check_patterns(extra_state_keys, "extra_state_keys", list_is_regex=True)  # before anything changes
        if isinstance(model, SwiftModel):
            state = model._state
            inner = state.model
        else:
            inner = model
            per_thread = not bool(int(os.environ.get(USE_UNIQUE_THREAD, "1")))
            state = ShimState(inner, per_thread)
        object.__setattr__(self, "_state", state)
        self.base_model = inner
        configs = self._normalise_configs(config)
        state.extra_state_keys = list(dict.fromkeys([*state.extra_state_keys, *(extra_state_keys or [])]))
        restructure.add_adapters(state, configs, loaded, trainable=not frozen)  # tuners' restructure hooks first
        if inference_mode and not frozen:  # SWIFT skips mark_trainable: base parameters an adapter trains stay frozen
            for name in configs:
                adapter = state.adapters[name]
                for key in () if restructure.keeps_trainable(adapter) else adapter.shared:
                    adapter.tensors[key].requires_grad_(False)
        self.__class__ = signed_class(type(self), inner)
        if inference_mode:
            self.eval()
        elif state.extra_state_keys:
            for n, p in inner.named_parameters():
                if any(re.fullmatch(k, n) for k in state.extra_state_keys):
                    p.requires_grad_(True)

    @staticmethod
    def _normalise_configs(config: Any) -> dict[str, Any]:
        configs = dict(config) if isinstance(config, Mapping) else {DEFAULT_ADAPTER: config}
        for name, cfg in configs.items():
            check_adapter_name(name)
            tuner_for(cfg)  # raises ConfigError for objects that are no functuner config
        return configs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward; ``adapter_names=[...]`` gives each sample its own adapter (as PEFT)."""
        adapter_names = kwargs.pop("adapter_names", None)
        call = inner_call(self.base_model)  # a forward patched onto the SwiftModel (TRL) runs on the wrapped model
        if adapter_names is None:  # a tuner's loss term (AdaLoRA's regulariser, as PEFT's forward): .training
            return training.outputs(self._state, call(*args, **kwargs))
        with routed(per_sample.mixed_routes(self._state, adapter_names, per_sample.batch_size(args, kwargs))):
            return call(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "forward" or not move_forward_patch(self, self._state.model, value):
            super().__setattr__(name, value)

    # -- SWIFT attributes -----------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The wrapped model (SWIFT's alias of ``base_model``)."""
        return self._state.model

    @property
    def adapters(self) -> dict[str, AdapterEntry]:
        """``{adapter name: adapter}``; each has ``.config``, ``.params`` (live TunerParams) and ``.swift_type``."""
        return self._state.adapters

    @property
    def active_adapters(self) -> set[str]:
        """Names of the adapters active for the calling thread (all threads with ``USE_UNIQUE_THREAD=1``)."""
        return self._state.active_set()

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

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``; ``adapter_names=[...]`` gives each prompt its own adapter.

        With beam search or several returned sequences each name is repeated
        for the prompt's copies (as PEFT does).  Encoder-decoder models with
        more than one copy per prompt are not supported (:class:`ConfigError`).
        """
        adapter_names = kwargs.pop("adapter_names", None)
        inner: Any = self.base_model
        if adapter_names is None:
            return generation.run_generate(self._state, inner.generate, args, kwargs)
        expanded = per_sample.expanded_for_generate(inner, adapter_names, args, kwargs)
        with routed(per_sample.mixed_routes(self._state, expanded, None)):
            return generation.run_generate(self._state, inner.generate, args, kwargs)

    # -- activation -------------------------------------------------------------
    def activate_adapter(self, adapter_name: str, *, strict: bool = False) -> None:
        """Activate one adapter (for the calling thread only with ``USE_UNIQUE_THREAD=0``).

        An offloaded adapter's tensors come back first, bit-identical, on the device they had.
        An unknown name warns and is ignored, as in SWIFT (``strict=True``: :class:`AdapterNameError`).
        """
        if not self._state.known({adapter_name}, strict, "activate_adapter"):
            return
        state = self._state
        adapter = state.require(adapter_name)
        with state.lock:
            placement.reload(state, adapter)
            if state.per_thread:
                ts = state.thread_state(create=True)
                assert ts is not None
                ts.active.add(adapter_name)
                state.version += 1
            else:
                state.active.add(adapter_name)
                state.refresh()

    def deactivate_adapter(self, adapter_name: str, offload: str | None = None, *, strict: bool = False) -> None:
        """Deactivate one adapter; ``offload='cpu'`` moves its tensors to host memory, ``'meta'`` frees them.

        ``'meta'`` keeps a copy on disk (a private cache directory) that
        :meth:`activate_adapter` reads back.  Parameters report the device they
        are on.  Offloading an adapter that another thread still uses, or one
        that is merged, raises :class:`ConfigError`.  An unknown name warns and
        is ignored, as in SWIFT (``strict=True``: :class:`AdapterNameError`).
        """
        if not self._state.known({adapter_name}, strict, "deactivate_adapter"):
            return
        state = self._state
        adapter = state.require(adapter_name)
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
                placement.offload(state, adapter, offload)

    def set_active_adapters(
        self, adapter_names: str | Sequence[str] | None, offload: str | None = None, *, strict: bool = False
    ) -> None:
        """Make exactly ``adapter_names`` active; the others are deactivated (and offloaded if asked).

        Names that are not loaded are ignored with a ``UserWarning``, as SWIFT
        ignores them (the known ones are still set); ``strict=True`` raises
        :class:`AdapterNameError` instead, before anything changes.
        """
        if not adapter_names:
            names: set[str] = set()
        elif isinstance(adapter_names, str):
            names = {adapter_names}
        else:
            names = set(adapter_names)
        names = self._state.known(names, strict, "set_active_adapters")
        state = self._state
        moves = offload is not None or any(state.adapters[n].offload is not None for n in names)
        if not moves:  # a switch: one routes lookup, O(active adapters) (all or nothing: it raises before changing)
            return state.switch_to(names)
        with undo_on_error(state.model, state):  # all or nothing: tensors move, so a full snapshot
            for name in sorted(names):
                self.activate_adapter(name)
            for name in sorted(set(self.adapters) - names):
                self.deactivate_adapter(name, offload)

    # -- optimizer groups ---------------------------------------------------------
    def create_optimizer_param_groups(self, **defaults: Any) -> list[dict[str, Any]]:
        """Optimizer param groups (SWIFT's): each adapter's own groups (LoRA+), then the rest.

        A tuner with its own grouping (LoRA with ``lorap_lr_ratio``: ``lora_A``
        tensors get ``lr``; ``lora_B`` tensors and 1-d tensors get ``lr *
        lorap_lr_ratio`` with / without weight decay; embedding LoRA tensors get
        ``lorap_emb_lr``) supplies it; every other trainable parameter goes to a
        group with ``weight_decay`` or one with 0.0 (no decay for biases and
        norms, as transformers' Trainer).
        """
        return optim.param_groups(self._state, defaults)

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
        """Add ``adapter_name``, a weighted combination of ``adapters`` (PEFT's signature), and activate only it.

        The adapters' tuner combines them (its ``combine`` hook: LoRA's
        :func:`functuner.tuners.lora.combine.add_weighted_adapter`, pure); random
        types (``dare_*``) draw from torch's global RNG, as PEFT does.
        """
        state = self._state
        check_adapter_name(adapter_name)
        if adapter_name in state.adapters:
            raise AdapterNameError(f"adapter {adapter_name!r} already exists")
        chosen = [state.require(n) for n in adapters]
        if not chosen:
            raise ConfigError("add_weighted_adapter needs at least one adapter, got an empty list")
        combine = chosen[0].tuner.combine
        mixed = sorted({a.swift_type for a in chosen})
        if combine is None or len(mixed) > 1:
            raise ConfigError(
                f"add_weighted_adapter combines adapters of one tuner that supports it; got {mixed}"
                f" ({', '.join(f'{a.name}: {a.swift_type}' for a in chosen)})"
            )
        for a in chosen:
            placement.reload(state, a)
        with torch.no_grad():
            new = combine(
                {a.name: a.params.detach() for a in chosen},
                list(weights),
                adapter_name,
                combination_type,
                svd_rank=svd_rank,
                svd_clamp=svd_clamp,
                svd_full_matrices=svd_full_matrices,
                svd_driver=svd_driver,
                density=density,
                majority_sign_method=majority_sign_method,
                generator=placement.global_generator() if combination_type.startswith("dare") else None,
                model=self.model,
                names=list(adapters),
            )
        placement.add_adapters(state, {adapter_name: new.config}, {adapter_name: dict(new)}, trainable=True)
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
        grab: Callable[[torch.Tensor], torch.Tensor] = (lambda t: t) if keep_vars else (lambda t: t.detach())
        return checkpoints.adapter_state_dict(
            self._state,
            adapter_name,
            peft_format,
            grab,
            save_adapter=bool(kwargs.get("save_adapter", True)),
            save_extra=bool(kwargs.get("save_extra_states", True)),
        )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False, adapter_name: str | None = None
    ) -> Any:
        """Load tensors into one adapter (``adapter_name``) strictly, or into the wrapped model.

        With ``adapter_name``: keys may be SWIFT's (adapter name inside) or
        PEFT's (``base_model.model.`` prefix, no adapter name); every tensor of
        the adapter must be present with its shape, else
        :class:`ParamsMismatchError` lists the differences and nothing changes.
        Without: a dict shaped like :meth:`state_dict`'s (adapters' tensors, extra states: what
        ``transformers.Trainer`` saves and reloads on resume) loads into the adapters, all or nothing,
        and the result lists missing keys among those only; any other dict goes to
        ``base_model.load_state_dict(state_dict, strict=False)``.
        """
        if adapter_name is None:
            from .trainer import load_trainer_state  # a dict of SwiftModel.state_dict() (transformers.Trainer resume)

            result = load_trainer_state(self._state, state_dict)
            if result is not None:
                return result
            return self._state.model.load_state_dict(dict(state_dict), strict=False, assign=assign)
        checkpoints.load_into_adapter(self._state, adapter_name, state_dict)
        return None

    # -- saving and loading ------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        adapter_name: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Save adapters in SWIFT's layout (one sub-folder each), ``extra_states/`` and ``configuration.json``.

        Atomic.  ``peft_format=True``: PEFT's layout.  ``safe_serialization=False``: SWIFT's
        tensor-only ``adapter_model.bin`` (with a warning recommending safetensors).  With no
        adapter left (after ``merge_and_unload``), or none with modules of its own (NEFTune),
        the wrapped model is saved with its own ``save_pretrained`` (as SWIFT).  transformers'
        ``is_main_process=False`` writes nothing; its ``state_dict`` is ignored.
        """
        if not kwargs.pop("is_main_process", True):
            return
        if not safe_serialization:
            checkpoints.warn_bin(save_directory)
        kwargs.pop("state_dict", None)
        if not self.adapters and not kwargs.get("peft_format") and adapter_name is None:
            checkpoints.save_wrapped_model(self._state, save_directory, kwargs, safe_serialization)
            return
        peft_format = bool(kwargs.pop("peft_format", False))
        if kwargs:
            raise TypeError(f"save_pretrained got unexpected keyword(s) {sorted(kwargs)}")
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name or self.adapters)
        checkpoints.save(self._state, save_directory, names, peft_format, safe_serialization)

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
        """Load adapters saved in ``model_id`` (a local directory or a hub id) onto ``model``.

        ``adapter_name``: ``None`` (all), a name, a list, or ``{name on disk: new name}``
        (only the adapter-name component of keys changes).  SWIFT and PEFT layouts both
        load here.  As in SWIFT the loaded adapters are trainable and ``inference_mode``
        (default ``True``) only switches to eval mode; ``is_trainable`` (ms-swift's resume
        code passes it) is accepted and ``is_trainable=False`` freezes them (SWIFT ignores
        it).  Also ``extra_state_keys``, ``weights_only`` (accepted; ``.bin`` is always read
        with torch's restricted loader) and the hub's keywords.  Everything is read and
        checked before the model is touched.
        """
        if model_id is None:
            raise CheckpointError("from_pretrained needs model_id (a directory or a hub id)")
        weights_only = bool(kwargs.pop("weights_only", False))
        is_trainable = kwargs.pop("is_trainable", None)
        extra_state_keys = kwargs.pop("extra_state_keys", None)
        hub_kwargs = {k: kwargs.pop(k) for k in ("cache_dir", "local_files_only", "hub") if k in kwargs}
        if kwargs:
            raise TypeError(f"from_pretrained got unexpected keyword(s) {sorted(kwargs)}")
        model_dir = resolve_model_dir(model_id, revision=revision, **hub_kwargs)
        inner = model._state.model if isinstance(model, SwiftModel) else model
        found = checkpoints.read_for_model(inner, model_dir, adapter_name, weights_only, extra_state_keys)
        shim_state = model._state if isinstance(model, SwiftModel) else None
        try:
            with checkpoints.undo_for_load(inner, shim_state, found, inference_mode) as own_p:
                self = cls(
                    model,
                    found.configs,
                    found.extra_state_keys,
                    inference_mode,
                    _loaded_states=found.states,
                    _frozen=is_trainable is not None and not is_trainable,
                )
                with torch.no_grad():
                    for k, v in found.extra.items():
                        own_p[k].copy_(v)
        except FunctunerError as e:  # same type, but naming the checkpoint that does not fit
            raise type(e)(f"checkpoint {model_dir}: {e}") from None
        return self


# ---------------------------------------------------------------------------
# Swift: the static entry points
# ---------------------------------------------------------------------------


class Swift:
    """SWIFT's static entry points, for functuner configs (and PEFT configs/models, passed to peft)."""

    @staticmethod
    def prepare_model(model: nn.Module | SwiftModel, config: Any, **kwargs: Any) -> Any:
        """Wrap ``model`` with the tuner(s) in ``config`` (a config or ``{name: config}``); returns a SwiftModel.

        A ``SwiftModel`` gets the new adapters added.  A PEFT ``PeftConfig``
        goes through ``peft.get_peft_model`` (returns a ``PeftModel``).
        ``prepare_kbit_training=True``: first PEFT's ``prepare_model_for_kbit_training``
        (:func:`functuner.quant.prepare_model_for_kbit_training`) on a quantized base.
        """
        if kwargs.pop("prepare_kbit_training", False) and not isinstance(model, SwiftModel):
            prepare_model_for_kbit_training(model)
        if is_peft_config(config):  # the SWIFT contract: PEFT's configs go through PEFT
            return sys.modules["peft"].get_peft_model(model, config, **kwargs)
        return SwiftModel(model, config, **kwargs)

    @staticmethod
    def merge(model: Any, **kwargs: Any) -> None:
        """Fold every active mergeable adapter into the base weights (exact, atomic; undo with :meth:`unmerge`)."""
        if is_peft_model(model):
            _require_peft_mergeable(model)
            model.merge_adapter(**kwargs)
            return
        state = _require_swift(model)._state
        merging.merge(state, merging.mergeable_active(state))

    @staticmethod
    def unmerge(model: Any, **kwargs: Any) -> None:
        """Restore the exact original base weights after :meth:`merge`."""
        if is_peft_model(model):
            _require_peft_mergeable(model)
            model.unmerge_adapter()
            return
        merging.unmerge(_require_swift(model)._state)

    @staticmethod
    def merge_and_unload(model: Any, adapter_name: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Merge adapters into the base weights permanently and remove them.

        ``adapter_name`` (a name or list) chooses adapters; default: every
        active adapter whose tuner has a merged form (all active LoRA
        adapters); active adapters without one stay, and a ``UserWarning``
        names them and their tuners.  Tied weights are untied where only one
        side changes (so the merged model computes what the adapted one did).
        Returns the ``SwiftModel`` (a ``PeftModel`` returns its unloaded base model).
        """
        if is_peft_model(model):
            _require_peft_mergeable(model)
            if adapter_name is not None:  # PEFT's keyword for the same choice
                kwargs["adapter_names"] = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
            return model.merge_and_unload(**kwargs)
        sm = _require_swift(model)
        merging.merge_and_unload(sm._state, adapter_name)
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
        ckpt.convert_checkpoint(ckpt_dir, output_dir, "peft")  # the same code path as `functuner convert --to peft`

    @staticmethod
    def from_pretrained(
        model: nn.Module | SwiftModel,
        model_id: str,
        adapter_name: Any = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load adapters from a local directory or a hub id, as SWIFT's ``Swift.from_pretrained``.

        A SWIFT directory loads into a ``SwiftModel`` (:meth:`SwiftModel.from_pretrained`).
        A PEFT directory (no ``swift_type``) of any PEFT type goes through peft and a
        ``PeftModel`` is returned, as SWIFT does, after functuner's checks (files, NaN/inf,
        ranks, shapes; every key must load; a failure changes nothing):
        :func:`functuner.shim.checkpoints.load_peft_dir`.  A ``SwiftModel`` takes PEFT
        LoRA directories into itself; PEFT's other types raise for it.
        """
        if model_id is None:
            raise CheckpointError("from_pretrained needs model_id (a directory or a hub id)")
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "hub") if k in kwargs}
        model_dir = resolve_model_dir(model_id, revision=revision, **hub_kwargs)
        into_swift = isinstance(model, SwiftModel)
        native = ckpt.peft_native_adapters(model_dir, adapter_name, lora_too=not into_swift)
        if native is None:
            return SwiftModel.from_pretrained(model, model_dir, adapter_name=adapter_name, revision=revision, **kwargs)
        if into_swift:
            raise CheckpointError(
                f"{model_dir}: PEFT adapters {sorted(native[0])} are of a type only peft implements,"
                " which a SwiftModel cannot hold; pass the plain model (a PeftModel is returned)"
            )
        return checkpoints.load_peft_dir(
            model, model_dir, *native, {k: v for k, v in kwargs.items() if k not in hub_kwargs}
        )


def _require_peft_mergeable(model: Any) -> None:
    """Prompt-learning PeftModels (prompt, prefix, p-tuning) have no merged form: say so instead of an AttributeError."""
    kinds = {name: cfg.peft_type for name, cfg in model.peft_config.items() if cfg.is_prompt_learning}
    if kinds:
        raise ConfigError(f"PEFT adapters {kinds} are prompt learning, which has no merged form")


def _require_swift(model: Any) -> SwiftModel:
    if not isinstance(model, SwiftModel):
        raise TypeError(f"expected a SwiftModel or a PeftModel, got {type(model).__name__}")
    return model
