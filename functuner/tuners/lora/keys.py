"""The names of LoRA tensors, built and parsed in this one place.

In memory (functuner, PEFT and SWIFT alike) a LoRA tensor is named
``<module>.<part>.<adapter>[.weight]``: ``lora_A`` / ``lora_B`` /
``lora_magnitude_vector`` end in ``.weight``, the embedding factors
``lora_embedding_A`` / ``lora_embedding_B`` do not.  PEFT's files drop the
adapter name (``<module>.lora_A.weight``, ``<module>.lora_magnitude_vector``).
:func:`param_names` builds the in-memory names, :func:`parse_key` splits any of
these spellings; every other module (per-sample batches, combination, the
streaming merge, the disk layer through the tuner's hooks) uses them instead
of its own string matching.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "BARE_PARTS",
    "EMBEDDING_PARTS",
    "VARIANT_PARTS",
    "LORA_PARTS",
    "MONTECLORA_LEAVES",
    "MONTECLORA_PART",
    "LoraKey",
    "lora_b_bias_name",
    "param_names",
    "parse_key",
]

VARIANT_PARTS = ("lora_diag", "lora_velora_embed")  # KaSA's singular values, VeLoRA's projection (no ".weight")
MONTECLORA_PART = "lora_monteclora_sampler"  # MonteCLoRA's sampler: ``<module>.<part>[.<adapter>].<leaf>``
MONTECLORA_LEAVES = ("std_prior", "expert_weights_prior", "gaussian_var_prior", "expert_weights")
LORA_PARTS = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    *VARIANT_PARTS,
    MONTECLORA_PART,
)
EMBEDDING_PARTS = ("lora_embedding_A", "lora_embedding_B")
BARE_PARTS = (*EMBEDDING_PARTS, *VARIANT_PARTS)  # in memory ``<module>.<part>.<adapter>``, without ".weight"


class LoraKey(NamedTuple):
    """A parsed LoRA tensor key: ``<module>.<part>[.<adapter>][.weight]``."""

    module: str  # the adapted module's path ("" for the root module)
    part: str  # one of LORA_PARTS
    adapter: str | None  # None in PEFT's on-disk spelling, which carries no adapter name
    weight: bool  # whether the key ends in ".weight"
    bias: bool = False  # ``lora_B``'s own bias (``lora_bias=True``): ``<module>.lora_B[.<adapter>].bias``
    leaf: str = ""  # MonteCLoRA's sampler tensor (``std_prior``...): ``<module>.lora_monteclora_sampler[.<ad>].<leaf>``


def parse_key(key: str) -> LoraKey | None:
    """Split a LoRA tensor key (in-memory or PEFT on-disk spelling); ``None`` for any other key. Pure.

    ``a.lora_A.default.weight`` -> ``LoraKey("a", "lora_A", "default", True)``;
    ``a.lora_embedding_B.x`` -> ``LoraKey("a", "lora_embedding_B", "x", False)``;
    ``a.lora_A.weight`` / ``a.lora_magnitude_vector`` (PEFT files) -> adapter ``None``;
    ``a.lora_B.x.bias`` / ``a.lora_B.bias`` (``lora_bias=True``) -> ``bias=True``.
    """
    parts = key.split(".")
    n = len(parts)
    if n >= 2 and parts[-1] in MONTECLORA_LEAVES:
        if parts[-2] == MONTECLORA_PART:
            return LoraKey(".".join(parts[:-2]), MONTECLORA_PART, None, False, False, parts[-1])
        if n >= 3 and parts[-3] == MONTECLORA_PART:
            return LoraKey(".".join(parts[:-3]), MONTECLORA_PART, parts[-2], False, False, parts[-1])
    if n >= 2 and parts[-1] == "bias" and "lora_B" in parts[-3:-1]:  # lora_bias=True: B's own bias
        if parts[-2] == "lora_B":
            return LoraKey(".".join(parts[:-2]), "lora_B", None, False, True)
        return LoraKey(".".join(parts[:-3]), "lora_B", parts[-2], False, True)
    if parts[-1] in LORA_PARTS:
        return LoraKey(".".join(parts[:-1]), parts[-1], None, False)
    if n >= 2 and parts[-2] in LORA_PARTS:
        if parts[-1] == "weight":
            return LoraKey(".".join(parts[:-2]), parts[-2], None, True)
        return LoraKey(".".join(parts[:-2]), parts[-2], parts[-1], False)
    if n >= 3 and parts[-3] in LORA_PARTS and parts[-1] == "weight":
        return LoraKey(".".join(parts[:-3]), parts[-3], parts[-2], True)
    return None


def param_names(module_name: str, kind: str, adapter: str) -> tuple[str, str, str]:
    """The in-memory keys ``(A, B, magnitude)`` of ``adapter`` at module ``module_name`` of layer ``kind``."""
    if kind == "embedding":
        a, b = f"{module_name}.lora_embedding_A.{adapter}", f"{module_name}.lora_embedding_B.{adapter}"
    else:
        a, b = f"{module_name}.lora_A.{adapter}.weight", f"{module_name}.lora_B.{adapter}.weight"
    return a, b, f"{module_name}.lora_magnitude_vector.{adapter}.weight"


def lora_b_bias_name(module_name: str, adapter: str) -> str:
    """The in-memory key of ``lora_B``'s bias (``lora_bias=True``) of ``adapter`` at ``module_name``."""
    return f"{module_name}.lora_B.{adapter}.bias"
