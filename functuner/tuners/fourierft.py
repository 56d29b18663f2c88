"""FourierFT (parameter-efficient fine-tuning with the discrete Fourier transform) as a config plus pure functions.

PEFT's math and names.  Per adapted module with base weight ``W: (out, in)``, FourierFT
learns ``n`` spectral coefficients ``c`` (``fourierft_spectrum``) at ``n`` fixed
frequencies drawn from ``random_loc_seed`` alone (PEFT's ``randperm`` on a CPU
generator, so they are never stored) and adds::

    dW = scaling * Re(ifft2(S)),   S[out, in] = 0 except S[rows, cols] = c
    y  = base(x) + x @ dW.T

Layers (as in PEFT): ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (its weight
is ``(in, out)``: the merge adds ``dW.T``; PEFT's ``fan_in_fan_out`` follows the
layer type, so the field is accepted and the layer decides).  ``bias`` other than
``"none"`` is refused.  ``n_frequency_pattern`` uses PEFT's rule: the first key
``k`` with ``re.match(".*\\.k$", name)``, else the module's full name.

Param names are PEFT's in-memory names relative to the original model:
``<module>.fourierft_spectrum.<adapter>``; ``modules_to_save`` copies at
``<module>.modules_to_save.<adapter>.<param>``.  Every function is pure.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..core.params import TunerParams
from ..core.targets import is_conv1d_gpt2
from ..errors import ConfigError, UnsupportedModuleError
from . import _lycoris as ly
from .base import KeyNaming, Tuner, TunerConfig, module_local

__all__ = [
    "PEFT_FORMAT",
    "FourierFTConfig",
    "delta_weight",
    "frequencies",
    "init",
    "merge",
    "routes",
    "tuner",
    "unmerge",
    "validate",
]

NAMES = ("fourierft_spectrum",)


@dataclass(frozen=True, eq=False)
class FourierFTConfig(TunerConfig):
    """PEFT's ``FourierFTConfig`` fields and defaults (peft 0.21).

    ``target_modules`` is required (PEFT's per-architecture defaults are not
    applied).  ``init_weights=False`` (PEFT's default) draws the spectrum from a
    standard normal, so the adapted model differs from the base from the start;
    ``True`` starts from zeros.
    """

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: Any = None
    exclude_modules: Any = None
    bias: str = "none"
    modules_to_save: Any = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    n_frequency_pattern: Any = field(default_factory=dict)
    init_weights: bool = False
    # bookkeeping fields PEFT writes into adapter_config.json
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    auto_mapping: Any = None
    peft_version: Any = None
    swift_type: str = "FOURIERFT"
    peft_type: str = "FOURIERFT"

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_frequency
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"FourierFTConfig.n_frequency must be a positive integer, got {n!r}")
        if not isinstance(self.n_frequency_pattern, dict):
            raise ConfigError(
                f"FourierFTConfig.n_frequency_pattern must be a dict {{name: n}}, got {self.n_frequency_pattern!r}"
            )
        for key, val in self.n_frequency_pattern.items():
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ConfigError(
                    f"FourierFTConfig.n_frequency_pattern[{key!r}] must be a positive integer, got {val!r}"
                )
        if isinstance(self.random_loc_seed, bool) or not isinstance(self.random_loc_seed, int):
            raise ConfigError(f"FourierFTConfig.random_loc_seed must be an int, got {self.random_loc_seed!r}")
        if self.bias != "none":
            raise ConfigError(
                f"FourierFTConfig.bias={self.bias!r} is not supported natively (functuner keeps base biases frozen);"
                " use bias='none', or give peft.FourierFTConfig to Swift.prepare_model for PEFT's own FourierFT"
            )
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"FourierFTConfig.init_weights must be True or False, got {self.init_weights!r}")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ConfigError("FourierFTConfig: layers_to_transform / layers_pattern need a list target_modules")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("FourierFTConfig: layers_pattern needs layers_to_transform as well (as in PEFT)")

    def n_for(self, module_name: str) -> int:
        """PEFT's ``n_frequency_pattern`` lookup for ``module_name``."""
        pattern = self.n_frequency_pattern
        key = next((k for k in pattern if re.match(rf".*\.{k}$", module_name)), module_name)
        return int(pattern.get(key, self.n_frequency))


def _in_out(name: str, module: nn.Module) -> tuple[int, int]:
    if is_conv1d_gpt2(module):
        w = cast(torch.Tensor, module.weight)
        return int(w.shape[0]), int(w.shape[1])
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise UnsupportedModuleError(
        f"FourierFT cannot adapt module {name!r} of type {type(module).__name__}; supported: nn.Linear and"
        " transformers Conv1D (as in PEFT)"
    )


def expected_shapes(name: str, module: nn.Module, config: FourierFTConfig) -> dict[str, tuple[int, ...]]:
    """``{"fourierft_spectrum": (n,)}`` for ``module``; raises for unsupported layers or ``n > in * out``."""
    fan_in, out = _in_out(name, module)
    n = config.n_for(name)
    if n > fan_in * out:
        raise ConfigError(
            f"FourierFT n_frequency={n} for module {name!r} exceeds its {out} x {fan_in} = {out * fan_in} weights"
            " (as PEFT refuses); lower n_frequency or n_frequency_pattern"
        )
    return {"fourierft_spectrum": (n,)}


@functools.lru_cache(maxsize=256)
def frequencies(seed: int, out: int, fan_in: int, n: int) -> torch.Tensor:
    """PEFT's ``(2, n)`` frequency indices (rows, cols) of a ``(out, in)`` weight, from ``seed`` alone. Constant."""
    flat = torch.randperm(out * fan_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // fan_in, flat % fan_in], dim=0)


def delta_weight(spectrum: torch.Tensor, indices: torch.Tensor, out: int, fan_in: int, scaling: float) -> torch.Tensor:
    """``scaling * Re(ifft2(S))`` as ``(out, in)`` in the spectrum's dtype (PEFT's ``get_delta_weight``); pure."""
    idx = indices.to(spectrum.device)
    flat = idx[0] * fan_in + idx[1]
    dense = torch.zeros(out * fan_in, device=spectrum.device, dtype=torch.float32).index_add(0, flat, spectrum.float())
    return cast(torch.Tensor, (torch.fft.ifft2(dense.reshape(out, fan_in)).real * scaling).to(spectrum.dtype))


def _layout(model: nn.Module, params: TunerParams) -> ly.Layout:
    return ly.build_layout(model, params, NAMES, expected_shapes, "FourierFT")


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`~functuner.errors.ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    _layout(model, params)


def init(
    model: nn.Module, config: FourierFTConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh spectra: standard normal from ``generator`` (PEFT's default), or zeros with ``init_weights=True``.

    Every targeted module is checked before anything is drawn; tensors take the base weight's dtype and device.
    """
    if not isinstance(config, FourierFTConfig):
        raise ConfigError(f"fourierft.init needs a FourierFTConfig, got {type(config).__name__}")
    plans = [(n, m, expected_shapes(n, m, config)["fourierft_spectrum"]) for n, m in ly.selected_modules(model, config)]
    tensors: dict[str, torch.Tensor] = {}
    for name, module, shape in plans:
        w = cast(torch.Tensor, module.weight)
        t = torch.zeros(shape) if config.init_weights else torch.randn(shape, generator=generator)
        tensors[f"{name}.fourierft_spectrum.{adapter_name}"] = t.to(device=w.device, dtype=w.dtype)
    tensors.update(ly.init_modules_to_save(model, config, adapter_name))
    return TunerParams(tensors, config, adapter_name)


def _delta_out_in(config: FourierFTConfig, name: str, tensors: Mapping[str, torch.Tensor], module: nn.Module) -> Any:
    fan_in, out = _in_out(name, module)
    idx = frequencies(config.random_loc_seed, out, fan_in, int(tensors["fourierft_spectrum"].shape[0]))
    return delta_weight(tensors["fourierft_spectrum"], idx, out, fan_in, float(config.scaling))


def _delta_for(model: nn.Module) -> ly.DeltaOf:
    """``delta_of`` for the shared weight-delta functions: ``(out, in)`` for the forward, the weight's layout to merge."""

    def delta(config: Any, name: str, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        module = model.get_submodule(name)
        dw = _delta_out_in(config, name, tensors, module)
        return cast(torch.Tensor, dw)

    return delta


def routes(model: nn.Module, params: TunerParams, ctx: Any) -> Any:
    """A slot per adapted module adding ``x @ dW.T``; ``modules_to_save`` overrides run first."""
    fns = ly.delta_functions(_layout, _delta_for(model), lambda cfg: (0.0, 0.0, False))
    return fns.routes(model, params, ctx)


def _merge_impl(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None, sign: float
) -> dict[str, torch.Tensor]:
    layout = _layout(model, params)
    cfg: FourierFTConfig = params.config

    def delta(name: str, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        module = model.get_submodule(name)
        dw = cast(torch.Tensor, _delta_out_in(cfg, name, tensors, module))
        return dw.T if is_conv1d_gpt2(module) else dw

    return ly.merge_deltas(model, layout, params, base, sign, delta)


def merge(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """New base weights ``W + dW`` (fp32, rounded once to ``W``'s dtype); ``modules_to_save`` copies replace theirs."""
    return _merge_impl(model, params, base, 1.0)


def unmerge(model: nn.Module, params: TunerParams, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``W' - dW`` (fp32, rounded once); ``modules_to_save`` parameters stay as they are."""
    return _merge_impl(model, params, merged, -1.0)


# PEFT's checkpoint layout: ``base_model.model.<module>.fourierft_spectrum`` (the frequencies come from the seed)
PEFT_FORMAT = ly.peft_format("FOURIERFT", NAMES, "FourierFT")


tuner = Tuner(
    swift_type="FOURIERFT",
    config_cls=FourierFTConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    key_naming=KeyNaming(after=NAMES),
    peft=PEFT_FORMAT,
    check_model=ly.model_check(expected_shapes),
    check_state=ly.state_check(NAMES, "FourierFT"),
    sub_batch=module_local,
)
