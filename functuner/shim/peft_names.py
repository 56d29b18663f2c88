"""PEFT's model-level names on ``SwiftModel``, with PEFT's semantics mapped onto the shim's state.

Design note: code written for ``peft.PeftModel`` (and transformers' own PEFT
integration, ``transformers.integrations.peft.PeftAdapterMixin``) calls
``set_adapter``, ``add_adapter``, ``load_adapter``, ``print_trainable_parameters``...
on the model.  Without these methods ``SwiftModel.__getattr__`` would hand the
call to the wrapped transformers model, whose PEFT integration then fails with a
confusing message or, worse, injects real PEFT layers under the shim.  So every
name of that mixin is defined here: implemented with PEFT's meaning (which
adapters are active and trainable, what is returned), or refused with a
:class:`~functuner.errors.ConfigError` that says what to use instead.  Nothing is
forwarded.  PEFT differences kept on purpose: ``active_adapters`` stays SWIFT's
``set`` (use :attr:`PeftNames.active_adapter` for PEFT's single name).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.hub import resolve_model_dir
from ..core.naming import check_adapter_name
from ..core.routing import remove_slots
from ..errors import AdapterNameError, ConfigError
from ..io import checkpoint as ckpt
from ..io import keys
from ..io.peft import is_peft_config
from ..tuners import tuner_for
from . import merging, placement
from .state import AdapterEntry, ShimState

__all__ = ["PEFT_MIXIN_NAMES", "PeftNames", "to_peft_config"]

#: every public or private name of ``transformers.integrations.peft.PeftAdapterMixin`` (transformers 5.x);
#: each is defined on :class:`PeftNames` so none falls through to the wrapped model.
PEFT_MIXIN_NAMES = (
    "_hf_peft_config_loaded",
    "_prepare_peft_hotswap_kwargs",
    "load_adapter",
    "enable_peft_hotswap",
    "add_adapter",
    "set_adapter",
    "disable_adapters",
    "enable_adapters",
    "active_adapters",
    "get_adapter_state_dict",
    "_dispatch_accelerate_model",
    "delete_adapter",
)


def _refuse(name: str, instead: str) -> ConfigError:
    return ConfigError(
        f"SwiftModel.{name} is transformers' PEFT integration, which a SwiftModel does not use; {instead}"
    )


class PeftNames(nn.Module):
    """Base of :class:`~functuner.shim.swift.SwiftModel`: PEFT's and transformers' adapter methods."""

    _state: ShimState

    if TYPE_CHECKING:  # defined by SwiftModel

        @property
        def adapters(self) -> dict[str, AdapterEntry]: ...

        @property
        def active_adapters(self) -> set[str]: ...

        def set_active_adapters(
            self, adapter_names: str | Sequence[str] | None, offload: str | None = None, *, strict: bool = False
        ) -> None: ...

        def activate_adapter(self, adapter_name: str, *, strict: bool = False) -> None: ...

    #: transformers checks this flag to treat a model as one with PEFT adapters loaded by its own integration
    _hf_peft_config_loaded = False

    # -- counting ------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, adapters included (PEFT's)."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            if n == 0 and hasattr(p, "ds_numel"):
                n = int(p.ds_numel)
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: ``trainable params: T || all params: A || trainable%: P``."""
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    # -- which adapters are active and trained ------------------------------------
    @property
    def active_adapter(self) -> str | list[str] | None:
        """PEFT's ``active_adapter``: the name when one adapter is active, the sorted names when several, else None."""
        names = sorted(self.active_adapters)
        if not names:
            return None
        return names[0] if len(names) == 1 else names

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make exactly ``adapter_name`` active (PEFT): its tensors trainable unless ``inference_mode``, the others frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self.set_active_adapters(names, strict=True)  # PEFT raises for a name that is not loaded
        for n, a in self._state.adapters.items():
            for p in a.tensors.values():
                p.requires_grad_(n in names and not inference_mode)

    def _keep_inactive(self, names: set[str]) -> None:
        """Undo the activation that adding adapters does, in every thread (PEFT adds and loads adapters inactive)."""
        state = self._state
        with state.lock:
            for ts in list(state.thread_states):
                ts.active.difference_update(names)
            state.active.difference_update(names)
            state.refresh()

    def add_adapter(self, adapter_name: Any, peft_config: Any = None, **kwargs: Any) -> None:
        """Add a new, inactive, frozen adapter (PEFT's ``add_adapter(adapter_name, config)``; activate with ``set_adapter``).

        transformers' order ``add_adapter(config, adapter_name=None)`` is accepted too.
        ``low_cpu_mem_usage`` and ``autocast_adapter_dtype`` are accepted and ignored.
        """
        if not isinstance(adapter_name, str):  # transformers' order: (config, adapter_name)
            adapter_name, peft_config = peft_config or "default", adapter_name
        kwargs.pop("low_cpu_mem_usage", None)
        kwargs.pop("autocast_adapter_dtype", None)
        if kwargs:
            raise TypeError(f"add_adapter got unexpected keyword(s) {sorted(kwargs)}")
        if is_peft_config(peft_config):
            raise ConfigError(
                f"add_adapter({adapter_name!r}, ...) got a PEFT {type(peft_config).__name__}; a SwiftModel holds"
                " functuner adapters: pass a functuner config (LoRAConfig(...)), or use peft.get_peft_model for PEFT"
            )
        check_adapter_name(adapter_name)
        tuner_for(peft_config)
        placement.add_adapters(self._state, {adapter_name: peft_config}, {}, trainable=False)
        self._keep_inactive({adapter_name})

    def load_adapter(
        self,
        model_id: str | os.PathLike[str] | None = None,
        adapter_name: str | None = None,
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load the adapter saved in ``model_id`` as ``adapter_name`` (PEFT): inactive, frozen unless ``is_trainable``.

        The directory must hold one adapter (PEFT's layout or SWIFT's), or one
        called ``adapter_name``.  ``torch_device``, ``autocast_adapter_dtype``,
        ``ephemeral_gpu_offload`` and ``low_cpu_mem_usage`` are accepted and ignored;
        ``revision``, ``cache_dir``, ``local_files_only`` and ``weights_only`` as in ``from_pretrained``.
        """
        if model_id is None:  # transformers' keyword
            model_id = kwargs.pop("peft_model_id", None)
        if model_id is None:
            raise ConfigError("load_adapter needs model_id (a directory or a hub id)")
        adapter_name = adapter_name or "default"
        for k in ("torch_device", "autocast_adapter_dtype", "ephemeral_gpu_offload", "low_cpu_mem_usage"):
            kwargs.pop(k, None)
        check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise AdapterNameError(f"adapter {adapter_name!r} already exists; choose another adapter_name")
        revision = kwargs.pop("revision", None)
        hub = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "hub") if k in kwargs}
        model_dir = resolve_model_dir(str(model_id), revision=revision, **hub)
        on_disk = ckpt.list_adapters(model_dir)
        if len(on_disk) == 1:
            source = next(iter(on_disk))
        elif adapter_name in on_disk:
            source = adapter_name
        else:
            raise ConfigError(
                f"{model_dir}: holds adapters {sorted(on_disk)}; load_adapter loads one: pass adapter_name="
                f" one of them, or use Swift.from_pretrained(model, {str(model_dir)!r}) to load them all"
            )
        type(self).from_pretrained(  # type: ignore[attr-defined]  # SwiftModel.from_pretrained: its base
            self,
            model_dir,
            adapter_name={source: adapter_name},
            inference_mode=not is_trainable,
            is_trainable=is_trainable,
            **kwargs,
        )
        self._keep_inactive({adapter_name})
        if not is_trainable:
            self.eval()

    def delete_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Delete adapter(s); if an active one goes, the first remaining adapter becomes active (PEFT, with a warning)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        state = self._state
        for n in names:
            state.require(n)
            if n in state.merged:
                raise ConfigError(f"adapter {n!r} is merged; call Swift.unmerge(model) before deleting it")
        was_active = self.active_adapters
        with state.lock:
            for n in names:
                placement.delete_adapter(state, n)
        if was_active & set(names) and not self.active_adapters and state.adapters:
            new = next(iter(state.adapters))
            warnings.warn(
                f"adapter(s) {sorted(was_active & set(names))} were active and are deleted; activating {new!r}",
                UserWarning,
                stacklevel=2,
            )
            self.activate_adapter(new)

    def enable_adapters(self) -> None:
        """Undo :meth:`disable_adapters` (transformers): the adapters active before it are active again."""
        saved = self._state.__dict__.pop("disabled_active", None)
        if saved is not None:
            self.set_active_adapters(sorted(saved & set(self.adapters)))

    def disable_adapters(self) -> None:
        """Run the base model until :meth:`enable_adapters` (transformers); ``disable_adapter()`` is the block form."""
        self._state.__dict__.setdefault("disabled_active", self.active_adapters)
        self.set_active_adapters([])

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside the block; the previous active set is restored afterwards."""
        before = self.active_adapters
        try:
            self.set_active_adapters([])
            yield
        finally:
            self.set_active_adapters(sorted(before))

    # -- SWIFT's report ------------------------------------------------------------------------
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

    # -- PEFT's view of the model --------------------------------------------------
    def get_base_model(self) -> nn.Module:
        """The wrapped model (PEFT's ``get_base_model``): its adapted modules carry the shim's slots."""
        return self._state.model

    def merge_and_unload(
        self,
        adapter_name: str | Sequence[str] | None = None,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
    ) -> nn.Module:
        """Merge adapters into the base weights, remove them, and return the wrapped model (PEFT's ``merge_and_unload``).

        ``adapter_name`` (SWIFT) or ``adapter_names`` (PEFT) choose adapters (default: every active
        mergeable adapter; see :meth:`Swift.merge_and_unload`).  ``Swift.merge_and_unload(model)``
        returns the ``SwiftModel`` instead, as SWIFT does.
        """
        merging.merge_and_unload(self._state, adapter_names if adapter_names is not None else adapter_name)
        return self._state.model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the wrapped model as it was (PEFT's ``unload``)."""
        state = self._state
        if state.merged:
            merging.unmerge(state)
        with state.lock:
            for n in list(state.adapters):
                placement.delete_adapter(state, n)
        remove_slots(state.model)
        return state.model

    def get_adapter_state_dict(
        self, adapter_name: str | None = None, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """One adapter's tensors with transformers' PEFT-integration names (no adapter name, no ``base_model.model.``)."""
        if state_dict is not None:
            raise _refuse("get_adapter_state_dict(state_dict=...)", "call model.state_dict(adapter_name=...) instead")
        name = adapter_name or self.active_adapter
        if not isinstance(name, str):
            raise ConfigError(f"get_adapter_state_dict needs adapter_name (active adapters: {name})")
        adapter = self._state.require(name)
        tensors = {k: v.detach() for k, v in adapter.tensors.items()}
        peft = keys.to_disk(tensors, adapter.config, name, "peft")
        return {k.removeprefix(keys.PEFT_PREFIX): v for k, v in peft.items()}

    # -- refused: transformers' PEFT plumbing that has no meaning for the shim ----
    def enable_peft_hotswap(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse("enable_peft_hotswap", "load adapters with load_adapter and switch with set_adapter")

    def _prepare_peft_hotswap_kwargs(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse("_prepare_peft_hotswap_kwargs", "load adapters with load_adapter and switch with set_adapter")

    def _dispatch_accelerate_model(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse("_dispatch_accelerate_model", "place the wrapped model with accelerate before wrapping it")


def to_peft_config(config: Any) -> Any:
    """The ``peft.PeftConfig`` equal to a functuner ``config`` (PEFT's ``adapter_config.json`` of it, as an object).

    For ``SFTTrainer(peft_config=...)`` and ``peft.get_peft_model``.  Lossless: a config
    with fields PEFT cannot express raises :class:`~functuner.errors.FunctunerError`
    naming them (the same check as saving in PEFT's layout).
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    data = dict(ckpt.peft_config_json(config))
    peft_type = data.pop("peft_type")
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**data)
