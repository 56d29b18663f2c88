"""LoKr (low-rank Kronecker product, from LyCORIS) as a config plus pure functions, with PEFT's math and names.

Per adapted module with base weight ``W`` (``out x in``, conv kernels flattened
or kept, as PEFT does) and scaling ``s = alpha / r``: ``out = a * b`` and
``in = c * d`` are factorised (:func:`factorization`, ``decompose_factor``) and

    ``dW = s * kron(w1, w2)`` reshaped to ``W``'s shape,

with ``w1: (a, c)`` either a full matrix (``lokr_w1``) or, when
``decompose_both`` and ``r`` is small, ``lokr_w1_a @ lokr_w1_b``; and ``w2: (b, d,
*kernel)`` a full tensor (``lokr_w2``) when ``r >= max(b, d) / 2``, else
``lokr_w2_a @ lokr_w2_b`` or, with ``use_effective_conv2d``, a CP decomposition
with ``lokr_t2``.  ``y = base(x) + op(x, dW)`` with the base layer's op (linear,
or conv with its stride/padding/dilation/groups).

Training-time ``module_dropout`` / ``rank_dropout`` (rescaled only with
``rank_dropout_scale``) are drawn from the call's generator.  Param names are
PEFT's in-memory names: ``<module>.lokr_w1.<adapter>`` etc.; ``modules_to_save``
copies at ``<module>.modules_to_save.<adapter>.<param>``.  Every function is pure.
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

__all__ = [
    "PEFT_FORMAT",
    "LoKrConfig",
    "delta_weight",
    "factorization",
    "init",
    "merge",
    "routes",
    "tuner",
    "unmerge",
    "validate",
]

NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_INIT_CHOICES = (True, False, "lycoris")


@dataclass(frozen=True, eq=False)
class LoKrConfig(TunerConfig):
    """PEFT's ``LoKrConfig`` fields and defaults (peft 0.21).

    ``target_modules`` is required (PEFT's per-architecture defaults are not
    applied).  ``init_weights=True`` makes ``w1`` zero (the adapted model starts
    equal to the base model); ``"lycoris"`` makes ``w2`` zero instead; ``False``
    draws everything at random.
    """

    rank_pattern: Any = field(default_factory=dict)
    alpha_pattern: Any = field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: Any = None
    exclude_modules: Any = None
    init_weights: Any = True
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
    swift_type: str = "LOKR"
    peft_type: str = "LOKR"

    def __post_init__(self) -> None:
        super().__post_init__()
        ly.check_lycoris_fields(self)
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            raise ConfigError(f"LoKrConfig.init_weights must be one of {_INIT_CHOICES}, got {self.init_weights!r}")
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int):
            raise ConfigError(
                f"LoKrConfig.decompose_factor must be an integer (-1: near sqrt), got {self.decompose_factor!r}"
            )

    def rank_for(self, module_name: str) -> int:
        return int(pattern_value(module_name, self.rank_pattern, self.r))

    def scaling_for(self, module_name: str) -> float:
        return float(pattern_value(module_name, self.alpha_pattern, self.alpha)) / self.rank_for(module_name)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n``: LyCORIS's rule (``factor`` divides, else near sqrt).

    ``factor > 0`` dividing ``dimension`` gives ``(factor, dimension // factor)``
    as is; otherwise divisors ``m`` are searched upward from 1 while ``m < n``
    and ``m <= factor`` (``-1``: no bound).  Same results as PEFT's.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    length = m + n  # PEFT compares with the first sum only (never exceeded, kept for fidelity)
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > bound:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def expected_shapes(name: str, module: nn.Module, config: LoKrConfig) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of LoKr on ``module`` under ``config`` (PEFT's layout); raises for other layers."""
    r = config.rank_for(name)
    k: tuple[int, ...] = ()
    if isinstance(module, nn.Linear):
        fan_in, out = module.in_features, module.out_features
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        fan_in, out, k = module.in_channels // module.groups, module.out_channels, tuple(module.kernel_size)
    else:
        raise UnsupportedModuleError(
            f"LoKr cannot adapt module {name!r} of type {type(module).__name__}; supported: nn.Linear, nn.Conv1d,"
            " nn.Conv2d (as in PEFT)"
        )
    c, d = factorization(fan_in, config.decompose_factor)
    a, b = factorization(out, config.decompose_factor)
    shapes: dict[str, tuple[int, ...]] = {}
    if not (config.decompose_both and r < max(a, c) / 2):
        shapes["lokr_w1"] = (a, c)
    else:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (a, r), (r, c)
    effective = bool(k) and config.use_effective_conv2d and math.prod(k) != 1
    if r >= max(b, d) / 2:
        shapes["lokr_w2"] = (b, d, *k)
    elif effective:
        shapes["lokr_t2"] = (r, r, *k) if len(k) == 2 else (r, r, k[0], 1)
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (r, b), (r, d)
    else:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, r), (r, d * math.prod(k))
    return shapes


def delta_weight(tensors: Mapping[str, torch.Tensor], scaling: float, shape: tuple[int, ...]) -> torch.Tensor:
    """The full-size ``dW`` in the base weight's ``shape``, in the adapter's dtype (PEFT's ``get_delta_weight``)."""
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    if "lokr_w2" in tensors:
        w2 = tensors["lokr_w2"]
    elif "lokr_t2" in tensors:
        w2 = torch.einsum("ijkl,ip,jr->prkl", tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"])
    else:
        w2 = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    # torch.kron fails on inputs whose unit dims have odd strides (einsum's output for a Conv1d CP kernel, which
    # crashes PEFT 0.21's LoKr): give both operands standard strides first
    w1, w2 = w1.clone(memory_format=torch.contiguous_format), w2.clone(memory_format=torch.contiguous_format)
    return (torch.kron(w1, w2) * scaling).reshape(shape)


def _layout(model: nn.Module, params: TunerParams) -> ly.Layout:
    return ly.build_layout(model, params, NAMES, expected_shapes, "LoKr")


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`~functuner.errors.ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    _layout(model, params)


def _zero(tname: str, init_weights: Any) -> bool:
    """Whether PEFT's init of ``init_weights`` makes tensor ``tname`` zero."""
    if init_weights is True:
        return tname in ("lokr_w1", "lokr_w1_a")
    if init_weights == "lycoris":
        return tname in ("lokr_w2", "lokr_w2_b")
    return False


def init(
    model: nn.Module, config: LoKrConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh LoKr params drawn like PEFT (``kaiming_uniform_(a=sqrt(5))``, zeros where ``init_weights`` says).

    Every module is checked before anything is drawn, so an unsupported layer
    raises :class:`UnsupportedModuleError` naming it.  Tensors take the base
    weight's dtype and device; draws use only ``generator`` (on CPU).
    """
    if not isinstance(config, LoKrConfig):
        raise ConfigError(f"lokr.init needs a LoKrConfig, got {type(config).__name__}")
    plans = [(n, m, expected_shapes(n, m, config)) for n, m in ly.selected_modules(model, config)]
    tensors: dict[str, torch.Tensor] = {}
    for name, module, shapes in plans:
        w = cast(torch.Tensor, module.weight)
        for tname, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.float32)
            if _zero(tname, config.init_weights):
                torch.nn.init.zeros_(t)
            else:
                torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            tensors[f"{name}.{tname}.{adapter_name}"] = t.to(device=w.device, dtype=w.dtype)
    tensors.update(ly.init_modules_to_save(model, config, adapter_name))
    return TunerParams(tensors, config, adapter_name)


def _delta(config: LoKrConfig, name: str, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return delta_weight(tensors, config.scaling_for(name), shape)


def _dropouts(cfg: LoKrConfig) -> tuple[float, float, bool]:
    return float(cfg.module_dropout), float(cfg.rank_dropout), bool(cfg.rank_dropout_scale)


# routes (a slot per adapted module adding ``op(x, dW)``), needs_generator, merge (``W + dW`` in fp32, rounded
# once) and unmerge: the functions every weight-delta tuner shares, built from this module's layout and delta
routes, needs_generator, merge, unmerge = ly.delta_functions(_layout, _delta, _dropouts)


# PEFT's checkpoint layout for these params (``<module>.<name>`` under ``base_model.model.``): functuner.load /
# functuner.save read and write it; Swift.from_pretrained still hands PEFT directories to peft (shim_reads=False).
PEFT_FORMAT = ly.peft_format("LOKR", NAMES, "LoKr")


tuner = Tuner(
    swift_type="LOKR",
    config_cls=LoKrConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    key_naming=KeyNaming(after=NAMES),
    peft=PEFT_FORMAT,
    check_model=ly.model_check(expected_shapes),
    check_state=ly.state_check(NAMES, "LoKr"),
    needs_generator=needs_generator,
    sub_batch=module_local,
)
