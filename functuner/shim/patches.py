"""A ``forward`` that a library patches onto a ``SwiftModel`` runs on the wrapped model, whose structure it expects.

Design note: TRL's trainers replace ``model.forward`` with a function bound to
the model (``types.MethodType``) that reaches the backbone through
``self.base_model`` and the head through ``self.get_output_embeddings()``: a
transformers ``PreTrainedModel``'s structure.  On a ``SwiftModel``,
``base_model`` is SWIFT's name for the whole wrapped model, so the patch would
get a causal LM where it expects the backbone.  :func:`move_forward_patch`
installs such a patch (the known ones: :data:`MOVED_PATCHES`) on the wrapped
model instead (bound to it), where
``SwiftModel.forward`` calls it with the adapters routed as always.  The patch
usually calls the forward it replaced (the ``SwiftModel``'s) for its ordinary
path; inside a moved patch :func:`inner_call` then goes to the wrapped model's
class ``forward`` directly, so that path does not loop back into the patch.
"""

from __future__ import annotations

import contextvars
import functools
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["MOVED_PATCHES", "inner_call", "move_forward_patch"]

_IN_MOVED_PATCH: contextvars.ContextVar[bool] = contextvars.ContextVar("functuner_in_moved_patch", default=False)


#: ``(file name part, function name)`` of the known patches written for a ``PreTrainedModel``'s structure
#: (matched on the code object: ``functools.wraps`` renames the function itself)
MOVED_PATCHES = frozenset({("trl", "_fused_forward")})


def _is_known_patch(fn: Any) -> bool:
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    parts = Path(code.co_filename).parts
    return any(code.co_name == name and part in parts for part, name in MOVED_PATCHES)


def move_forward_patch(wrapper: nn.Module, inner: nn.Module, value: Any) -> bool:
    """Install a known patch bound to ``wrapper`` as ``inner.forward``, bound to ``inner``; False for anything else.

    Other patches (accelerate's autocast wrapper of the ``SwiftModel``'s own forward...) stay on the
    ``SwiftModel``: they call its forward, which calls the wrapped model and so a moved patch.
    """
    if not isinstance(value, types.MethodType) or value.__self__ is not wrapper or not _is_known_patch(value.__func__):
        return False
    fn = value.__func__

    @functools.wraps(fn)
    def moved(*args: Any, **kwargs: Any) -> Any:
        token = _IN_MOVED_PATCH.set(True)
        try:
            return fn(inner, *args, **kwargs)
        finally:
            _IN_MOVED_PATCH.reset(token)

    inner.__dict__["forward"] = moved
    return True


def inner_call(inner: nn.Module) -> Callable[..., Any]:
    """How ``SwiftModel.forward`` calls the wrapped model: as a module, or its class forward inside a moved patch."""
    if _IN_MOVED_PATCH.get() and "forward" in inner.__dict__:
        return functools.partial(type(inner).forward, inner)
    return inner
