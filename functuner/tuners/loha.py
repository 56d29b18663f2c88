"""LoHa (low-rank Hadamard product, from LyCORIS) as a config plus pure functions, with PEFT's math and names.

Per adapted module with base weight ``W`` and scaling ``s = alpha / r``:

* ``nn.Linear``: ``dW = s * (w1_a @ w1_b) * (w2_a @ w2_b)`` (elementwise product of
  two rank-``r`` matrices, so the update can have rank up to ``r**2``), with
  ``w*_a: (out, r)``, ``w*_b: (r, in)``; ``y = base(x) + x @ dW.T``.
* ``nn.Conv2d`` / ``nn.Conv1d``: the same on the kernel flattened to
  ``(out, in/groups * prod(kernel))``, reshaped to the kernel; with
  ``use_effective_conv2d`` (and a kernel larger than 1) a CP decomposition
  ``t*: (r, r, *kernel)``, ``w*_a: (r, out)``, ``w*_b: (r, in/groups)``;
  ``y = base(x) + conv(x, dW)`` with the base conv's stride, padding, dilation, groups.

The Hadamard product needs the full-size ``dW`` in the forward (as in PEFT).
In training, ``module_dropout`` skips the whole adapter with that probability
and ``rank_dropout`` zeroes rows of ``dW`` (rescaled by the kept fraction), both
drawn from the call's generator.

Param names are PEFT's in-memory names relative to the original model:
``<module>.hada_w1_a.<adapter>``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``,
``hada_t1``, ``hada_t2``; ``modules_to_save`` copies at
``<module>.modules_to_save.<adapter>.<param>``.  Every function is pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..core.params import TunerParams
from ..core.targets import pattern_value
from ..errors import ConfigError, UnsupportedModuleError
from . import _lycoris as ly
from .base import KeyNaming, Tuner, TunerConfig, module_local

__all__ = ["PEFT_FORMAT", "LoHaConfig", "delta_weight", "init", "merge", "routes", "tuner", "unmerge", "validate"]

NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@dataclass(frozen=True, eq=False)
class LoHaConfig(TunerConfig):
    """PEFT's ``LoHaConfig`` fields and defaults (peft 0.21).

    ``target_modules`` is required (PEFT's per-architecture defaults are not
    applied).  ``init_weights=True`` makes ``hada_w2_b`` zero, so the adapted
    model starts equal to the base model; ``False`` draws everything at random.
    """

    rank_pattern: Any = field(default_factory=dict)
    alpha_pattern: Any = field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Any = None
    exclude_modules: Any = None
    init_weights: bool = True
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None
    # bookkeeping fields PEFT writes into adapter_config.json
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    auto_mapping: Any = None
    peft_version: Any = None
    swift_type: str = "LOHA"
    peft_type: str = "LOHA"

    def __post_init__(self) -> None:
        super().__post_init__()
        ly.check_lycoris_fields(self)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"LoHaConfig.init_weights must be True or False, got {self.init_weights!r}")

    def rank_for(self, module_name: str) -> int:
        return int(pattern_value(module_name, self.rank_pattern, self.r))

    def scaling_for(self, module_name: str) -> float:
        return float(pattern_value(module_name, self.alpha_pattern, self.alpha)) / self.rank_for(module_name)


def _weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def expected_shapes(name: str, module: nn.Module, config: LoHaConfig) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of LoHa on ``module`` under ``config`` (PEFT's layout); raises for other layers."""
    r = config.rank_for(name)
    if isinstance(module, nn.Linear):
        out, fan_in = module.out_features, module.in_features
        return {"hada_w1_a": (out, r), "hada_w1_b": (r, fan_in), "hada_w2_a": (out, r), "hada_w2_b": (r, fan_in)}
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        k = tuple(int(d) for d in module.kernel_size)
        out, fan_in = module.out_channels, module.in_channels // module.groups
        if config.use_effective_conv2d and math.prod(k) != 1:
            t = (r, r, *k) if len(k) == 2 else (r, r, k[0], 1)
            return {
                "hada_t1": t,
                "hada_w1_a": (r, out),
                "hada_w1_b": (r, fan_in),
                "hada_t2": t,
                "hada_w2_a": (r, out),
                "hada_w2_b": (r, fan_in),
            }
        flat = fan_in * math.prod(k)
        return {"hada_w1_a": (out, r), "hada_w1_b": (r, flat), "hada_w2_a": (out, r), "hada_w2_b": (r, flat)}
    raise UnsupportedModuleError(
        f"LoHa cannot adapt module {name!r} of type {type(module).__name__}; supported: nn.Linear, nn.Conv1d,"
        " nn.Conv2d (as in PEFT)"
    )


def delta_weight(tensors: Mapping[str, torch.Tensor], scaling: float, shape: tuple[int, ...]) -> torch.Tensor:
    """The full-size ``dW`` in the base weight's ``shape``, in the adapter's dtype (PEFT's ``get_delta_weight``)."""
    if "hada_t1" in tensors:
        rebuild1 = torch.einsum("ijkl,jr,ip->prkl", tensors["hada_t1"], tensors["hada_w1_b"], tensors["hada_w1_a"])
        rebuild2 = torch.einsum("ijkl,jr,ip->prkl", tensors["hada_t2"], tensors["hada_w2_b"], tensors["hada_w2_a"])
        w = rebuild1 * rebuild2 * scaling
    else:
        w1 = tensors["hada_w1_a"] @ tensors["hada_w1_b"]
        w2 = tensors["hada_w2_a"] @ tensors["hada_w2_b"]
        w = (w1 * w2) * scaling
    return w.reshape(shape)


def _layout(model: nn.Module, params: TunerParams) -> ly.Layout:
    return ly.build_layout(model, params, NAMES, expected_shapes, "LoHa")


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`~functuner.errors.ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    _layout(model, params)


def init(
    model: nn.Module, config: LoHaConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh LoHa params drawn like PEFT (``kaiming_uniform_(a=sqrt(5))``; ``hada_w2_b`` zero unless ``init_weights=False``).

    Every module is checked before anything is drawn, so an unsupported layer
    raises :class:`UnsupportedModuleError` naming it.  Tensors take the base
    weight's dtype and device; draws use only ``generator`` (on CPU).
    """
    if not isinstance(config, LoHaConfig):
        raise ConfigError(f"loha.init needs a LoHaConfig, got {type(config).__name__}")
    selected = ly.selected_modules(model, config)
    plans = [(name, module, expected_shapes(name, module, config)) for name, module in selected]
    tensors: dict[str, torch.Tensor] = {}
    for name, module, shapes in plans:
        w = _weight(module)
        for tname, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.float32)
            if tname == "hada_w2_b" and config.init_weights:
                torch.nn.init.zeros_(t)
            else:
                torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            tensors[f"{name}.{tname}.{adapter_name}"] = t.to(device=w.device, dtype=w.dtype)
    tensors.update(ly.init_modules_to_save(model, config, adapter_name))
    return TunerParams(tensors, config, adapter_name)


def _delta(config: LoHaConfig, name: str, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return delta_weight(tensors, config.scaling_for(name), shape)


def _dropouts(cfg: LoHaConfig) -> tuple[float, float, bool]:
    return float(cfg.module_dropout), float(cfg.rank_dropout), True


# routes (a slot per adapted module adding ``op(x, dW)``), needs_generator, merge (``W + dW`` in fp32, rounded
# once) and unmerge: the functions every weight-delta tuner shares, built from this module's layout and delta
routes, needs_generator, merge, unmerge = ly.delta_functions(_layout, _delta, _dropouts)


# PEFT's checkpoint layout for these params (``<module>.<name>`` under ``base_model.model.``): functuner.load /
# functuner.save read and write it; Swift.from_pretrained still hands PEFT directories to peft (shim_reads=False).
PEFT_FORMAT = ly.peft_format("LOHA", NAMES, "LoHa")


tuner = Tuner(
    swift_type="LOHA",
    config_cls=LoHaConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    key_naming=KeyNaming(after=NAMES),
    peft=PEFT_FORMAT,
    check_model=ly.model_check(expected_shapes),
    check_state=ly.state_check(NAMES, "LoHa"),
    needs_generator=needs_generator,
    sub_batch=module_local,
)
