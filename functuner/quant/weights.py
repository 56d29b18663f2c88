"""Dense views of quantized layers for the weight arithmetic of tuners and the shim's exact merge swap.

* :func:`dense_weight` / :func:`weight_shape`: a registered quantized layer's
  weight dequantized to fp32 ``(out, in)`` and its true shape (``None`` for a
  float layer), so a tuner reads shapes, dtypes and DoRA norms from them.
* :func:`densify`: a ``{name: tensor}`` state in which the weights of the named
  quantized layers are their dequantized fp32 weights (so merging is plain
  float arithmetic on them).
* :func:`merged_storage`: the shim's merge swaps a layer's weight object for a
  merged one and swaps the original back on unmerge; for a quantized layer the
  merged object is the float merge re-quantized by the backend (the original
  quantized storage is kept untouched for the exact unmerge).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from .registry import kind_of

__all__ = ["dense_weight", "densify", "is_storage", "merged_storage", "weight_shape"]


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """``module``'s weight dequantized (fp32, ``(out, in)``, detached) if it is a registered quantized layer."""
    kind = kind_of(module)
    return None if kind is None else kind.dequantize(module)


def weight_shape(module: nn.Module) -> tuple[int, int] | None:
    """The true ``(out, in)`` shape of a registered quantized layer's weight, else ``None``."""
    kind = kind_of(module)
    return None if kind is None else kind.shape(module)


def is_storage(module: nn.Module, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (a state entry for ``<module>.weight``) is quantized storage rather than a float weight."""
    kind = kind_of(module)
    if kind is None:
        return False
    return (
        type(tensor) not in (torch.Tensor, nn.Parameter)
        or not tensor.is_floating_point()
        or tuple(tensor.shape) != kind.shape(module)
    )


def densify(model: nn.Module, state: Mapping[str, torch.Tensor], names: Iterable[str]) -> Mapping[str, torch.Tensor]:
    """``state`` with ``<name>.weight`` the dequantized weight of each named registered quantized layer.

    Entries that are already float weights of the true shape (an earlier merge's
    output) are kept.  Returns ``state`` itself when nothing is quantized.
    """
    out: dict[str, torch.Tensor] | None = None
    for name in names:
        module = model.get_submodule(name)
        if kind_of(module) is None:
            continue
        key = f"{name}.weight" if name else "weight"
        current = state.get(key)
        if current is not None and not is_storage(module, current):
            continue
        if out is None:
            out = dict(state)
        out[key] = dense_weight(module)  # type: ignore[assignment]
    return state if out is None else out


def merged_storage(owner: nn.Module, leaf: str, value: torch.Tensor, name: str) -> nn.Parameter | None:
    """The weight object the shim swaps into quantized layer ``owner`` for merged float weight ``value``.

    ``None`` when ``owner`` is not a registered quantized layer (the shim
    stores ``value`` in the original dtype as for any float layer).  Raises
    :class:`UnsupportedModuleError` naming the layer when its backend cannot
    re-quantize, or keeps its storage in more than one tensor (HQQ); the shim
    calls this before it swaps anything.
    """
    kind = kind_of(owner)
    if kind is None or leaf != "weight":
        return None
    if kind.requantize is None or not kind.single_tensor:
        raise UnsupportedModuleError(
            f"merge: layer {name!r} ({kind.name}, {type(owner).__name__}) keeps its quantized storage in more than"
            " one tensor, so the shim cannot swap a merged weight in and out of it; use"
            " functuner.quant.merge_quantized(model, params) for its merged float weight and a re-quantized layer,"
            " or keep the adapter unmerged"
        )
    if kind.before_swap is not None:
        kind.before_swap(owner)
    new = kind.requantize(owner, value.detach().float())
    weight = new._parameters["weight"]
    assert isinstance(weight, nn.Parameter)
    weight.requires_grad_(False)
    return weight
