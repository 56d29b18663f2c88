"""Which modules a config targets: PEFT's matching rules, in one place.

* ``target_modules`` as a string is a regular expression that must match the
  *whole* module name (``re.fullmatch``); as a list, an entry matches a module
  whose name equals it or ends with ``"." + entry``.
* ``"all-linear"`` selects every ``nn.Linear`` / GPT-2 ``Conv1D`` except the
  model's output layer.
* ``exclude_modules`` uses the same rules and wins over ``target_modules``.
* ``layers_to_transform`` / ``layers_pattern`` restrict to numbered layers.

Modules functuner itself inserted into a model (the stateful shim's parameter
holders, which carry the :data:`INTERNAL_MARKER` attribute) are never targets
and their parameters are never a module's own: :func:`own_named_modules` and
:func:`own_named_parameters` walk a model without them.  Every tuner's target
matching goes through these, so one tuner never adapts, copies or counts
another tuner's tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

from torch import nn

from ..errors import TargetError

__all__ = [
    "INTERNAL_MARKER",
    "is_conv1d_gpt2",
    "is_internal",
    "match_name",
    "own_named_modules",
    "own_named_parameters",
    "pattern_value",
    "select_modules",
]

# The attribute (``True``) that marks a module functuner inserted into a model (set on the class or the instance).
INTERNAL_MARKER = "_functuner_internal"

_DEFAULT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def is_conv1d_gpt2(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored as ``(in, out)``), detected without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_internal(module: nn.Module) -> bool:
    """Whether ``module`` is one functuner inserted (it carries ``INTERNAL_MARKER = True``)."""
    return getattr(module, INTERNAL_MARKER, False) is True


def own_named_modules(model: nn.Module, *, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` (same order) without functuner's inserted modules and everything below them. Pure."""
    memo: set[nn.Module] = set()

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        if remove_duplicate:
            if module in memo:
                return
            memo.add(module)
        yield prefix, module
        for child_name, child in module._modules.items():
            if child is not None and not is_internal(child):
                yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    yield from walk("", model)


def own_named_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``module.named_parameters()`` without parameters functuner placed in inserted sub-modules. Pure."""
    internal = {n for n, m in module.named_modules() if n and is_internal(m)}
    for name, p in module.named_parameters():
        parts = name.split(".")
        if not internal or not any(".".join(parts[:i]) in internal for i in range(1, len(parts))):
            yield name, p


def match_name(name: str, spec: str | Iterable[str] | None) -> bool:
    """PEFT's rule: regex full match for a string, exact-or-suffix match for a list."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index(name: str, patterns: Sequence[str]) -> int | None:
    for pat in patterns:
        m = re.match(rf".*\.{pat}\.(\d+)(\.|$)", name) or re.match(rf"^{pat}\.(\d+)(\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def pattern_value(name: str, patterns: dict[str, float] | dict[str, int], default: float) -> float:
    """Value from PEFT's ``rank_pattern`` / ``alpha_pattern``: first key that matches the end of ``name``."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default


def _output_layer_names(model: nn.Module) -> set[str]:
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except Exception:  # noqa: BLE001 - models without a head raise various errors
            out = None
        if out is not None:
            names |= {n for n, m in model.named_modules() if m is out}
    return names


def select_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    *,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    field: str = "target_modules",
) -> list[tuple[str, nn.Module]]:
    """Names and modules of ``model`` selected by PEFT's rules, in ``named_modules`` order.

    Raises :class:`TargetError` (naming the field and showing a few module
    names) when nothing matches.  Pure: reads the model only.
    """
    if target_modules is None:
        raise TargetError(f"{field} is None: name the modules to adapt (a list of names or a regex)")
    all_linear = target_modules == "all-linear" or (
        not isinstance(target_modules, str) and list(target_modules) == ["all-linear"]
    )
    excluded_out = _output_layer_names(model) if all_linear else set()
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    patterns: Sequence[str]
    if layers_pattern is None:
        patterns = _DEFAULT_LAYER_PATTERNS
    elif isinstance(layers_pattern, str):
        patterns = [layers_pattern]
    else:
        patterns = list(layers_pattern)
    chosen = []
    for name, module in own_named_modules(model):
        if not name:
            continue
        if all_linear:
            if not (isinstance(module, nn.Linear) or is_conv1d_gpt2(module)) or name in excluded_out:
                continue
        elif not match_name(name, target_modules):
            continue
        if exclude_modules is not None and match_name(name, exclude_modules):
            continue
        if layers_to_transform is not None:
            idx = _layer_index(name, patterns)
            if idx is None or idx not in layers_to_transform:
                continue
        chosen.append((name, module))
    if not chosen:
        sample = [n for n, _ in own_named_modules(model) if n][:8]
        raise TargetError(
            f"{field}={target_modules!r} matched no module of {type(model).__name__}"
            f" (exclude_modules={exclude_modules!r}, layers_to_transform={layers_to_transform!r});"
            f" some module names: {sample}"
        )
    return chosen
