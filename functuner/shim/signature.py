"""``SwiftModel.forward`` with the wrapped model's signature, on the class.

Design note: ``transformers.Trainer`` reads label names (``find_labels``) and
whether a model can return its loss from ``type(model).forward``'s signature,
not the instance's; a ``SwiftModel`` forward of ``*args, **kwargs`` would make
``Trainer.evaluate()`` drop ``eval_loss`` unless ``label_names`` is passed.  So
each ``SwiftModel`` becomes an instance of a subclass (cached per wrapped model
class) whose ``forward`` carries the wrapped model's signature and behaves
exactly like ``SwiftModel.forward``.  Nothing else differs: ``isinstance`` and
the class name are unchanged.
"""

from __future__ import annotations

from inspect import Parameter, Signature, signature
from typing import Any

from torch import nn

__all__ = ["signed_class"]

# the forward signature on the class: transformers.Trainer reads label names from ``type(model).forward``
_SIGNED: dict[tuple[type, type], type] = {}


def signed_class(cls: type, inner: nn.Module) -> type:
    """A subclass of ``cls`` whose ``forward`` has ``inner.forward``'s signature (cached per inner model class).

    ``transformers.Trainer`` finds label names (``find_labels``) and whether a
    model can return its loss on ``type(model).forward``, so the signature must
    be on the class, not just on the instance.  Behaviour is ``cls.forward``'s.
    """
    if getattr(cls, "_signed_for", None) is not None:
        cls = cls.__mro__[1]
    fn = getattr(inner.forward, "__func__", None)
    cacheable = fn is not None and fn is getattr(type(inner), "forward", None)
    key = (cls, type(inner))
    if cacheable and key in _SIGNED:
        return _SIGNED[key]
    base_forward = cls.forward  # type: ignore[attr-defined]

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return base_forward(self, *args, **kwargs)

    inner_sig = signature(inner.forward)
    params = [Parameter("self", Parameter.POSITIONAL_ONLY), *inner_sig.parameters.values()]
    forward.__signature__ = Signature(params, return_annotation=inner_sig.return_annotation)  # type: ignore[attr-defined]
    forward.__doc__ = base_forward.__doc__
    ns = {
        "forward": forward,
        "_signed_for": type(inner),
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    signed = type(cls.__name__, (cls,), ns)
    if cacheable:
        _SIGNED[key] = signed
    return signed
