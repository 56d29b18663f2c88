"""LoRA on disk: PEFT's ``adapter_config.json`` and key names, SWIFT's key quirks, and file checks against a model.

These are the LoRA implementations of the disk-layer hooks of
:class:`~functuner.tuners.base.Tuner` (``to_swift_keys``, ``from_swift_keys``,
``key_naming``, ``peft``, ``check_model``, ``check_state``); the disk layer
(:mod:`functuner.io`) calls them and knows nothing about LoRA itself.

* SWIFT's files keep LoRA keys as in memory, except a trainable bias of an
  adapted module, which SWIFT's layer keeps at ``<module>.base_layer.bias``.
* PEFT's files drop the adapter name (``<module>.lora_A.weight``,
  ``<module>.lora_magnitude_vector``, ``<module>.lora_embedding_A``) and also
  keep adapted biases at ``<module>.base_layer.bias``; its config is LoRA's
  fields plus ``peft_type``, without SWIFT-only fields.  PEFT wraps the
  ``out_proj`` of an adapted ``nn.MultiheadAttention`` inside the attention's
  wrapper (``<mha>.base_layer.out_proj.lora_A.weight``); functuner names it by
  the real module path (``<mha>.out_proj``).  SWIFT-only fields that
  change the weights or the forward are refused rather than dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from ...core.targets import match_name, own_named_modules, select_modules
from ...errors import CheckpointError, ConfigError, ParamsMismatchError, TargetError
from ..base import KeyNaming, PeftFormat, resolve_dtype
from .config import LoRAConfig
from .keys import BARE_PARTS, LORA_PARTS, MONTECLORA_PART, parse_key
from .layout import expected_shapes, in_out_features, layer_kind
from .tokens import DELTA_PART, parse_token_key, token_key

__all__ = [
    "KEY_NAMING",
    "PEFT_FORMAT",
    "check_json",
    "check_model",
    "check_state",
    "from_peft_keys",
    "from_swift_keys",
    "peft_config_json",
    "to_peft_keys",
    "to_swift_keys",
]

KEY_NAMING = KeyNaming(after=(*LORA_PARTS, "trainable_tokens_delta"))

# SWIFT-only LoRA fields that do not change the weights or the forward (training hyper-parameters):
# dropped when writing PEFT's format.  Any other SWIFT-only field at a non-default value is refused
# (SwiftConfig's model_key_mapping included: PEFT's format cannot keep it).
_SWIFT_ONLY_TRAINING_FIELDS = ("lorap_lr_ratio", "lorap_emb_lr")
_SWIFT_ONLY_FIELDS = ("lora_dtype", "use_qa_lora", "use_merged_linear", "enable_lora", "model_key_mapping")
_A_PARTS = ("lora_A", "lora_embedding_A")


def _has_peft_equivalent(name: str, value: Any) -> bool:
    """Whether SWIFT-only field ``name`` at ``value`` is what PEFT does by default, so the format can drop it.

    ``lora_dtype`` fp32: PEFT's ``autocast_adapter_dtype=True`` (its default) keeps adapters in fp32 on
    half-precision and quantized bases, and an fp32 base has fp32 adapters anyway.
    """
    if name != "lora_dtype":
        return False
    try:
        return resolve_dtype(value, name) == torch.float32
    except ConfigError:
        return False


_MAGNITUDE = "lora_magnitude_vector"
# a rank whose factors fit in this many elements is never refused as corrupt, however small the model
_RANK_FLOOR_ELEMENTS = 1 << 24


def _adapted_modules(keys: Any, adapter_name: str | None) -> set[str]:
    """Modules holding an ``A`` factor of ``adapter_name`` (``None``: PEFT's name-less spelling)."""
    out = set()
    for k in keys:
        lk = parse_key(k)
        if lk is not None and lk.part in _A_PARTS and lk.adapter == adapter_name:
            out.add(lk.module)
    return out


# ---------------------------------------------------------------------------
# SWIFT's key names
# ---------------------------------------------------------------------------
def to_swift_keys(state: Mapping[str, torch.Tensor], config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """functuner names -> SWIFT's: an adapted module's trainable bias goes to ``<module>.base_layer.bias``. Pure."""
    adapted = _adapted_modules(state, adapter_name)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".bias") and key[: -len(".bias")] in adapted:
            key = key[: -len(".bias")] + ".base_layer.bias"
        out[key] = value
    return out


def from_swift_keys(state: Mapping[str, torch.Tensor], config: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """SWIFT's names -> functuner's (inverse of :func:`to_swift_keys`). Pure."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".base_layer.bias"):
            key = key[: -len(".base_layer.bias")] + ".bias"
        out[key] = value
    return out


# ---------------------------------------------------------------------------
# PEFT's format
# ---------------------------------------------------------------------------
def peft_config_json(config: Any) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for a LoRA config; :class:`CheckpointError` naming the field PEFT cannot hold.

    SWIFT-only fields that change the model (``lora_dtype`` bf16/fp16...) are refused rather than dropped;
    ``lora_dtype`` fp32 is PEFT's default (``autocast_adapter_dtype=True``) and LoRA+ learning-rate fields
    (training only) are dropped.
    """
    data = config.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    for name in _SWIFT_ONLY_FIELDS:
        if data.get(name) != defaults.get(name) and not _has_peft_equivalent(name, data.get(name)):
            raise CheckpointError(
                f"LoRA field {name}={data[name]!r} has no PEFT counterpart; PEFT's format cannot hold it"
                f" (keep SWIFT's format, or set {name}={defaults.get(name)!r})"
            )
    # base_fingerprint: functuner's PiSSA/OLoRA/CorDA guard (.inits.guard); PEFT warns on unknown fields, so it stays out
    for name in (*_SWIFT_ONLY_FIELDS, *_SWIFT_ONLY_TRAINING_FIELDS, "swift_type", "base_fingerprint"):
        data.pop(name, None)
    data["peft_type"] = "LORA"
    return cast(dict[str, Any], data)


def check_json(data: Mapping[str, Any], source: str) -> None:
    """Refuse a raw SWIFT LoRA config whose SWIFT-only fields PEFT's format cannot hold (:class:`CheckpointError`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(LoRAConfig) if f.default is not dataclasses.MISSING}
    for name in _SWIFT_ONLY_FIELDS:
        value = data.get(name, defaults.get(name))
        if value not in (defaults.get(name), None, False, "None") and not _has_peft_equivalent(name, value):
            raise CheckpointError(
                f"{source}: LoRA field {name}={value!r} has no PEFT counterpart; PEFT's format cannot hold it"
            )


def _peft_module_path(module: str, adapted: set[str]) -> str:
    """PEFT's path of an adapted module: an ``out_proj`` inside an adapted module (``nn.MultiheadAttention``) sits
    under that module's wrapper, ``<mha>.base_layer.out_proj``, in PEFT's names."""
    parent, _, leaf = module.rpartition(".")
    if leaf == "out_proj" and parent in adapted:
        return f"{parent}.base_layer.out_proj"
    return module


def to_peft_keys(state: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """functuner names -> PEFT's on-disk names without the ``base_model.model.`` prefix. Pure.

    A key of another adapter, or one that is no LoRA tensor or bias, raises
    :class:`CheckpointError` naming it.
    """
    adapted = _adapted_modules(state, adapter_name)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        lk = parse_key(key)
        new: str | None = None
        if lk is not None and lk.adapter == adapter_name:
            module = _peft_module_path(lk.module, adapted)
            head = f"{module}.{lk.part}" if module else lk.part
            new = head + (".bias" if lk.bias else ".weight" if lk.weight and lk.part != _MAGNITUDE else "")
            new += f".{lk.leaf}" if lk.leaf else ""  # MonteCLoRA's sampler tensors
        elif lk is None and key.endswith(".bias"):
            mod = key[: -len(".bias")]
            new = f"{mod}.base_layer.bias" if mod in adapted else key
        tk = parse_token_key(key)
        if tk is not None and tk.adapter == adapter_name:  # trainable tokens: PEFT's files drop the adapter name
            new = f"{tk.module}.{DELTA_PART}"
        if new is None:
            raise CheckpointError(
                f"key {key!r} is not a tensor of LoRA adapter {adapter_name!r}; cannot name it for PEFT"
            )
        out[new] = value
    return out


def from_peft_keys(state: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's on-disk names (prefix removed) -> functuner names for adapter ``adapter_name``. Pure."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        lk = parse_key(key)
        new: str | None = None
        if lk is not None and lk.adapter is None:
            module = lk.module.replace(".base_layer.", ".")  # PEFT's nested wrappers (MHA's out_proj)
            head = f"{module}.{lk.part}" if module else lk.part
            new = f"{head}.{adapter_name}" + (".bias" if lk.bias else "" if lk.part in BARE_PARTS else ".weight")
            if lk.leaf:  # MonteCLoRA's sampler tensors
                new = f"{head}.{adapter_name}.{lk.leaf}"
        elif (tk := parse_token_key(key)) is not None and tk.adapter is None:
            new = token_key(tk.module, adapter_name)
        elif lk is None and key.endswith(".base_layer.bias"):
            new = key[: -len(".base_layer.bias")] + ".bias"
        elif lk is None and key.endswith(".bias"):
            new = key
        if new is None:
            raise CheckpointError(f"PEFT key 'base_model.model.{key}' is not a LoRA tensor functuner knows how to load")
        out[new] = value
    return out


PEFT_FORMAT = PeftFormat(
    peft_type="LORA",
    config_to_json=peft_config_json,
    to_keys=to_peft_keys,
    from_keys=from_peft_keys,
    check_json=check_json,
)


# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------
def check_model(model: nn.Module, config: Any, source: str) -> None:
    """Refuse a config whose rank would make a layer's factors larger than the whole model (:class:`CheckpointError`).

    Checked before any tensor is allocated, so a config from a stranger with
    ``r=10**9`` fails at once instead of exhausting memory.  Any rank that
    fits is valid, also one larger than a layer's dimensions (wasteful, but
    PEFT accepts it and its test table uses ``r=8`` on a ``5 -> 1`` layer):
    only factors holding more elements than the base model itself (at least
    :data:`_RANK_FLOOR_ELEMENTS`) are refused as corrupt.
    """
    try:
        selected = (
            select_modules(
                model,
                config.target_modules,
                exclude_modules=config.exclude_modules,
                layers_to_transform=config.layers_to_transform,
                layers_pattern=config.layers_pattern,
            )
            if config.target_modules is not None or not getattr(config, "target_parameters", None)
            else []
        )
    except TargetError as e:
        raise TargetError(f"{source}: {e}") from None
    # the base model's own parameters (not adapters loaded beside it: a load must not grow with their number)
    own = {id(p): p.numel() for _, m in own_named_modules(model) for p in m._parameters.values() if p is not None}
    limit = max(_RANK_FLOOR_ELEMENTS, sum(own.values()))
    for name, module in selected:
        if config.modules_to_save and match_name(name, config.modules_to_save):
            continue
        r = config.rank_for(name)
        kind = layer_kind(module, name)
        a_shape, b_shape, _ = expected_shapes(module, kind, r)
        size = math.prod(a_shape) + math.prod(b_shape)
        if size > limit:
            fan_in, fan_out = in_out_features(module, kind)
            raise CheckpointError(
                f"{source}: field r={r} gives layer {name!r} ({fan_in} in, {fan_out} out) LoRA factors of {size}"
                f" elements, more than the whole model ({limit}); the checkpoint is corrupt or not for this model"
            )


def check_state(config: Any, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse LoRA tensors that contradict their own config, before any model is involved.

    ``source`` is the ``adapter_config.json`` read.  Integer or bool factors
    raise :class:`ParamsMismatchError` (they would be cast into nonsense
    weights); a factor whose rank is not the config's ``r`` (or
    ``rank_pattern``'s), or a non-finite scaling (``lora_alpha``: ``Infinity``),
    raises :class:`CheckpointError` naming the field.
    """
    for key, t in state.items():
        lk = parse_key(key)
        if lk is None:
            continue
        if not (t.is_floating_point() or t.is_complex()):
            raise ParamsMismatchError(
                f"{source}: tensor {key!r} has dtype {str(t.dtype).replace('torch.', '')}; LoRA tensors must be"
                " floating point (the weights file is corrupt)"
            )
        if lk.part in (_MAGNITUDE, MONTECLORA_PART) or t.dim() < 2:
            continue
        r = config.rank_for(lk.module)
        found = t.shape[0] if lk.part in _A_PARTS else t.shape[1]
        grouped_b = lk.part == "lora_B" and t.dim() > 2 and found > 0 and r % found == 0  # (out, r / groups, 1...)
        experts = bool(getattr(config, "target_parameters", None)) and found % r == 0  # fused experts: r * E
        bd: Any = getattr(config, "use_bdlora", None)  # BD-LoRA stores a block-diagonal B as (out, r / nblocks)
        blocked_b = bd is not None and lk.part == "lora_B" and found * int(bd["nblocks"]) == r
        if found != r and not grouped_b and not experts and not blocked_b:
            raise CheckpointError(
                f"{source}: field r={r} (for {lk.module!r}) does not match tensor {key!r} of rank {found}"
                f" (shape {list(t.shape)}); the config and the weights are not from the same adapter"
            )
        scaling = config.scaling_for(lk.module)
        if not math.isfinite(scaling):
            raise CheckpointError(
                f"{source}: field lora_alpha={config.alpha_for(lk.module)!r} gives scaling {scaling!r} for"
                f" {lk.module!r}; LoRA's scaling must be finite"
            )
