"""NEFTune (Jain et al. 2023) with SWIFT's ``NEFTuneConfig``: noisy embeddings while training.

For every ``nn.Embedding`` of the model *in training mode*, the output ``e`` of
shape ``(..., seq_len, dim)`` becomes::

    e + U(-m, m),   m = noise_alpha / sqrt(seq_len * dim)

(``m`` computed in float32 as SWIFT does).  In eval mode the model is unchanged.
The tuner has no trainable tensors (its params are empty); its merged form is
the base model itself.  As in SWIFT, adding it to a model through the stateful
shim leaves the model's own parameters trainable (``Tuner.freezes_base=False``).

Randomness: the functional API draws the noise from the call's ``generator``
(required in training mode: :func:`needs_generator`); ``generator=None`` (the
stateful shim) draws from torch's global RNG with exactly SWIFT's op sequence,
so a seeded run reproduces SWIFT's noise.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..errors import ConfigError, ParamsMismatchError, TargetError
from .base import CallContext, Tuner, TunerConfig

__all__ = ["NEFTuneConfig", "init", "merge", "needs_generator", "noise_bound", "routes", "tuner", "unmerge", "validate"]


@dataclass(frozen=True, eq=False)
class NEFTuneConfig(TunerConfig):
    """SWIFT's ``NEFTuneConfig``: ``noise_alpha`` scales the uniform noise (default 5.0)."""

    noise_alpha: float = 5.0
    swift_type: str = "neftune"
    model_key_mapping: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.noise_alpha, bool) or not isinstance(self.noise_alpha, (int, float)) or self.noise_alpha < 0:
            raise ConfigError(f"NEFTuneConfig.noise_alpha must be a number >= 0, got {self.noise_alpha!r}")


def _embeddings(model: nn.Module) -> list[nn.Module]:
    found: list[nn.Module] = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not found:
        raise TargetError(f"NEFTune needs an nn.Embedding in the model; {type(model).__name__} has none")
    return found


def init(
    model: nn.Module, config: NEFTuneConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Empty params (NEFTune trains nothing); checks that the model has embeddings. Pure."""
    if not isinstance(config, NEFTuneConfig):
        raise ConfigError(f"neftune.init needs a NEFTuneConfig, got {type(config).__name__}")
    _embeddings(model)
    return TunerParams({}, config, adapter_name)


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise if ``params`` holds tensors (NEFTune has none) or the model has no embedding. Pure."""
    if len(params):
        raise ParamsMismatchError(f"NEFTune params must be empty, got keys {sorted(params)[:5]}")
    _embeddings(model)


def noise_bound(noise_alpha: float, seq_len: int, dim: int) -> float:
    """``noise_alpha / sqrt(seq_len * dim)``, rounded through float32 exactly as SWIFT computes it."""
    return float(noise_alpha / torch.sqrt(torch.tensor(seq_len * dim)))


def _slot(
    cfg: NEFTuneConfig,
    generator: torch.Generator | None,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    if not module.training:
        return out
    m = noise_bound(cfg.noise_alpha, out.size(-2) if out.dim() > 1 else 1, out.size(-1))
    if generator is None:
        noise = torch.zeros_like(out).uniform_(-m, m)
    else:
        gen_device = generator.device
        noise = torch.zeros(out.shape, dtype=out.dtype, device=gen_device).uniform_(-m, m, generator=generator)
        noise = noise.to(out.device)
    return out + noise


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """A forward slot on every embedding adding the noise when that embedding is in training mode."""
    fn = functools.partial(_slot, params.config, ctx.generator)
    mods = _embeddings(model)
    ensure_slots(mods)
    return Routes(forward={m: [fn] for m in mods})


def needs_generator(model: nn.Module, params: TunerParams) -> bool:
    """Whether a call would draw noise: some embedding is in training mode and ``noise_alpha > 0``."""
    return params.config.noise_alpha > 0 and any(m.training for m in _embeddings(model))


def merge(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The base weights unchanged (NEFTune only acts while training). Pure."""
    if base is None:
        base = dict(model.named_parameters(remove_duplicate=False))
        base.update(dict(model.named_buffers(remove_duplicate=False)))
    return dict(base)


def unmerge(model: nn.Module, params: TunerParams, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`merge`: ``merged`` unchanged. Pure."""
    return dict(merged)


tuner = Tuner(
    swift_type="neftune",
    config_cls=NEFTuneConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    needs_generator=needs_generator,
    freezes_base=False,  # as SWIFT: NEFTune only adds noise, the model stays fully trainable
)
