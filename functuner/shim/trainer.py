"""``transformers.Trainer`` (and its subclasses, e.g. TRL's) checkpoints of a ``SwiftModel``.

Design note: the Trainer saves a model that is neither a ``PreTrainedModel`` nor a
``peft.PeftModel`` (its ``supported_classes``, a closed tuple) as a bare
``model.safetensors`` of ``model.state_dict()``, and resumes with
``model.load_state_dict(state_dict, False)``.  Both calls are the shim's:
``SwiftModel.state_dict()`` is exactly the adapters' tensors (SWIFT's names) and
:func:`load_trainer_state` loads such a dict into the live adapters, all or
nothing, reporting missing keys only among the adapters' own (so resuming logs no
"missing keys" for the frozen base model).  What the Trainer cannot write, the
adapter config, comes from :class:`SwiftCheckpointCallback` (the Trainer's
supported extension point): after each checkpoint it writes the adapter
directory into ``checkpoint-N/``, in PEFT's layout when every adapter has a PEFT
form (so ``peft.PeftModel.from_pretrained`` loads it too), else SWIFT's.
``trainer.save_model()`` has no callback event: :class:`SwiftTrainerMixin` (an
override of the Trainer's ``_save``) covers it and every checkpoint.

Preference trainers (TRL's ``DPOTrainer``) need a *reference model*.  With a
``PeftModel`` TRL uses the policy with its adapter disabled (``disable_adapter()``),
but it recognises PEFT by class, so a ``SwiftModel`` would get a second copy of the
base weights loaded from ``config._name_or_path``.  :func:`reference_model`
gives TRL's ``ref_model=`` the reference PEFT's paths compute, without copying the
base weights: the wrapped model's modules, called with every adapter off (or with a
frozen copy of the adapters) for that call only, through per-call routes, so the
policy's active set is never touched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ..core.params import TunerParams
from ..core.routing import Routes, routed
from ..errors import CheckpointError, ConfigError, FunctunerError
from ..functional import bind_routes
from ..io import checkpoint as ckpt
from ..io import keys
from .checkpoints import extra_states, load_into_adapter
from .state import ShimState
from .undo import undo_on_error

__all__ = [
    "LoadResult",
    "REFERENCE_KINDS",
    "ReferenceCall",
    "SwiftCheckpointCallback",
    "SwiftTrainerMixin",
    "adapter_keys",
    "has_peft_form",
    "load_trainer_state",
    "reference_model",
    "save_adapters",
]


class LoadResult(NamedTuple):
    """What ``load_state_dict`` returns (the fields of torch's result, which the Trainer reads)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def adapter_keys(state: ShimState) -> dict[str, set[str]]:
    """``{adapter name: its keys in SwiftModel.state_dict()}`` (SWIFT's on-disk names)."""
    return {
        name: set(keys.to_disk({k: v.detach() for k, v in a.tensors.items()}, a.config, name, "swift"))
        for name, a in state.adapters.items()
    }


def load_trainer_state(state: ShimState, values: Mapping[str, torch.Tensor]) -> LoadResult | None:
    """Load a ``SwiftModel.state_dict()``-shaped dict into the live adapters and extra states (all or nothing).

    Returns torch's ``(missing_keys, unexpected_keys)`` over the adapters' and extra
    states' keys, or ``None`` when ``values`` is not such a dict (a full model state
    dict: the caller loads it into the wrapped model).
    """
    per_adapter = adapter_keys(state)
    extra = extra_states(state)
    known = set(extra).union(*per_adapter.values()) if per_adapter else set(extra)
    if not values or not set(values) <= known:
        return None
    missing = sorted(known - set(values))
    own = dict(state.model.state_dict(keep_vars=True))
    with undo_on_error(state.model, state, overwritten=[own[k] for k in extra if k in values]):
        for name, names in per_adapter.items():
            if names <= set(values):
                load_into_adapter(state, name, {k: values[k] for k in names})
        with torch.no_grad():
            for k in extra:
                if k in values:
                    own[k].copy_(values[k])
    return LoadResult(missing, [])


def has_peft_form(state: ShimState) -> bool:
    """Whether every adapter can be written in PEFT's layout (its tuner has a PEFT config form)."""
    if state.extra_state_keys:
        return False
    try:
        for a in state.adapters.values():
            ckpt.peft_config_json(a.config)
    except (FunctunerError, AssertionError):
        return False
    return True


try:  # transformers is optional for functuner; the callback needs it
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is installed wherever a Trainer runs
    _CallbackBase = object  # type: ignore[assignment,misc]


class SwiftCheckpointCallback(_CallbackBase):
    """Write the adapter directory (configs and tensors) into every ``checkpoint-N/`` the Trainer saves.

    Pass it to any ``transformers.Trainer`` (or subclass: TRL's trainers) training a
    ``SwiftModel``: ``Trainer(model=sm, ..., callbacks=[SwiftCheckpointCallback()])``.
    ``checkpoint-N/`` then loads with ``Swift.from_pretrained(model, dir)`` and, when every
    adapter has a PEFT form (LoRA), with ``peft.PeftModel.from_pretrained(model, dir)``;
    ``resume_from_checkpoint`` keeps working (the Trainer's own ``model.safetensors`` is kept).
    ``peft_format`` forces a layout (``None``: PEFT's when possible).
    """

    def __init__(self, peft_format: bool | None = None) -> None:
        self.peft_format = peft_format

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if not _is_shim(model) or not getattr(args, "should_save", True):
            return control
        out = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(out):
            raise CheckpointError(f"{out}: the Trainer's checkpoint directory is missing; cannot add the adapters")
        save_adapters(model, out, self.peft_format)
        return control


def _is_shim(model: Any) -> bool:
    """Whether ``model`` is a ``SwiftModel`` (recognised by its shim state, so this module need not import the class)."""
    return isinstance(getattr(model, "__dict__", {}).get("_state"), ShimState)


def save_adapters(model: Any, directory: str | os.PathLike[str], peft_format: bool | None = None) -> None:
    """``model.save_pretrained(directory)`` in PEFT's layout when every adapter has one (``peft_format=None``)."""
    fmt = has_peft_form(model._state) if peft_format is None else peft_format
    model.save_pretrained(directory, peft_format=fmt)


class SwiftTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass so ``save_model()`` writes adapter directories too.

    ``class MyTrainer(SwiftTrainerMixin, transformers.Trainer): pass`` (or with TRL's
    ``SFTTrainer``): every ``_save`` (``trainer.save_model()`` and each ``checkpoint-N/``)
    writes the Trainer's files and, for a ``SwiftModel``, its adapter directory
    (PEFT's layout when every adapter has one).  No callback is needed then.
    """

    model: Any
    args: Any

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        if _is_shim(self.model) and self.args.should_save:
            save_adapters(self.model, output_dir if output_dir is not None else self.args.output_dir)


class ReferenceCall:
    """Mixed before the wrapped model's class: every call runs with the reference's own routes (see
    :func:`reference_model`): none (adapters disabled) or a frozen copy of the adapters."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        frozen: list[TunerParams] = self.__dict__["_functuner_frozen"]
        routes = bind_routes(self.__dict__["_functuner_inner"], frozen) if frozen else Routes()
        with routed(routes):  # this call's routes: the policy's active adapters are not consulted
            return super().__call__(*args, **kwargs)  # type: ignore[misc]


_REFERENCE_CLASSES: dict[type, type] = {}
# a module's tables that the view gets its own copies of (hooks registered or modules added on it stay on it)
_OWN_TABLES = (
    "_parameters",
    "_buffers",
    "_modules",
    "_non_persistent_buffers_set",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
REFERENCE_KINDS = ("disabled", "frozen")


def reference_model(model: Any, adapters: str = "disabled") -> torch.nn.Module:
    """A reference model for TRL's preference trainers, sharing ``model``'s (a ``SwiftModel``'s) base weights.

    ``adapters="disabled"``: the base model, every adapter off, as TRL computes it for a ``PeftModel`` it made
    from ``peft_config=`` (``with model.disable_adapter():``).  ``adapters="frozen"``: the active adapters as
    they are now, frozen (detached copies of the adapter tensors only), as TRL computes it for a ``PeftModel``
    passed with a pretrained adapter (a frozen ``"ref"`` copy of it).  Use:
    ``DPOTrainer(model=sm, ref_model=functuner.reference_model(sm), ...)``.

    The result is a new object of the wrapped model's class (TRL patches its ``forward`` and reads its
    ``config``) whose submodules, parameters and buffers *are* the wrapped model's: the base weights are
    never copied.  Each call sets its own routes, so it is thread-safe and never touches the policy's active
    adapters.  Train/eval mode and dropout settings are the shared modules' own (TRL sets them for both).
    """
    if not _is_shim(model):
        raise ConfigError(
            f"reference_model needs a SwiftModel, got {type(model).__name__}; with a peft.PeftModel TRL"
            " builds its reference itself (pass no ref_model)"
        )
    if adapters not in REFERENCE_KINDS:
        raise ConfigError(f"reference_model(adapters={adapters!r}): use one of {list(REFERENCE_KINDS)}")
    state: ShimState = model._state
    inner = state.model
    frozen: list[TunerParams] = []
    if adapters == "frozen":
        active = state.active_set()
        for name, a in state.adapters.items():
            if name in active and name not in state.merged:
                frozen.append(a.params.map(lambda t: t.detach().clone()))
    base = type(inner)
    cls = _REFERENCE_CLASSES.get(base)
    if cls is None:
        cls = _REFERENCE_CLASSES[base] = type(f"Reference{base.__name__}", (ReferenceCall, base), {})
    view: torch.nn.Module = object.__new__(cls)
    d = dict(inner.__dict__)
    d.pop("forward", None)  # a patch installed on the wrapped model (TRL's, moved there by the shim) is the policy's
    for name in _OWN_TABLES:
        if name in d:
            d[name] = d[name].copy()
    d["_functuner_frozen"] = frozen
    d["_functuner_inner"] = inner
    view.__dict__.update(d)
    return view
