"""Every PEFT/SWIFT key renaming, both directions, in one place.

Three namings of the same tensors:

* **functuner / SWIFT** (in memory and in SWIFT's ``adapter_model.safetensors``):
  relative to the original model, with the adapter name inside:
  ``model.layers.0.q_proj.lora_A.default.weight``.
* **PEFT in memory**: the same with the ``base_model.model.`` prefix (and
  ``base_layer`` for wrapped originals).
* **PEFT on disk** (``get_peft_model_state_dict``): prefix, adapter name removed,
  ``lora_magnitude_vector`` without ``.weight``, biases of adapted modules at
  ``<module>.base_layer.bias``, ``modules_to_save`` copies at the original
  module's keys.

All functions are pure string/dict transforms: tensors are passed through
untouched (same objects).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import CheckpointError

__all__ = [
    "PEFT_PREFIX",
    "from_peft_state_dict",
    "from_swift_state_dict",
    "rename_adapter",
    "to_peft_state_dict",
    "to_swift_state_dict",
]

PEFT_PREFIX = "base_model.model."

_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _adapted_modules(keys: list[str], adapter_name: str) -> set[str]:
    out = set()
    for k in keys:
        for part in ("lora_A", "lora_embedding_A"):
            marker = f".{part}.{adapter_name}"
            i = k.find(marker)
            if i >= 0 and (k.endswith(marker) or k.endswith(marker + ".weight")):
                out.add(k[:i])
    return out


def to_peft_state_dict(state: Mapping[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """functuner/SWIFT names of one LoRA adapter -> PEFT's on-disk names.

    Keys that carry another adapter's name are an error (a checkpoint holds one
    adapter per PEFT directory).
    """
    keys = list(state)
    adapted = _adapted_modules(keys, adapter_name)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = None
        for part in _LORA_PARTS:
            marker = f".{part}.{adapter_name}"
            if key.endswith(marker):
                new = key[: -len(marker)] + f".{part}"
            elif key.endswith(marker + ".weight"):
                new = key[: -len(marker + ".weight")] + f".{part}" + ("" if part == "lora_magnitude_vector" else ".weight")
            if new:
                break
        if new is None and f".modules_to_save.{adapter_name}." in key:
            mod, _, rest = key.partition(f".modules_to_save.{adapter_name}.")
            new = f"{mod}.{rest}"
        if new is None:
            mod, _, leaf = key.rpartition(".")
            if leaf == "bias" and mod in adapted:
                new = f"{mod}.base_layer.bias"
            elif leaf == "bias":
                new = key
        if new is None:
            raise CheckpointError(f"key {key!r} is not a tensor of LoRA adapter {adapter_name!r}; cannot name it for PEFT")
        out[PEFT_PREFIX + new] = value
    return out


def from_peft_state_dict(
    state: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    modules_to_save: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """PEFT's on-disk names -> functuner/SWIFT names for adapter ``adapter_name``.

    ``modules_to_save`` lists the module names whose full copies the file holds
    (from ``adapter_config.json``); their keys become
    ``<module>.modules_to_save.<adapter>.<param>``.  A key without the
    ``base_model.model.`` prefix is an error naming the key (PEFT's silent
    "loaded nothing" failure mode).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"key {key!r} lacks PEFT's {PEFT_PREFIX!r} prefix")
        k = key[len(PEFT_PREFIX):]
        new = None
        for part in _LORA_PARTS:
            if k.endswith(f".{part}.weight") and part in ("lora_A", "lora_B"):
                new = k[: -len(f".{part}.weight")] + f".{part}.{adapter_name}.weight"
            elif k.endswith(f".{part}") and part == "lora_magnitude_vector":
                new = k[: -len(f".{part}")] + f".{part}.{adapter_name}.weight"
            elif k.endswith(f".{part}") and part in ("lora_embedding_A", "lora_embedding_B"):
                new = k + f".{adapter_name}"
            if new:
                break
        if new is None and k.endswith(".base_layer.bias"):
            new = k[: -len(".base_layer.bias")] + ".bias"
        if new is None and modules_to_save:
            for mod in sorted(modules_to_save, key=len, reverse=True):
                if k.startswith(mod + "."):
                    new = f"{mod}.modules_to_save.{adapter_name}.{k[len(mod) + 1:]}"
                    break
        if new is None and k.endswith(".bias"):
            new = k
        if new is None:
            raise CheckpointError(f"PEFT key {key!r} is not a LoRA tensor functuner knows how to load")
        out[new] = value
    return out


def rename_adapter(state: Mapping[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """Rename the adapter-name *component* of every key (never a substring of another word).

    ``q_proj.lora_A.adapter.weight`` with ``adapter -> my_adapter`` becomes
    ``q_proj.lora_A.my_adapter.weight``; a module called ``adapter_mlp`` is not
    touched (SWIFT's plain text replacement breaks both cases).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        renamed = []
        for i, part in enumerate(parts):
            prev = parts[i - 1] if i else ""
            if part == old and (prev in _LORA_PARTS or prev == "modules_to_save"):
                renamed.append(new)
            else:
                renamed.append(part)
        out[".".join(renamed)] = value
    return out


def to_swift_state_dict(state: Mapping[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """functuner names of one adapter -> SWIFT's on-disk names (``SwiftModel.save_pretrained``).

    SWIFT keeps LoRA keys as they are in memory (adapter name inside, no
    ``base_model.model.`` prefix) but stores ``modules_to_save`` copies at the
    original module's keys: ``<module>.modules_to_save.<adapter>.<param>`` ->
    ``<module>.<param>``.
    """
    marker = f".modules_to_save.{adapter_name}."
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if marker in key:
            mod, _, rest = key.partition(marker)
            key = f"{mod}.{rest}"
        out[key] = value
    return out


def from_swift_state_dict(
    state: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    modules_to_save: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """SWIFT's on-disk names -> functuner names (inverse of :func:`to_swift_state_dict`).

    ``modules_to_save`` (from ``adapter_config.json``) names the modules whose
    full copies the file holds at their original keys.  A key with PEFT's
    ``base_model.model.`` prefix is an error naming the key (that file is in
    PEFT layout, not SWIFT's).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"key {key!r} has PEFT's {PEFT_PREFIX!r} prefix; this file is in PEFT layout, not SWIFT's")
        new = key
        is_lora = any(f".{part}.{adapter_name}" in key for part in _LORA_PARTS)
        if not is_lora and modules_to_save:
            module = _saved_module_of(key, modules_to_save)
            if module is not None:
                new = f"{module}.modules_to_save.{adapter_name}.{key[len(module) + 1:]}"
        out[new] = value
    return out


def _saved_module_of(key: str, modules_to_save: set[str]) -> str | None:
    """The module path inside ``key`` that a ``modules_to_save`` entry names (PEFT's exact-or-suffix rule)."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:end])
        if any(path == m or path.endswith("." + m) for m in modules_to_save):
            return path
    return None
