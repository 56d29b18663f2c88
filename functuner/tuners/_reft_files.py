"""pyreft's on-disk layout of ReFT adapters (what ms-swift 4.6 saves) -> functuner's ReFT names. Pure.

ms-swift saves a ReFT adapter through pyreft's ``save_intervention``: next to ``adapter_config.json``,
one ``intkey_<component>.bin`` per intervened layer (``torch.save`` of the intervention's
``state_dict``; the component names the layer: ``intkey_comp_model_layers[3]_output_unit_pos_nunit_1#0.bin``).
The keys depend on the intervention type: LoReFT's own ``state_dict`` gives ``weight``, ``bias``
(the learned source) and ``rotate_layer`` (the effective orthonormal ``R``); the others give torch's
module state (``learned_source``, ``proj_layer.weight``, ``rotate_layer.parametrizations.weight.original``
and ``...weight.0.base`` of the orthogonal parametrization, and the 0-d ``embed_dim`` /
``interchange_dim``).  :func:`from_intkey_files` turns them into functuner's ReFT names
(``<layer list>.<i>.reft_<adapter>.<name>``), the parametrized ``R`` computed as torch's parametrization
computes it.  The files are read by :mod:`functuner.io.tuner_files` (torch's restricted loader only);
the ReFT tuner names this module in its ``read_files`` hook.

:func:`to_intkey_files` is the reverse (its ``write_files`` hook, used by ``save_pretrained(...,
safe_serialization=False)``): the same file names, keys, key order and dtypes as pyreft's ``state_dict``.
A parametrized ``R`` is stored as pyreft stores a freshly parametrized weight: ``original`` is ``-I`` (the
identity of the Householder map) and ``base`` is ``R`` completed to a square basis, so the reader's
``base @ householder(original)`` gives back ``R`` exactly.  pyreft completes with random columns
(``torch.randn`` in torch's ``right_inverse``); functuner completes deterministically with ``R``'s
orthogonal complement (a complete QR), so those columns are the only ones that differ from ms-swift's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["INTKEY_GLOB", "from_intkey_files", "to_intkey_files"]

INTKEY_GLOB = "intkey_*.bin"
_LAYER = re.compile(r"\[(\d+)\]")
_SAME = (
    "rotate_layer",
    "learned_source",
    "learned_source.weight",
    "learned_source.bias",
    "proj_layer.weight",
    "proj_layer.bias",
)
_RENAMED = {"weight": "learned_source.weight", "bias": "learned_source.bias"}  # LoReFT's own state_dict
_SIZES = ("embed_dim", "interchange_dim")  # pyreft's bookkeeping, 0-d
_ORIGINAL = "rotate_layer.parametrizations.weight.original"
_BASE = "rotate_layer.parametrizations.weight.0.base"


def _orthogonal(original: torch.Tensor, base: torch.Tensor, source: str) -> torch.Tensor:
    """``R`` as ``torch.nn.utils.parametrizations.orthogonal`` (pyreft's rotate layer, default map) computes it."""
    if original.dim() != 2 or tuple(base.shape) != (original.shape[0], original.shape[0]):
        raise CheckpointError(
            f"{source}: {_ORIGINAL} {tuple(original.shape)} and {_BASE} {tuple(base.shape)} are not an orthogonal"
            " parametrization of a (hidden, r) weight"
        )
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.zeros(original.shape, dtype=torch.float32))
    nn.utils.parametrizations.orthogonal(holder)
    holder.load_state_dict(
        {"parametrizations.weight.original": original.float(), "parametrizations.weight.0.base": base.float()}
    )
    with torch.no_grad():
        return holder.weight.detach().to(original.dtype).contiguous()


def _one_file(data: Mapping[str, torch.Tensor], head: str, source: str) -> dict[str, torch.Tensor]:
    data = dict(data)
    out: dict[str, torch.Tensor] = {}
    if (_ORIGINAL in data) != (_BASE in data):
        raise CheckpointError(f"{source}: has one of {_ORIGINAL!r} and {_BASE!r} without the other")
    if _ORIGINAL in data:
        out[head + "rotate_layer"] = _orthogonal(data.pop(_ORIGINAL), data.pop(_BASE), source)
    for key, value in data.items():
        if key in _SIZES and value.dim() == 0:
            continue
        name = _RENAMED.get(key, key)
        if name not in _SAME or head + name in out:
            raise CheckpointError(f"{source}: key {key!r} is not a tensor of any ReFT intervention functuner knows")
        out[head + name] = value
    return out


def from_intkey_files(
    config: Any,
    files: Mapping[str, Mapping[str, torch.Tensor]],
    adapter_name: str,
    folder: str,
    layer_list_key: Callable[[Any], str | None],
) -> dict[str, torch.Tensor]:
    """``{file name: its tensors}`` of pyreft's files -> functuner's names; ``CheckpointError`` naming the file.

    The layer index comes from each file's name, the layer list from the config (``layer_key``, or a
    ``model_type`` whose list is known).  Shapes and completeness are checked later against the config,
    as for any checkpoint.
    """
    layers = layer_list_key(config)
    if layers is None:
        raise CheckpointError(
            f"{folder}: its ReFT config names no layer list (layer_key=None, model_type={config.model_type!r});"
            " set layer_key in adapter_config.json"
        )
    out: dict[str, torch.Tensor] = {}
    for name, data in sorted(files.items()):
        source = f"{folder}/{name}"
        found = _LAYER.findall(name)
        if len(found) != 1:
            raise CheckpointError(f"{source}: cannot tell its layer from the name (pyreft's intkey_<component>.bin)")
        tensors = _one_file(data, f"{layers}.{int(found[0])}.reft_{adapter_name}.", source)
        clash = sorted(set(tensors) & set(out))
        if clash:
            raise CheckpointError(f"{source}: another file already holds {clash[:3]}")
        out.update(tensors)
    return out


_SIZE_KEYS = object()  # stands for the 0-d embed_dim, interchange_dim in a layout below
_PARAMETRIZED = object()  # stands for the orthogonal parametrization's original, base
#: pyreft's state_dict order per intervention type, in functuner's names (torch's module registration order)
_LAYOUT: dict[str, tuple[object, ...]] = {
    "LoreftIntervention": ("learned_source.weight", "learned_source.bias", "rotate_layer"),
    "NoreftIntervention": (
        _SIZE_KEYS,
        "proj_layer.weight",
        "proj_layer.bias",
        "learned_source.weight",
        "learned_source.bias",
    ),
    "ConsreftIntervention": ("learned_source", _SIZE_KEYS, _PARAMETRIZED),
    "LobireftIntervention": ("learned_source", _SIZE_KEYS, _PARAMETRIZED),
    "DireftIntervention": (_SIZE_KEYS, _PARAMETRIZED, "learned_source.weight", "learned_source.bias"),
    "NodireftIntervention": (
        _SIZE_KEYS,
        "proj_layer.weight",
        "proj_layer.bias",
        "learned_source.weight",
        "learned_source.bias",
    ),
}
_ON_DISK = {v: k for k, v in _RENAMED.items()}  # LoReFT's own state_dict names


def _parametrized(rotate: torch.Tensor) -> dict[str, torch.Tensor]:
    """``original`` (``-I``) and ``base`` (``[R | complement]``) whose orthogonal parametrization gives ``R``."""
    d, r = rotate.shape
    original = torch.zeros_like(rotate)
    original.diagonal().fill_(-1.0)
    complement = torch.linalg.qr(rotate.detach().float(), mode="complete").Q[:, r:]
    base = torch.cat([rotate.detach(), complement.to(rotate.dtype)], dim=1).contiguous()
    return {_ORIGINAL: original, _BASE: base}


def to_intkey_files(
    config: Any,
    state: Mapping[str, torch.Tensor],
    adapter_name: str,
    layer_list_key: Callable[[Any], str | None],
) -> dict[str, dict[str, torch.Tensor]]:
    """functuner's ReFT tensors -> ``{intkey file name: pyreft's state_dict}``, as ms-swift writes them. Pure.

    ``CheckpointError`` (before anything is written) when the config names no layer list or a key is not one
    of this adapter's ReFT tensors.
    """
    layers = layer_list_key(config)
    if layers is None:
        raise CheckpointError(
            f"ReFT adapter {adapter_name!r}: its config names no layer list (layer_key=None,"
            f" model_type={config.model_type!r}); set layer_key to save pyreft's intkey_*.bin files"
        )
    head = re.compile(rf"{re.escape(layers)}\.(\d+)\.reft_{re.escape(adapter_name)}\.(.+)")
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = head.fullmatch(key)
        if match is None or match.group(2) not in _SAME:
            raise CheckpointError(f"ReFT adapter {adapter_name!r}: {key!r} is not a ReFT tensor of {layers}")
        by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = value.detach()
    layout = _LAYOUT[config.intervention_type]
    renamed = _ON_DISK if config.intervention_type == "LoreftIntervention" else {}
    files: dict[str, dict[str, torch.Tensor]] = {}
    for index, tensors in sorted(by_layer.items()):
        component = f"{layers}[{index}].output".replace(".", "_")  # pyvene's representation key
        data: dict[str, torch.Tensor] = {}
        hidden = next(t.shape[0] if n == "rotate_layer" else t.shape[-1] for n, t in tensors.items() if t.dim() == 2)
        for item in layout:
            if item is _SIZE_KEYS:
                data.update({k: torch.tensor(hidden) for k in _SIZES})  # pyvene's int64 embed_dim, interchange_dim
            elif item is _PARAMETRIZED:
                data.update(_parametrized(tensors["rotate_layer"]))
            elif isinstance(item, str) and item in tensors:
                data[renamed.get(item, item)] = tensors[item]
        files[f"intkey_comp_{component}_unit_pos_nunit_1#0.bin"] = data
    return files
