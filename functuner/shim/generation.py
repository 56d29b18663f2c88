"""What ``SwiftModel.generate`` enters around the wrapped model's ``generate``: the tuners' ``generation`` hooks.

A tuner whose calls behave differently inside ``generate`` (PEFT's prompt learning, whose
``prepare_inputs_for_generation`` drops the ``position_ids`` ``generate`` passes) gives ``Tuner.generation``, a
context; the shim enters the context of every tuner with an adapter loaded, so the routed calls that
``generate`` makes see it.  Nothing is written to the model (PEFT instead swaps the model's
``prepare_inputs_for_generation`` attribute for the duration).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from ..tuners import tuner_for
from .state import ShimState

__all__ = ["run_generate"]


def run_generate(state: ShimState, generate: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``generate(*args, **kwargs)`` inside the ``generation`` contexts of the loaded adapters' tuners."""
    hooks = {id(t.generation): t.generation for a in state.adapters.values() if (t := tuner_for(a.config)).generation}
    with ExitStack() as stack:
        for hook in hooks.values():
            stack.enter_context(hook())
        return generate(*args, **kwargs)
