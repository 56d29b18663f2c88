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

import re
from collections.abc import Mapping, Sequence

import torch

from ..errors import CheckpointError

__all__ = [
    "PEFT_PREFIX",
    "from_peft_state_dict",
    "from_swift_state_dict",
    "llamapro_from_swift_state_dict",
    "llamapro_to_swift_state_dict",
    "part_from_swift_state_dict",
    "part_to_swift_state_dict",
    "rename_adapter",
    "split_peft_base_weights",
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
                new = (
                    key[: -len(marker + ".weight")]
                    + f".{part}"
                    + ("" if part == "lora_magnitude_vector" else ".weight")
                )
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
            raise CheckpointError(
                f"key {key!r} is not a tensor of LoRA adapter {adapter_name!r}; cannot name it for PEFT"
            )
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
        k = key[len(PEFT_PREFIX) :]
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
                    new = f"{mod}.modules_to_save.{adapter_name}.{k[len(mod) + 1 :]}"
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
            nxt = parts[i + 1] if i + 1 < len(parts) else ""
            if part == old and (prev in _LORA_PARTS or prev == "modules_to_save"):
                renamed.append(new)
            elif _swift_component_prefix(part, old, nxt) is not None:
                renamed.append(_swift_component_prefix(part, old, nxt) + new)  # type: ignore[operator]
            else:
                renamed.append(part)
        out[".".join(renamed)] = value
    return out


def to_swift_state_dict(state: Mapping[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """functuner names of one adapter -> SWIFT's on-disk names (``SwiftModel.save_pretrained``).

    SWIFT keeps LoRA keys as they are in memory (adapter name inside, no
    ``base_model.model.`` prefix) but stores ``modules_to_save`` copies at the
    original module's keys: ``<module>.modules_to_save.<adapter>.<param>`` ->
    ``<module>.<param>``.  Part copies likewise: ``<module>._part_<adapter>.<param>``
    -> ``<module>.<param>``; Adapter / Prompt / Side keys are kept as they are.
    Trainable biases of LoRA-adapted modules are at ``<module>.base_layer.bias``
    (SWIFT's layer wraps the original as ``base_layer``).
    """
    marker = f".modules_to_save.{adapter_name}."
    adapted = _adapted_modules(list(state), adapter_name)
    out: dict[str, torch.Tensor] = {}
    for key, value in llamapro_to_swift_state_dict(part_to_swift_state_dict(state, adapter_name), adapter_name).items():
        if marker in key:
            mod, _, rest = key.partition(marker)
            key = f"{mod}.{rest}"
        elif key.endswith(".bias") and key[: -len(".bias")] in adapted:
            key = key[: -len(".bias")] + ".base_layer.bias"  # SWIFT's LoRA layer wraps the original as base_layer
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
            raise CheckpointError(
                f"key {key!r} has PEFT's {PEFT_PREFIX!r} prefix; this file is in PEFT layout, not SWIFT's"
            )
        new = key
        is_lora = any(f".{part}.{adapter_name}" in key for part in _LORA_PARTS)
        if key.endswith(".base_layer.bias"):  # a LoRA-adapted module's trainable bias (bias='all')
            new = key[: -len(".base_layer.bias")] + ".bias"
        elif not is_lora and modules_to_save:
            module = _saved_module_of(key, modules_to_save)
            if module is not None:
                new = f"{module}.modules_to_save.{adapter_name}.{key[len(module) + 1 :]}"
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


def split_peft_base_weights(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate the full base weights PEFT sometimes saves beside an adapter.

    With ``save_embedding_layers`` (on by default when embeddings are targeted)
    PEFT stores ``base_model.model.<module>.base_layer.weight``: the whole
    original weight.  Returns ``(adapter tensors, {<module>.weight: tensor})``
    with the second part under the base model's own names.
    """
    rest: dict[str, torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(PEFT_PREFIX) and key.endswith(".base_layer.weight"):
            base[key[len(PEFT_PREFIX) : -len(".base_layer.weight")] + ".weight"] = value
        else:
            rest[key] = value
    return rest, base


# -- SWIFT's own tuners (Adapter, Prompt, Side, Part): the adapter name is glued to a component prefix ----
# component prefix -> the key parts that may follow it (so a module that merely looks alike is never renamed)
_SWIFT_COMPONENTS = {
    "adapter_": ("linear1", "linear2"),
    "prompt_": ("prompt_token",),
    "side_": ("alpha", "side_net"),
    "_part_": None,  # any parameter path follows a Part copy
    "llamapro_": None,  # a LLaMA-Pro new block's parameter path
    "restuning_": ("bypass_blocks",),
    "scetuner_": ("tuner_op",),
    "reft_": ("rotate_layer", "learned_source", "proj_layer"),
}


def _swift_component_prefix(part: str, adapter_name: str, following: str) -> str | None:
    """The prefix of ``part`` if it is ``<prefix><adapter_name>`` of a SWIFT tuner component, else ``None``."""
    for prefix, allowed in _SWIFT_COMPONENTS.items():
        if part == prefix + adapter_name and following and (allowed is None or following in allowed):
            return prefix
    return None


def part_to_swift_state_dict(
    state: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """Part params -> SWIFT's on-disk keys: ``<module>._part_<adapter>.<param>`` -> ``<module>.<param>``.

    Keys without the marker pass through unchanged.
    """
    marker = f"._part_{adapter_name}."
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if marker in key:
            mod, _, rest = key.partition(marker)
            key = f"{mod}.{rest}"
        out[key] = value
    return out


def part_from_swift_state_dict(
    state: Mapping[str, torch.Tensor],
    target: str | Sequence[str],
    adapter_name: str = "default",
) -> dict[str, torch.Tensor]:
    """SWIFT's Part keys (original ``<module>.<param>``) -> ``<module>._part_<adapter>.<param>``.

    ``target`` is either ``PartConfig.target_modules`` (a regex: the module of a
    key is its *shortest* dotted prefix the regex fully matches, i.e. the
    outermost targeted module, no model needed) or the targeted module names.
    Keys already named ``<module>._part_<adapter>.<param>`` pass through.  A key
    under no targeted module is an error naming the key.
    """
    if isinstance(target, str):
        pattern = re.compile(target)

        def owner_of(key: str) -> str | None:
            parts = key.split(".")
            return next(
                (".".join(parts[:i]) for i in range(1, len(parts)) if pattern.fullmatch(".".join(parts[:i]))), None
            )
    else:
        mods = sorted(target, key=len, reverse=True)

        def owner_of(key: str) -> str | None:
            return next((m for m in mods if key.startswith(m + ".")), None)

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if f"._part_{adapter_name}." in key:  # already in memory naming (SWIFT loads these too)
            out[key] = value
            continue
        owner = owner_of(key)
        if owner is None:
            raise CheckpointError(f"key {key!r} lies under no module targeted by the Part adapter ({target!r})")
        out[f"{owner}._part_{adapter_name}.{key[len(owner) + 1 :]}"] = value
    return out


def llamapro_to_swift_state_dict(
    state: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """LLaMA-Pro params -> SWIFT's keys: ``<list>.<i>.llamapro_<adapter>.<param>`` -> ``<list>.<j>.<param>``.

    ``j = i + 1 + k``, with ``k`` the number of new blocks before this one (the
    rank of ``i`` among the saved source layers): the new block's index in
    SWIFT's expanded layer list.  Other keys pass through unchanged.
    """
    marker = f".llamapro_{adapter_name}."
    sources: dict[str, set[int]] = {}
    for key in state:
        if marker in key:
            prefix, _, idx = key.partition(marker)[0].rpartition(".")
            sources.setdefault(prefix, set()).add(int(idx))
    rank = {p: {i: r for r, i in enumerate(sorted(s))} for p, s in sources.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if marker in key:
            head, _, rest = key.partition(marker)
            prefix, _, idx = head.rpartition(".")
            key = f"{prefix}.{int(idx) + 1 + rank[prefix][int(idx)]}.{rest}"
        out[key] = value
    return out


def llamapro_from_swift_state_dict(
    state: Mapping[str, torch.Tensor], module_list: str, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """SWIFT's LLaMA-Pro keys ``<module_list>.<j>.<param>`` -> ``<module_list>.<j - 1 - k>.llamapro_<adapter>.<param>``.

    ``k`` is the rank of ``j`` among the saved block indices (inverse of
    :func:`llamapro_to_swift_state_dict`).  Keys already in functuner's naming
    pass through; a key outside ``module_list`` is an error naming it.
    """
    marker = f".llamapro_{adapter_name}."
    head = module_list + "."
    indices: set[int] = set()
    for key in state:
        if marker in key:
            continue
        idx = key[len(head) :].split(".", 1)[0] if key.startswith(head) else ""
        if not idx.isdigit():
            raise CheckpointError(f"LLaMA-Pro key {key!r} is not a parameter of a block in {module_list!r}")
        indices.add(int(idx))
    rank = {j: r for r, j in enumerate(sorted(indices))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if marker not in key:
            idx, _, rest = key[len(head) :].partition(".")
            key = f"{module_list}.{int(idx) - 1 - rank[int(idx)]}{marker}{rest}"
        out[key] = value
    return out
