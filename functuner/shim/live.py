"""The shim's adapter tensors as the module tree holds them now (FSDP2, ``load_state_dict(assign=True)``, ``to_empty``).

Design note: the shim registers each adapter tensor as an ``nn.Parameter`` inside
the wrapped model (:mod:`.placement`), and its routes (:mod:`functuner.core.routing`)
are built from those tensors.  Other code may *replace* such a parameter by a new
object in the module tree: FSDP2's ``fully_shard`` swaps a sharded DTensor parameter
in at rest and the unsharded one in around each unit's forward and backward
(``unsafe_setattr_param``); ``load_state_dict(..., assign=True)`` and ``to_empty()``
(or ``.to('meta')``) put fresh ``Parameter`` objects there.  The module tree is the
truth the optimizer and the checkpoint code see, so the shim must read its tensors
from it, not from the objects it created.

How, at a small cost per call:

* every holder module's ``_parameters`` is a :class:`WatchedParams` dict that bumps a
  process-wide counter, the *tree epoch*, whenever a parameter is set or removed
  (FSDP2's fast path ``module._parameters[name] = p``, ``register_parameter``,
  ``setattr``, ``nn.Module._apply`` all go through ``__setitem__``);
* an adapter remembers, per key, the owner's ``_parameters`` dict and leaf name
  (:func:`owners_of`), and :func:`follow` re-reads the objects there when the epoch
  has moved (O(#keys) then, O(1) otherwise); a replaced object bumps the adapter's
  ``generation``;
* the shim's default routes provider compares the epoch on every hook call (one
  integer comparison) and rebuilds routes only when some adapter's generation moved
  (:meth:`functuner.shim.state.ShimState.follow_tree`), reusing routes it built for
  the same tensor objects before, so FSDP2's alternation between sharded and
  unsharded parameters costs one dictionary lookup per FSDP unit after the first step.

Keys that are the base model's own parameters (trainable biases, LongLoRA's norms:
``AdapterEntry.shared``) live in ordinary modules whose dicts are not watched; they are
re-read on every :func:`follow` (they are few) and whenever the adapter's tensors are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from torch import nn

__all__ = ["WatchedParams", "epoch", "follow", "owners_of", "watch"]

# the tree epoch: bumped whenever a watched module's parameter object changes (a list: cheap to read and bump)
_EPOCH = [0]

Owner = tuple[str, dict[str, Any], str]  # (adapter key, the owner module's _parameters dict, leaf name)


def epoch() -> int:
    """The current tree epoch (see the module docstring)."""
    return _EPOCH[0]


class WatchedParams(dict):  # type: ignore[type-arg]  # a module's _parameters: dict[str, Parameter | None]
    """A module's ``_parameters`` that bumps the tree epoch when a parameter object is set or removed."""

    def __setitem__(self, key: str, value: Any) -> None:
        if dict.get(self, key) is not value:
            _EPOCH[0] += 1
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        _EPOCH[0] += 1
        dict.__delitem__(self, key)

    def pop(self, key: str, *default: Any) -> Any:
        _EPOCH[0] += 1
        return dict.pop(self, key, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        _EPOCH[0] += 1
        dict.update(self, *args, **kwargs)

    def clear(self) -> None:
        _EPOCH[0] += 1
        dict.clear(self)


def watch(module: nn.Module) -> None:
    """Make ``module``'s ``_parameters`` a :class:`WatchedParams` (idempotent; contents and order kept)."""
    params = module.__dict__["_parameters"]
    if not isinstance(params, WatchedParams):
        object.__setattr__(module, "_parameters", WatchedParams(params))


def owners_of(model: nn.Module, keys: Iterable[str]) -> tuple[Owner, ...]:
    """``(key, owner's _parameters, leaf)`` for each key: where :func:`follow` reads the key's current object."""
    out: list[Owner] = []
    for key in keys:
        path, _, leaf = key.rpartition(".")
        owner = model
        for part in path.split(".") if path else ():  # get_submodule's walk without its per-step checks
            child = owner._modules.get(part)
            owner = child if child is not None else owner.get_submodule(part)  # (its error names the part)
        out.append((key, owner.__dict__["_parameters"], leaf))
    return tuple(out)


class _Followed(Protocol):
    """What :func:`follow` needs of an adapter (``functuner.shim.state.AdapterEntry``)."""

    held: dict[str, nn.Parameter]
    owners: tuple[Owner, ...]
    shared: frozenset[str]
    seen: int
    generation: int


def follow(adapter: _Followed) -> None:
    """Point ``adapter.held`` at the objects the module tree holds now; bump ``generation`` if any changed."""
    now = _EPOCH[0]
    moved = False
    held = adapter.held
    for key, params, leaf in adapter.owners:
        current = params.get(leaf)
        if current is not None and current is not held[key]:
            held[key] = current
            moved = True
    adapter.seen = now
    if moved:
        adapter.generation += 1


def identity_key(tensors: Mapping[str, Any]) -> tuple[int, ...]:
    """The objects' identities, in order: equal keys mean routes built from them are still right."""
    return tuple(map(id, tensors.values()))
