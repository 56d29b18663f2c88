"""MergedLinear LoRA: SWIFT's ``LoRAConfig(use_merged_linear=True, enable_lora=[...])`` for fused projections.

A fused projection (ChatGLM's ``query_key_value``) is one ``nn.Linear`` whose
``out_features`` are ``k = len(enable_lora)`` equal chunks (``c = out / k`` rows
each: q, k, v).  MergedLinear LoRA adapts only the chunks ``enable_lora`` marks,
``n = sum(enable_lora)`` of them, each with its own rank-``r`` pair:

* ``lora_A``: ``(n * r, in)``, the ``n`` ``A_g`` (``(r, in)``) stacked;
* ``lora_B``: ``(n * c, r)``, the ``n`` ``B_g`` (``(c, r)``) stacked (SWIFT runs it as
  the weight of a ``Conv1d`` with ``groups=n``);
* the delta weight is ``s * P(B_1 A_1, ..., B_n A_n)``: ``P`` places the ``g``-th
  block at the ``g``-th enabled chunk's rows and zeros elsewhere, ``s = lora_alpha / r``
  (``rank_pattern`` / ``alpha_pattern`` apply per module; SWIFT ignores rsLoRA here).

Forward: ``y = W x + b + s * P(B_g A_g dropout(x))``, computed chunk-wise (two
small matmuls, never the ``(out, in)`` delta); merge: ``W + s P(...)`` in fp32,
rounded once, as plain LoRA's merge.

Names, as ms-swift 4.6's ``MergedLinear`` module holds them: ``<module>.lora_A`` and
``<module>.lora_B``, plain parameters of the adapted layer, without the adapter
name (functuner's params and the shim's ``named_parameters()`` use the same).
ms-swift 4.6 saves *no* tensor for this layer (its ``lora_state_dict`` keeps only keys
containing ``.<adapter>``, which these lack), so a SWIFT checkpoint of it holds
only ``adapter_config.json``; functuner writes ``adapter_model.safetensors`` with
these names, which ms-swift's ``from_pretrained`` loads.  ms-swift's ``Swift.merge``
adds the delta without marking the layer merged (the forward then adds it twice);
functuner's merge is the functional one (the shim swaps weights and restores them
exactly).

PEFT has no MergedLinear: :func:`to_plain_lora` converts an adapter into plain LoRA
on the same fused layer, ``A = lora_A`` and ``B`` block-structured (``B_g`` at the
enabled chunk's rows and the ``g``-th ``r`` columns, zeros elsewhere) with rank
``n r`` and ``lora_alpha * n`` (so ``s`` is unchanged): the same delta weight (zero
blocks add exact zeros), which PEFT's format then holds.  Saving the MergedLinear
adapter itself in PEFT's format is refused (:class:`CheckpointError`).

Fields SWIFT's ``MergedLinear`` ignores (DoRA, rsLoRA, other inits, biases,
``fan_in_fan_out``...) are refused by :func:`check_config` rather than silently
differing; per-sample batches and ``add_weighted_adapter`` are refused by name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ...core.params import TunerParams
from ...core.routing import Routes, ensure_slots
from ...core.targets import select_modules
from ...errors import CheckpointError, ConfigError, ParamsMismatchError, TargetError
from ..base import CallContext, ShardMergePlan, resolve_dtype
from .config import check_merged_linear as check_config
from .forward import first_arg
from .keys import param_names

__all__ = [
    "MergedSite",
    "by_config",
    "check_config",
    "check_model",
    "check_state",
    "delta_weight",
    "init",
    "is_merged",
    "merge",
    "needs_generator",
    "plan_shard_merge",
    "refuse_combine",
    "refuse_per_sample",
    "routes",
    "sites",
    "to_plain_lora",
    "unmerge",
    "validate",
]


def is_merged(config: Any) -> bool:
    """Whether ``config`` asks for MergedLinear LoRA (``use_merged_linear=True``)."""
    return bool(getattr(config, "use_merged_linear", False))


def keys(module_name: str) -> tuple[str, str]:
    """``(lora_A, lora_B)`` keys of a MergedLinear adapter at ``module_name`` (SWIFT's names, no adapter name)."""
    prefix = f"{module_name}." if module_name else ""
    return f"{prefix}lora_A", f"{prefix}lora_B"


class MergedSite(NamedTuple):
    """One adapted fused layer: its name, rank, chunk rows ``c``, ``enable_lora`` and scaling."""

    name: str
    r: int
    chunk: int
    enable: tuple[bool, ...]
    scaling: float
    a: str
    b: str

    @property
    def weight(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"


def _modules_of(state: Any) -> list[str]:
    """Adapted module names: keys ``<module>.lora_A`` (in the params' order)."""
    return [k[: -len("lora_A")].rstrip(".") for k in state if k == "lora_A" or k.endswith(".lora_A")]


def site_for(
    config: Any, name: str, weight_shape: tuple[int, ...], a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> str | MergedSite:
    """The site of ``name``, or what is wrong with the shapes (a message to raise with the caller's type)."""
    enable = tuple(config.enable_lora)
    if len(weight_shape) != 2:
        return f"{name!r}: the base weight has shape {weight_shape}; MergedLinear adapts 2-D nn.Linear weights"
    out, inp = weight_shape
    if out % len(enable):
        return (
            f"{name!r}: out_features={out} is not divisible by len(enable_lora)={len(enable)} (SWIFT asserts the"
            " same); give one enable_lora entry per equal output chunk"
        )
    n, r, chunk = sum(enable), config.rank_for(name), out // len(enable)
    want_a, want_b = (n * r, inp), (n * chunk, r)
    if tuple(a_shape) != want_a or tuple(b_shape) != want_b:
        return (
            f"{name!r}: lora_A {tuple(a_shape)} / lora_B {tuple(b_shape)} do not fit a ({out}, {inp}) layer with"
            f" r={r}, enable_lora={list(enable)}: expected {want_a} / {want_b} (fix r or rank_pattern)"
        )
    a, b = keys(name)
    return MergedSite(name, r, chunk, enable, config.alpha_for(name) / r, a, b)


def sites(params: TunerParams, weight_shapes: Mapping[str, tuple[int, ...]], what: str) -> list[MergedSite]:
    """Every adapted layer of ``params`` against ``{weight key: shape}`` (:class:`ParamsMismatchError`)."""
    out = []
    for name in _modules_of(params.keys()):
        a, b = keys(name)
        wkey = f"{name}.weight" if name else "weight"
        if b not in params:
            raise ParamsMismatchError(f"{what}: MergedLinear LoRA params have {a!r} but no {b!r}")
        if wkey not in weight_shapes:
            raise ParamsMismatchError(f"{what}: the base has no {wkey!r} for MergedLinear LoRA key {a!r}")
        site = site_for(params.config, name, tuple(weight_shapes[wkey]), params[a].shape, params[b].shape)
        if isinstance(site, str):
            raise ParamsMismatchError(f"{what}: {site}")
        out.append(site)
    extra = set(params.keys()) - {k for s in out for k in (s.a, s.b)}
    if extra:
        raise ParamsMismatchError(f"{what}: keys {sorted(extra)[:4]} are not MergedLinear LoRA tensors (lora_A/lora_B)")
    return out


def _linear(model: nn.Module, name: str, what: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ParamsMismatchError(f"{what}: the model has no module {name!r} (MergedLinear LoRA)") from None
    if not isinstance(module, nn.Linear):
        raise TargetError(
            f"{what}: MergedLinear LoRA adapts nn.Linear layers (as SWIFT's MergedLinear), but {name!r} is a"
            f" {type(module).__name__}; target the fused nn.Linear (e.g. query_key_value)"
        )
    return module


def _model_sites(model: nn.Module, params: TunerParams, what: str) -> list[tuple[MergedSite, nn.Linear]]:
    mods = {name: _linear(model, name, what) for name in _modules_of(params.keys())}
    shapes = {(f"{n}.weight" if n else "weight"): tuple(m.weight.shape) for n, m in mods.items()}
    return [(s, mods[s.name]) for s in sites(params, shapes, what)]


# ---------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------
def _place(blocks: torch.Tensor, enable: tuple[bool, ...]) -> torch.Tensor:
    """``(..., n, c, x)`` blocks -> ``(..., k * c, x)`` with block ``g`` at the ``g``-th enabled chunk, zeros elsewhere."""
    zeros = blocks.new_zeros(blocks.shape[:-3] + blocks.shape[-2:])
    it = iter(blocks.unbind(-3))
    return torch.cat([next(it) if on else zeros for on in enable], dim=-2)


def delta_weight(A: torch.Tensor, B: torch.Tensor, enable: tuple[bool, ...], scaling: float) -> torch.Tensor:
    """The ``(out, in)`` delta ``s * P(B_g A_g)`` in float32 (SWIFT's ``merge_AB() * scaling``). Pure."""
    n = sum(enable)
    r, chunk = A.shape[0] // n, B.shape[0] // n
    blocks = torch.bmm(B.float().reshape(n, chunk, r), A.float().reshape(n, r, -1))
    return _place(blocks, enable) * scaling


def lowrank_out(h: torch.Tensor, B: torch.Tensor, enable: tuple[bool, ...]) -> torch.Tensor:
    """``P(B_g h_g)`` for ``h = x A^T`` (``(..., n r)``): the unscaled LoRA output, ``(..., out)``. Pure."""
    n = sum(enable)
    r, chunk = h.shape[-1] // n, B.shape[0] // n
    y = torch.einsum("...gr,gcr->...gc", h.reshape(*h.shape[:-1], n, r), B.reshape(n, chunk, r))
    return _place(y.unsqueeze(-1), enable).squeeze(-1)


# ---------------------------------------------------------------------------
# the tuner's functions
# ---------------------------------------------------------------------------
def init(
    model: nn.Module,
    config: Any,
    generator: torch.Generator,
    adapter_name: str = "default",
    *,
    data: Mapping[str, torch.Tensor] | None = None,
) -> TunerParams:
    """Fresh MergedLinear params: ``lora_A`` kaiming-uniform (``a=sqrt(5)``, as SWIFT), ``lora_B`` zero. Pure.

    Tensors are float32 (SWIFT creates them in torch's default dtype whatever the base's) unless ``lora_dtype``
    is set, on the base weight's device; random draws use only ``generator``.
    """
    check_config(config, complete=True)
    selected = select_modules(
        model,
        config.target_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    dtype = resolve_dtype(config.lora_dtype, "lora_dtype") or torch.float32
    tensors: dict[str, torch.Tensor] = {}
    for name, module in selected:
        w = _linear(model, name, "MergedLinear LoRA").weight
        if "lora_A" in module._parameters or "lora_A" in module._modules:
            raise ConfigError(
                f"MergedLinear LoRA on {name!r}: the layer already holds another adapter's 'lora_A'; MergedLinear's"
                " tensors are named <module>.lora_A / lora_B without the adapter name (as in SWIFT), so such a layer"
                " takes one adapter: delete the other adapter or target other modules"
            )
        n, r = sum(config.enable_lora), config.rank_for(name)
        if w.shape[0] % len(config.enable_lora):
            raise ConfigError(str(site_for(config, name, tuple(w.shape), (), ())))
        A = torch.empty(n * r, w.shape[1], dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        B = torch.zeros(n * (w.shape[0] // len(config.enable_lora)), r, dtype=torch.float32)
        a, b = keys(name)
        tensors[a], tensors[b] = A.to(device=w.device, dtype=dtype), B.to(device=w.device, dtype=dtype)
    return TunerParams(tensors, config, adapter_name)


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` / :class:`TargetError` if ``params`` do not fit ``model``. Pure."""
    _model_sites(model, params, "functuner.validate")


def _dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout drawing from ``generator`` on CPU (as LoRA's forward; torch's global RNG when ``None``)."""
    if generator is None:
        return F.dropout(x, p, training=True)
    keep = torch.empty(x.shape, dtype=x.dtype, device="cpu").bernoulli_(1.0 - p, generator=generator).to(x.device)
    return x * keep / (1.0 - p)


def _slot(
    site: MergedSite,
    A: torch.Tensor,
    B: torch.Tensor,
    dropout: float,
    generator: torch.Generator | None,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    xa = first_arg(args, kwargs).to(A.dtype)
    if dropout > 0.0 and module.training:
        xa = _dropout(xa, dropout, generator)
    return (out + lowrank_out(F.linear(xa, A), B, site.enable) * site.scaling).to(out.dtype)


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """One call's slots: ``s P(B_g A_g x)`` added to each adapted layer's output."""
    p = float(params.config.lora_dropout)
    fwd: dict[nn.Module, list[Any]] = {}
    for site, module in _model_sites(model, params, "functuner.apply"):
        fn = functools.partial(_slot, site, params[site.a], params[site.b], p, ctx.generator)
        fwd.setdefault(module, []).append(fn)
    ensure_slots(list(fwd))
    return Routes(forward=fwd)


def needs_generator(model: nn.Module, params: TunerParams) -> bool:
    """Whether a call draws random numbers (dropout on a layer in training mode)."""
    if params.config.lora_dropout <= 0:
        return False
    return any(m.training for _, m in _model_sites(model, params, "functuner.apply"))


def _state(model_or_weights: Any, base: Mapping[str, torch.Tensor] | None, what: str) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_weights, nn.Module):
        if base is not None:
            return base
        state: dict[str, torch.Tensor] = dict(model_or_weights.named_parameters(remove_duplicate=False))
        state.update(dict(model_or_weights.named_buffers(remove_duplicate=False)))
        return state
    if not isinstance(model_or_weights, Mapping):
        raise ConfigError(f"{what}: expected an nn.Module or a {{name: tensor}} weights mapping")
    return model_or_weights if base is None else base


def _shifted(
    model_or_weights: Any, params: TunerParams, state: Mapping[str, torch.Tensor], sign: float, what: str
) -> dict[str, torch.Tensor]:
    if isinstance(model_or_weights, nn.Module):
        _model_sites(model_or_weights, params, what)  # nn.Linear targets only
    out = dict(state)
    for site in sites(params, {k: tuple(v.shape) for k, v in state.items()}, what):
        old = state[site.weight]
        new = (old.float() + delta_weight(params[site.a], params[site.b], site.enable, sign * site.scaling)).to(
            old.dtype
        )
        for k, t in state.items():  # tied weights: every name of the same tensor
            if t is old:
                out[k] = new
    return out


def merge(
    model_or_weights: Any,
    params: TunerParams,
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    unmerged: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """New base weights ``W + s P(B_g A_g)`` (fp32, rounded once); ``unmerged`` is not needed (linear in ``W``)."""
    return _shifted(model_or_weights, params, _state(model_or_weights, base, "merge"), 1.0, "merge")


def unmerge(
    model_or_weights: Any, params: TunerParams, merged: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``W' - s P(B_g A_g)`` (fp32, rounded once): the originals up to one rounding (keep them for exactness)."""
    if merged is None and isinstance(model_or_weights, nn.Module):
        raise ConfigError("unmerge(model, params, merged): pass the merged weights")
    return _shifted(model_or_weights, params, _state(model_or_weights, merged, "unmerge"), -1.0, "unmerge")


def plan_shard_merge(
    tensors: Mapping[str, torch.Tensor],
    config: Any,
    adapter_name: str,
    shapes: Mapping[str, tuple[int, ...]],
    fan_in_fan_out: bool,
    source: str,
) -> ShardMergePlan:
    """The streaming merge of one MergedLinear adapter: each fused weight gets ``+ s P(B_g A_g)``. Pure."""
    merges: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for site in sites(TunerParams(dict(tensors), config, adapter_name), shapes, source):
        merges[site.weight] = _plus_fn(tensors[site.a], tensors[site.b], site)
    return ShardMergePlan(merges, {})


def _plus_fn(A: torch.Tensor, B: torch.Tensor, site: MergedSite) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(w: torch.Tensor) -> torch.Tensor:
        return w.float() + delta_weight(A, B, site.enable, site.scaling)

    return fn


# ---------------------------------------------------------------------------
# disk checks (before tensors are allocated / against their own config)
# ---------------------------------------------------------------------------
def check_model(model: nn.Module, config: Any, source: str) -> None:
    """A MergedLinear config read from ``source`` against ``model``: targets exist, are nn.Linear, divide evenly."""
    check_config(config, complete=True)
    for name, module in select_modules(
        model,
        config.target_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    ):
        w = _linear(model, name, source).weight
        if w.shape[0] % len(config.enable_lora):
            raise CheckpointError(f"{source}: {site_for(config, name, tuple(w.shape), (), ())}")
        del module


def check_state(config: Any, state: Mapping[str, torch.Tensor], source: str) -> None:
    """MergedLinear tensors read from ``source``: only ``lora_A``/``lora_B`` pairs whose shapes agree with ``config``."""
    for name in _modules_of(state):
        a, b = keys(name)
        if b not in state:
            raise CheckpointError(f"{source}: has {a!r} but no {b!r} (MergedLinear LoRA)")
        A, B = state[a], state[b]
        n, r = sum(config.enable_lora), config.rank_for(name)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != n * r or B.shape[1] != r or B.shape[0] % n:
            raise CheckpointError(
                f"{source}: {name!r} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit r={r},"
                f" enable_lora={list(config.enable_lora)} (expected ({n * r}, in) / ({n} * out/{len(config.enable_lora)},"
                f" {r})); fix r or rank_pattern in adapter_config.json"
            )
    extra = sorted(k for k in state if not (k.endswith("lora_A") or k.endswith("lora_B")))
    if extra:
        raise CheckpointError(f"{source}: keys {extra[:4]} are not MergedLinear LoRA tensors (lora_A/lora_B)")


# ---------------------------------------------------------------------------
# PEFT: the equivalent plain LoRA; what is refused
# ---------------------------------------------------------------------------
def to_plain_lora(params: TunerParams) -> TunerParams:
    """The same adapter as plain LoRA on the fused layers (PEFT can hold it): exact, pure.

    ``A`` stays; ``B`` becomes ``(out, n r)`` with ``B_g`` at the ``g``-th enabled chunk's rows and
    columns ``g r .. (g+1) r``, zeros elsewhere; ``r``, ``lora_alpha`` and both patterns are multiplied by
    ``n = sum(enable_lora)``, so every module's scaling is unchanged.  ``B A`` equals the MergedLinear
    delta ``P(B_g A_g)`` (the zero blocks add exact zeros).
    """
    config = params.config
    if not is_merged(config):
        raise ConfigError("to_plain_lora: these params are not MergedLinear LoRA (use_merged_linear=False)")
    n, k = sum(config.enable_lora), len(config.enable_lora)
    tensors: dict[str, torch.Tensor] = {}
    for name in _modules_of(params.keys()):
        a, b = keys(name)
        A, B = params[a], params[b]
        r, chunk = A.shape[0] // n, B.shape[0] // n
        full = torch.zeros(k * chunk, n * r, dtype=B.dtype, device=B.device)
        on = [j for j, e in enumerate(config.enable_lora) if e]
        for g, j in enumerate(on):  # B_g at the g-th enabled chunk's rows and the g-th r columns
            full[j * chunk : (j + 1) * chunk, g * r : (g + 1) * r] = B[g * chunk : (g + 1) * chunk]
        plain_a, plain_b, _ = param_names(name, "linear", params.adapter_name)
        tensors[plain_a], tensors[plain_b] = A.clone(), full
    plain = dataclasses.replace(
        config,
        use_merged_linear=False,
        enable_lora=None,
        r=config.r * n,
        lora_alpha=config.lora_alpha * n,
        rank_pattern={p: v * n for p, v in config.rank_pattern.items()},
        alpha_pattern={p: v * n for p, v in config.alpha_pattern.items()},
    )
    return TunerParams(tensors, plain, params.adapter_name)


def refuse_combine(combine: Callable[..., TunerParams]) -> Callable[..., TunerParams]:
    """``add_weighted_adapter`` that refuses MergedLinear adapters (:class:`ConfigError` naming the field)."""

    @functools.wraps(combine)
    def call(adapters: Any, *args: Any, **kwargs: Any) -> TunerParams:
        values = adapters.values() if isinstance(adapters, Mapping) else adapters
        if any(is_merged(getattr(p, "config", None)) for p in values):
            raise ConfigError(
                "add_weighted_adapter does not take MergedLinear LoRA adapters (use_merged_linear=True);"
                " convert each with functuner.tuners.lora.merged_linear.to_plain_lora first"
            )
        return combine(adapters, *args, **kwargs)

    return call


def refuse_per_sample(unsupported: Callable[[nn.Module, TunerParams], str | None]) -> Callable[..., str | None]:
    """The per-sample ``unsupported`` hook, naming ``use_merged_linear`` for MergedLinear adapters."""

    def call(model: nn.Module, params: TunerParams) -> str | None:
        if is_merged(params.config):
            return "is a MergedLinear LoRA (use_merged_linear=True), which has no per-sample path"
        return unsupported(model, params)

    return call


def refuse_peft(config_to_json: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """PEFT's config hook, refusing MergedLinear with the way out (:class:`CheckpointError` naming the field)."""

    def call(config: Any) -> dict[str, Any]:
        if is_merged(config):
            raise CheckpointError(
                "use_merged_linear=True: PEFT has no MergedLinear LoRA, so PEFT's format cannot hold it; save"
                " in SWIFT's format, or convert losslessly with"
                " functuner.tuners.lora.merged_linear.to_plain_lora(params) and save that"
            )
        return config_to_json(config)

    return call


def by_config(plain: Callable[..., Any], merged: Callable[..., Any], where: int = 1) -> Callable[..., Any]:
    """A tuner hook running ``merged`` for MergedLinear configs/params (argument ``where``), else ``plain``."""

    @functools.wraps(plain)
    def call(*args: Any, **kwargs: Any) -> Any:
        arg = args[where] if len(args) > where else kwargs.get("params", kwargs.get("config"))
        return (merged if is_merged(getattr(arg, "config", arg)) else plain)(*args, **kwargs)

    cast(Any, call).__kwdefaults__ = getattr(plain, "__kwdefaults__", None)  # functional.merge reads merge's keywords
    return call
