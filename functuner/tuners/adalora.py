"""AdaLoRA (adaptive budget allocation for LoRA) as a config plus pure functions, with PEFT's math and names.

Per adapted module AdaLoRA learns an SVD-like update with ``init_r`` triplets,
``lora_A: (r, in)`` (conv: ``(r, in * kh * kw)``), ``lora_E: (r, 1)`` and
``lora_B: (out, r)``::

    y = base(x) + (dropout(x) @ (A * E).T @ B.T) * lora_alpha / (init_r + 1e-5)

During training the rank allocator (``adalora.allocator``, a
pure function of the training state) zeroes the least important singular values
``E`` until ``target_r`` triplets per module remain on average.  PEFT's forward
adds ``orth_reg_weight * (mean ||A A^T - I||_F, ||B^T B - I||_F)`` to the model's
loss; the functional API leaves the model's outputs alone, so add
:func:`orth_regularization` to your loss yourself (as the tests do to match PEFT).
A ``SwiftModel`` does what PEFT's model does (the ``Tuner.training`` hook): it adds the
term to ``outputs.loss`` (:func:`add_orth_loss`) and offers
``model.update_and_allocate(step)`` (also on ``model.base_model``); ``save_pretrained``
then writes the allocated ranks (:func:`allocated`), as PEFT saves them.

Layers (as in PEFT): ``nn.Linear``, transformers' GPT-2 ``Conv1D`` and ``nn.Conv2d``
(one group).  PEFT's ``r``, ``use_rslora`` and ``alpha_pattern`` are LoRA fields
AdaLoRA ignores; functuner accepts only their neutral values (``r=8``, ``False``,
``{}``) rather than ignoring them silently.  A config with ``rank_pattern`` (PEFT's
saved allocation, ``{"<module>.lora_E": [kept, ...]}``) holds each module's kept
triplets only, as PEFT's checkpoints do; ``ranknum`` stays ``init_r``.

Param names are PEFT's in-memory names relative to the original model:
``<module>.lora_A.<adapter>``, ``lora_E``, ``lora_B``.  ``add_weighted_adapter`` is
not supported (PEFT refuses it for AdaLoRA too).  Every function is pure.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..core.targets import is_conv1d_gpt2
from ..errors import ConfigError, ParamsMismatchError, UnsupportedModuleError
from . import _adalora_allocator as allocator
from . import _lycoris as ly
from .base import CallContext, KeyNaming, Tuner, TunerConfig, module_local
from .spec import Training

__all__ = [
    "PEFT_FORMAT",
    "TRAINING",
    "AdaLoraConfig",
    "add_orth_loss",
    "allocated",
    "allocator",
    "init",
    "merge",
    "orth_regularization",
    "routes",
    "tuner",
    "unmerge",
    "validate",
]

NAMES = ("lora_A", "lora_E", "lora_B")


@dataclass(frozen=True, eq=False)
class AdaLoraConfig(TunerConfig):
    """PEFT's ``AdaLoraConfig`` fields and defaults (peft 0.21; ``total_step`` is required).

    ``init_lora_weights=True``: ``E = 0`` (the base model), ``A, B ~ N(0, 0.02^2)``;
    ``False``: all three standard normal (PEFT's draws).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - PEFT's field name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Any = None
    rank_pattern: Any = None
    r: int = 8
    target_modules: Any = None
    exclude_modules: Any = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Any = None
    init_lora_weights: bool = True
    layers_to_transform: Any = None
    layers_pattern: Any = None
    alpha_pattern: Any = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # bookkeeping fields PEFT writes into adapter_config.json
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    auto_mapping: Any = None
    peft_version: Any = None
    swift_type: str = "ADALORA"
    peft_type: str = "ADALORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_r", "init_r", "tinit", "tfinal", "deltaT"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name in ("init_r", "deltaT") else 0):
                raise ConfigError(
                    f"AdaLoraConfig.{name} must be a {'positive' if name in ('init_r', 'deltaT') else 'non-negative'} integer, got {v!r}"
                )
        ts = self.total_step
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int) or ts <= 0):
            raise ConfigError(f"AdaLoraConfig.total_step must be a positive integer, got {ts!r}")
        if ts is not None and self.tinit >= ts - self.tfinal:
            raise ConfigError(
                f"AdaLoraConfig: tinit ({self.tinit}) >= total_step ({ts}) - tfinal ({self.tfinal}) leaves no budgeting"
                " phase (as PEFT refuses); decrease tfinal / tinit or increase total_step"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ConfigError(f"AdaLoraConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        if float(self.orth_reg_weight) < 0:
            raise ConfigError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"AdaLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        neutral = {"r": 8, "use_rslora": False, "use_dora": False, "lora_bias": False, "bias": "none"}
        for name, value in neutral.items():
            if getattr(self, name) != value:
                raise ConfigError(
                    f"AdaLoraConfig.{name}={getattr(self, name)!r} is not supported: AdaLoRA ignores or refuses it"
                    f" (PEFT: r -> use init_r; use_dora/lora_bias/bias are LoRA options); leave it at {value!r}"
                )
        if self.alpha_pattern:
            raise ConfigError("AdaLoraConfig.alpha_pattern must be empty: AdaLoRA uses one lora_alpha (as PEFT)")
        if not isinstance(self.init_lora_weights, bool):
            raise ConfigError(f"AdaLoraConfig.init_lora_weights must be True or False, got {self.init_lora_weights!r}")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"AdaLoraConfig.rank_pattern must be a dict or None, got {self.rank_pattern!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("AdaLoraConfig: layers_pattern needs layers_to_transform as well (as in PEFT)")

    def check(self, *, complete: bool = True) -> None:
        if complete and self.total_step is None:
            raise ConfigError("AdaLoraConfig.total_step is None: AdaLoRA needs the number of training steps (> 0)")

    def kept(self, module_name: str) -> list[bool] | None:
        """The saved allocation of ``module_name`` (``rank_pattern``), or ``None`` for all ``init_r`` triplets."""
        for key, mask in (self.rank_pattern or {}).items():
            parts = str(key).split(".")
            if "lora_E" in parts and ".".join(parts[: len(parts) - 1 - parts[::-1].index("lora_E")]) == module_name:
                return [bool(v) for v in mask]
        return None


def _dims(name: str, module: nn.Module) -> tuple[int, int, str]:
    if is_conv1d_gpt2(module):
        w = cast(torch.Tensor, module.weight)
        return int(w.shape[0]), int(w.shape[1]), "conv1d_gpt2"
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise UnsupportedModuleError(
                f"AdaLoRA cannot adapt {name!r}: a grouped Conv2d (PEFT's SVDConv2d needs groups=1)"
            )
        k = int(module.kernel_size[0]) * int(module.kernel_size[1])
        return module.in_channels * k, module.out_channels, "conv"
    raise UnsupportedModuleError(
        f"AdaLoRA cannot adapt module {name!r} of type {type(module).__name__}; supported: nn.Linear, nn.Conv2d,"
        " transformers Conv1D (as in PEFT)"
    )


def expected_shapes(name: str, module: nn.Module, config: AdaLoraConfig) -> dict[str, tuple[int, ...]]:
    """``{lora_A: (r, in), lora_E: (r, 1), lora_B: (out, r)}``; ``r`` is ``init_r`` or the saved allocation's."""
    fan_in, out, _ = _dims(name, module)
    kept = config.kept(name)
    r = config.init_r if kept is None else sum(kept)
    return {"lora_A": (r, fan_in), "lora_E": (r, 1), "lora_B": (out, r)}


def _layout(model: nn.Module, params: TunerParams) -> ly.Layout:
    return ly.build_layout(model, params, NAMES, expected_shapes, "AdaLoRA")


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`~functuner.errors.ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    _layout(model, params)


def init(
    model: nn.Module, config: AdaLoraConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh AdaLoRA triplets drawn like PEFT (from ``generator`` only); tensors take the base weight's dtype/device."""
    if not isinstance(config, AdaLoraConfig):
        raise ConfigError(f"adalora.init needs an AdaLoraConfig, got {type(config).__name__}")
    config.check()
    plans = [(n, m, expected_shapes(n, m, config)) for n, m in ly.selected_modules(model, config)]
    tensors: dict[str, torch.Tensor] = {}
    for name, module, shapes in plans:
        w = cast(torch.Tensor, module.weight)
        if config.init_lora_weights:
            drawn = {
                "lora_A": torch.randn(shapes["lora_A"], generator=generator) * 0.02,
                "lora_E": torch.zeros(shapes["lora_E"]),
                "lora_B": torch.randn(shapes["lora_B"], generator=generator) * 0.02,
            }
        else:
            drawn = {t: torch.randn(shapes[t], generator=generator) for t in ("lora_A", "lora_E", "lora_B")}
        for t, v in drawn.items():
            tensors[f"{name}.{t}.{adapter_name}"] = v.to(device=w.device, dtype=w.dtype)
    tensors.update(ly.init_modules_to_save(model, config, adapter_name))
    return TunerParams(tensors, config, adapter_name)


def _scale(config: AdaLoraConfig, dtype: torch.dtype, device: torch.device) -> tuple[float, torch.Tensor]:
    """``(scaling, ranknum + 1e-5)`` as PEFT computes them (``ranknum`` a tensor of ``init_r``)."""
    alpha = float(config.lora_alpha)
    scaling = alpha if alpha > 0 else float(config.init_r)
    return scaling, torch.full((1,), float(config.init_r), dtype=dtype, device=device) + 1e-5


def _dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return F.dropout(x, p, training=True)
    keep = torch.empty(x.shape, dtype=x.dtype, device="cpu").bernoulli_(1.0 - p, generator=generator).to(x.device)
    return x * keep / (1.0 - p)


def _slot(
    tensors: dict[str, torch.Tensor],
    config: AdaLoraConfig,
    generator: torch.Generator | None,
    module: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    a, e, b = tensors["lora_A"], tensors["lora_E"], tensors["lora_B"]
    x = ly.first_arg(args, kwargs, "AdaLoRA").to(a.dtype)
    p = float(config.lora_dropout)
    if p > 0 and module.training:
        x = _dropout(x, p, generator)
    scaling, ranknum = _scale(config, a.dtype, a.device)
    if isinstance(module, nn.Conv2d):
        delta = (b @ (a * e) * scaling / ranknum).reshape(module.weight.shape)
        term = F.conv2d(x, delta, None, module.stride, module.padding, module.dilation, module.groups)
    else:
        term = (x @ (a * e).T @ b.T) * scaling / ranknum
    return (out + term).to(out.dtype)


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """A slot per adapted module adding AdaLoRA's term; ``modules_to_save`` overrides run first."""
    layout = _layout(model, params)
    fwd: dict[nn.Module, list[Any]] = {}
    for site in layout.sites:
        tensors = {t: params[k] for t, k in site.keys.items()}
        fwd.setdefault(site.module, []).append(functools.partial(_slot, tensors, params.config, ctx.generator))
    ly.override_routes(layout, params, fwd)
    ensure_slots(list(fwd))
    return Routes(forward=fwd)


def needs_generator(model: nn.Module, params: TunerParams) -> bool:
    """Whether a call in the model's current mode draws random numbers (``lora_dropout`` in training)."""
    return float(params.config.lora_dropout) > 0 and any(s.module.training for s in _layout(model, params).sites)


def orth_regularization(params: TunerParams) -> torch.Tensor:
    """PEFT's orthogonal regulariser: the mean over ``A``s and ``B``s of ``||A A^T - I||_F`` / ``||B^T B - I||_F``.

    PEFT adds ``orth_reg_weight`` times this to the loss inside its forward; add it to yours. Pure, differentiable.
    """
    terms = []
    for key, p in params.items():
        if ".modules_to_save." in key:
            continue
        tname = key.rsplit(".", 2)[-2]
        if tname in ("lora_A", "lora_B"):
            cov = p @ p.T if tname == "lora_A" else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum() / len(terms)


# PEFT's task types whose ``PeftModel`` subclass calls ``AdaLoraModel.forward`` (peft 0.21's
# ``MODEL_TYPE_TO_PEFT_MODEL_MAPPING``); a ``PeftModel`` of another or no task type calls the base model directly,
# so PEFT adds the regulariser only for these
_FORWARD_TASKS = frozenset({"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"})


def add_orth_loss(params: TunerParams, outputs: Any) -> Any:
    """``outputs`` with ``orth_reg_weight * orth_regularization(params)`` added to ``outputs.loss``, as PEFT's forward.

    As in PEFT: only when the outputs have a tensor ``loss`` (the model was called with labels) and the config's
    ``task_type`` is one of PEFT's task types (``"CAUSAL_LM"``...); otherwise ``outputs`` unchanged.  Differentiable.
    """
    loss = getattr(outputs, "loss", None)
    task = getattr(params.config.task_type, "value", params.config.task_type)
    if not isinstance(loss, torch.Tensor) or task not in _FORWARD_TASKS:
        return outputs
    outputs.loss = loss + float(params.config.orth_reg_weight) * orth_regularization(params).to(loss.device)
    return outputs


def allocated(params: TunerParams, rank_pattern: Mapping[str, Any] | None) -> TunerParams:
    """The adapter as PEFT saves it after allocation: each module's kept triplets only, ``rank_pattern`` in the config.

    ``rank_pattern``: the allocator's (``state.rank_pattern``, keys ``<module>.lora_E.<adapter>``) or ``None``
    (``params`` unchanged).  Config keys lose the adapter name (``<module>.lora_E``), as PEFT writes them.
    Params that are already allocated (a config with ``rank_pattern``) get the patterns composed.  Pure.
    """
    if not rank_pattern:
        return params
    trip = allocator.triplets(params)
    ad = params.adapter_name
    new, pattern = dict(params), {}
    for key, keep in rank_pattern.items():
        module = key[: -len(f".lora_E.{ad}")] if key.endswith(f".lora_E.{ad}") else None
        if module not in trip or len(keep) != params[key].shape[0]:
            raise ParamsMismatchError(
                f"adalora.allocated: rank_pattern[{key!r}] does not fit the params (expected <module>.lora_E.{ad}"
                f" of a module they adapt, with {params[key].shape[0] if key in params else '?'} entries)"
            )
        idx = torch.tensor([bool(v) for v in keep], device=params[key].device)
        new[trip[module]["lora_A"]] = params[trip[module]["lora_A"]][idx]
        new[key] = params[key][idx]
        new[trip[module]["lora_B"]] = params[trip[module]["lora_B"]][:, idx]
        before = params.config.kept(module)
        kept = iter(bool(v) for v in keep)
        pattern[f"{module}.lora_E"] = (
            [next(kept) if b else False for b in before] if before else [bool(v) for v in keep]
        )
    return TunerParams(new, dataclasses.replace(params.config, rank_pattern=pattern), ad)


#: What a ``SwiftModel`` runs for AdaLoRA (PEFT's ``AdaLoraModel.forward`` and ``update_and_allocate``).
TRAINING = Training(
    loss=add_orth_loss,
    step_name="update_and_allocate",
    init_state=allocator.init_state,
    step=allocator.update_and_allocate,
    saved=lambda params, state: allocated(params, state.rank_pattern),
)


def _delta_for(model: nn.Module, config: AdaLoraConfig) -> Any:
    """``delta(name, tensors, weight shape)`` for the shared merge: ``dW`` in the weight's own layout."""

    def delta(name: str, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        a, e, b = tensors["lora_A"], tensors["lora_E"], tensors["lora_B"]
        scaling, ranknum = _scale(config, a.dtype, a.device)
        dw = b @ (a * e) * scaling / ranknum
        return dw.T if is_conv1d_gpt2(model.get_submodule(name)) else dw.reshape(shape)

    return delta


def merge(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """New base weights ``W + dW`` (fp32, rounded once to ``W``'s dtype); ``modules_to_save`` copies replace theirs."""
    return ly.merge_deltas(model, _layout(model, params), params, base, 1.0, _delta_for(model, params.config))


def unmerge(model: nn.Module, params: TunerParams, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``W' - dW`` (fp32, rounded once); ``modules_to_save`` parameters stay as they are."""
    return ly.merge_deltas(model, _layout(model, params), params, merged, -1.0, _delta_for(model, params.config))


# PEFT's checkpoint layout: ``base_model.model.<module>.lora_A`` / ``lora_E`` / ``lora_B`` (``ranknum`` is not saved)
PEFT_FORMAT = ly.peft_format("ADALORA", NAMES, "AdaLoRA")


tuner = Tuner(
    swift_type="ADALORA",
    config_cls=AdaLoraConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    needs_generator=needs_generator,
    key_naming=KeyNaming(after=NAMES),
    peft=PEFT_FORMAT,
    check_model=ly.model_check(expected_shapes),
    check_state=ly.state_check(NAMES, "AdaLoRA"),
    training=TRAINING,
    sub_batch=module_local,
)
