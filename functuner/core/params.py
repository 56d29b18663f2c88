"""The immutable parameter container every tuner returns.

A :class:`TunerParams` is a read-only mapping ``parameter name -> tensor`` plus
static data (the tuner config and the adapter name).  Names follow SWIFT's /
PEFT's in-memory naming relative to the *original* model, e.g.
``model.layers.0.self_attn.q_proj.lora_A.default.weight``.

It is a pytree node in three registries:

* torch's own (``torch.utils._pytree``), which ``torch.func.grad``/``vmap`` and
  ``torch.compile`` use;
* optree's global namespace (plain ``optree.tree_map(f, params)`` works);
* optree's ``"functuner"`` namespace, for code that always passes a namespace.

The tensors are the leaves; names, config and adapter name are static aux
data, so two params with the same structure and config have equal tree specs.
Nothing here copies tensors: building, flattening and unflattening are O(#leaves)
reference operations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import optree
import torch
import torch.utils._pytree as torch_pytree

from ..errors import ConfigError, ParamsMismatchError

__all__ = ["TunerParams", "tree_map"]


class TunerParams(Mapping[str, torch.Tensor]):
    """Read-only mapping from parameter name to tensor, with static ``config`` and ``adapter_name``.

    Purity: instances never change after construction; "updates" return new
    instances (:meth:`replace`, :meth:`map`).  The tensors themselves are not
    copied, so do not modify them in place if you rely on old values.
    """

    __slots__ = ("_tensors", "adapter_name", "config", "__weakref__")

    _tensors: dict[str, torch.Tensor]
    config: Any
    adapter_name: str

    def __init__(self, tensors: Mapping[str, torch.Tensor], config: Any, adapter_name: str = "default") -> None:
        object.__setattr__(self, "_tensors", dict(tensors))
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "adapter_name", adapter_name)

    # -- Mapping protocol -------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    # -- immutability -----------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"TunerParams is immutable; use .replace(...) instead of setting {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("TunerParams is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (TunerParams, (self._tensors, self.config, self.adapter_name))

    # -- functional updates -----------------------------------------------
    def replace(self, tensors: Mapping[str, torch.Tensor] | None = None, **static: Any) -> TunerParams:
        """Return new params with some tensors (and/or ``config``/``adapter_name``) replaced.

        Every name in ``tensors`` must already exist; use the tuner's ``init`` to add modules.
        """
        new = dict(self._tensors)
        for name, value in (tensors or {}).items():
            if name not in new:
                raise KeyError(f"TunerParams has no tensor named {name!r}")
            new[name] = value
        unknown = set(static) - {"config", "adapter_name"}
        if unknown:
            raise TypeError(f"replace() got unexpected keyword(s) {sorted(unknown)}")
        return TunerParams(new, static.get("config", self.config), static.get("adapter_name", self.adapter_name))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TunerParams:
        """Apply ``fn`` to every tensor, returning new params with the same static data."""
        return TunerParams({k: fn(v) for k, v in self._tensors.items()}, self.config, self.adapter_name)

    def to(self, *args: Any, **kwargs: Any) -> TunerParams:
        """``Tensor.to`` on every tensor (dtype / device), returning new params."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> TunerParams:
        return self.map(torch.Tensor.detach)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A plain ``dict`` copy of the mapping (same tensor objects)."""
        return dict(self._tensors)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self._tensors.values())

    # -- torch.optim ------------------------------------------------------
    def parameters(self, *, require_grad: bool = True) -> list[torch.Tensor]:
        """The tensors as a list in the pytree's leaf order, ready for ``torch.optim``.

        ``torch.optim.AdamW(params)`` fails ("one of the params is str") because a mapping
        yields its names; ``torch.optim.AdamW(params.parameters())`` is the spelling that works.
        The order is the insertion order of the names, the same as ``torch.utils._pytree``'s and
        optree's flatten order, so it is stable across calls and across ``tree_map``.

        With ``require_grad=True`` (the default) every tensor must be a leaf tensor that
        requires grad, since an optimizer silently never updates one that does not: params fresh
        from ``init`` do not require grad, so call :meth:`trainable` first.  Pass
        ``require_grad=False`` to get the tensors whatever their flags (e.g. to count or clip them).

        :raises ~functuner.errors.ParamsMismatchError: a tensor does not require grad or is not a
            leaf (the message names it and says how to fix it).
        """
        tensors = list(self._tensors.values())
        if require_grad:
            for name, tensor in self._tensors.items():
                if not (tensor.requires_grad and tensor.is_leaf):
                    problem = "is not a leaf tensor" if tensor.requires_grad else "does not require grad"
                    raise ParamsMismatchError(
                        f"TunerParams.parameters(): tensor {name!r} {problem}, so torch.optim could never update "
                        f"it; expected leaf tensors with requires_grad=True. Fix: params = params.trainable() "
                        f"before building the optimizer (or parameters(require_grad=False) if you do not train)."
                    )
        return tensors

    def trainable(self) -> TunerParams:
        """New params whose tensors are fresh leaf copies with ``requires_grad=True``.

        For training with a ``torch.optim`` optimizer, which updates its tensors in place: the
        copies are what it trains, so ``self`` keeps its values.  Same names, config and adapter
        name; the copies are detached from any autograd graph (integer tensors, if any, stay without grad).
        """
        return self.map(lambda t: t.detach().clone().requires_grad_(t.is_floating_point() or t.is_complex()))

    def __eq__(self, other: object) -> bool:
        """Structural equality plus exact tensor equality (for tests and caches)."""
        if not isinstance(other, TunerParams):
            return NotImplemented
        if (self.config, self.adapter_name, list(self._tensors)) != (
            other.config,
            other.adapter_name,
            list(other._tensors),
        ):
            return False
        return all(torch.equal(a, other._tensors[k]) for k, a in self._tensors.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n = self.num_parameters()
        kind = type(self.config).__name__
        return f"TunerParams({kind}, adapter={self.adapter_name!r}, tensors={len(self)}, numel={n})"


# ---------------------------------------------------------------------------
# pytree registration
# ---------------------------------------------------------------------------
def _flatten(p: TunerParams) -> tuple[list[torch.Tensor], tuple[tuple[str, ...], Any, str]]:
    return list(p._tensors.values()), (tuple(p._tensors), p.config, p.adapter_name)


def _unflatten_torch(leaves: Any, aux: tuple[tuple[str, ...], Any, str]) -> TunerParams:
    names, config, adapter_name = aux
    return TunerParams(dict(zip(names, leaves, strict=True)), config, adapter_name)


def _flatten_with_keys(p: TunerParams) -> tuple[list[tuple[Any, torch.Tensor]], Any]:
    leaves, aux = _flatten(p)
    return [(torch_pytree.MappingKey(k), v) for k, v in zip(aux[0], leaves, strict=True)], aux


torch_pytree.register_pytree_node(
    TunerParams,
    _flatten,
    _unflatten_torch,
    serialized_type_name="functuner.TunerParams",
    flatten_with_keys_fn=_flatten_with_keys,
)


def _optree_flatten(p: TunerParams) -> tuple[list[torch.Tensor], Any, tuple[str, ...]]:
    leaves, aux = _flatten(p)
    return leaves, aux, aux[0]


def _optree_unflatten(aux: Any, leaves: Any) -> TunerParams:
    return _unflatten_torch(list(leaves), aux)


optree.register_pytree_node(
    TunerParams,
    cast(Any, _optree_flatten),
    _optree_unflatten,
    path_entry_type=optree.MappingEntry,
    namespace="functuner",
)
_GLOBAL_NS = getattr(optree.registry, "__GLOBAL_NAMESPACE", None)
if _GLOBAL_NS is not None:  # plain optree.tree_map(fn, params) without a namespace
    optree.register_pytree_node(
        TunerParams,
        cast(Any, _optree_flatten),
        _optree_unflatten,
        path_entry_type=optree.MappingEntry,
        namespace=_GLOBAL_NS,
    )


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``optree.tree_map`` in functuner's namespace (works on any nesting of params).

    Several trees must have one structure: params with the same config, adapter
    name and tensor names.  If they do not, a :class:`ConfigError` names the
    adapters and what differs (config fields such as ``r`` or
    ``target_modules``, tensor names) instead of optree's raw structure dump.
    """
    try:
        return optree.tree_map(fn, tree, *rest, namespace="functuner")
    except ValueError:
        problem = _structure_difference(tree, rest) if rest else None
        if problem is None:
            raise  # the same structure: the error came from fn
        raise ConfigError(f"functuner.tree_map: {problem}") from None


def _structure_difference(tree: Any, rest: tuple[Any, ...]) -> str | None:
    """Why ``tree`` and ``rest`` do not have one pytree structure (adapter by adapter), or ``None`` if they do."""

    def nodes(t: Any) -> tuple[list[Any], Any]:
        leaves, spec = optree.tree_flatten(t, is_leaf=lambda n: isinstance(n, TunerParams), namespace="functuner")
        return leaves, spec

    first, first_spec = nodes(tree)
    for i, other in enumerate(rest, start=1):
        items, spec = nodes(other)
        if spec != first_spec:
            return f"tree 0 and tree {i} are not nested the same way ({first_spec} vs {spec}); pass trees of one shape"
        for a, b in zip(first, items, strict=True):
            if not (isinstance(a, TunerParams) and isinstance(b, TunerParams)):
                continue
            if (a.config, a.adapter_name, list(a._tensors)) == (b.config, b.adapter_name, list(b._tensors)):
                continue
            return _params_difference(a, b)
    return None


def _params_difference(a: TunerParams, b: TunerParams) -> str:
    what = [f"adapters {a.adapter_name!r} and {b.adapter_name!r} cannot be mapped together"]
    if type(a.config) is not type(b.config):
        what.append(f"configs are a {type(a.config).__name__} and a {type(b.config).__name__}")
    else:
        da, db = a.config.to_dict(), b.config.to_dict()
        fields = [f"{k}={da.get(k)!r} vs {db.get(k)!r}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]
        if fields:
            what.append("their configs differ in " + ", ".join(fields[:6]) + (" ..." if len(fields) > 6 else ""))
    if a.adapter_name != b.adapter_name:
        what.append(f"their adapter names differ ({a.adapter_name!r} vs {b.adapter_name!r}; tensor names carry it)")
    only_a, only_b = sorted(set(a._tensors) - set(b._tensors)), sorted(set(b._tensors) - set(a._tensors))
    if only_a or only_b:
        what.append(f"{len(only_a)} tensor name(s) only in {a.adapter_name!r} {only_a[:2]}")
        what.append(f"{len(only_b)} only in {b.adapter_name!r} {only_b[:2]}")
    return (
        "; ".join(what)
        + ". A tree map (stacking for vmap, optimizer updates) needs one config, adapter name and tensor names;"
        " for a batch of adapters with different ranks or targets use per-sample adapters"
        " (functuner.tuners.lora.mixed.stack_adapters pads ranks)"
    )
