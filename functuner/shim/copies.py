"""Copies of a ``SwiftModel``: ``copy.deepcopy``, ``pickle`` and ``torch.save`` / ``torch.load(weights_only=False)``.

Design note: a ``SwiftModel`` is an instance of a per-process subclass (its
``forward`` carries the wrapped model's signature, :mod:`.signature`), and its
:class:`~.state.ShimState` holds what cannot be copied (thread-local state,
locks, built routes) and what a copy must not share (default routes registered
for the original's modules, merged weights recorded by module ``id``).  So a
copy is rebuilt as the plain class from the instance's ``__dict__``; the state
leaves its per-thread parts out (:meth:`ShimState.__getstate__`) and, once the
copy's modules exist, routes the copy's slots to the copy's own adapters
(:meth:`ShimState.rebind`).  Tensors are copied by torch as usual.
"""

from __future__ import annotations

from typing import Any, SupportsIndex

from torch import nn

from .signature import signed_class
from .state import ShimState

__all__ = ["Copyable"]


def _new_instance(cls: type[Copyable]) -> Copyable:
    """An empty instance for unpickling and ``copy.deepcopy`` (``__setstate__`` fills it)."""
    return cls.__new__(cls)


class Copyable(nn.Module):
    """Base of ``SwiftModel``: copies are independent models with the same adapters, active set and outputs."""

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        """Rebuilt as the plain class (the signed subclass is made per process) from the instance's state."""
        cls = type(self)
        if getattr(cls, "_signed_for", None) is not None:
            cls = cls.__mro__[1]
        return (_new_instance, (cls,), self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """The copy's own state: fresh per-thread state, its slots routed to its own adapters."""
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        shim: ShimState = self.__dict__["_state"]
        self.__class__ = signed_class(type(self), shim.model)
        shim.rebind()
