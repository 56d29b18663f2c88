"""ReFT: low-rank interventions on the hidden states that chosen layers output, implemented natively.

Wu et al. 2024 (arXiv:2404.03592).  For a layer output ``h`` (``(..., d)``) and
rank ``r``, with ``R`` ``(r, d)`` orthonormal rows (stored transposed as
``rotate_layer``, ``(d, r)``, pyreft's layout), ``W`` ``(r, d)``, ``b`` ``(r,)``
(``learned_source``), ``P`` ``(r, d)`` (``proj_layer``, not orthogonal), ``s``
``(r,)`` and an activation ``a`` (identity by default):

=======================  ===========================================
``LoreftIntervention``   ``h + R^T (a(W h + b) - R h)``
``NoreftIntervention``   ``h + P^T (a(W h + b) - (P h + c))``
``ConsreftIntervention`` ``h + R^T (s - R h)``
``LobireftIntervention`` ``h + R^T s``
``DireftIntervention``   ``h + R^T a(W h + b)``
``NodireftIntervention`` ``h + P^T a(W h + b)``
=======================  ===========================================

``c`` is ``proj_layer.bias`` (only with ``args={'add_bias': true}``).  These
are pyreft's formulas (its ``interventions.py``); pyreft itself is not needed.
Orthonormality of ``R``: pyreft keeps it with torch's ``orthogonal``
parametrization; functuner, whose params are plain tensors, orthonormalizes
``rotate_layer`` in the forward pass (QR with the signs fixed so an orthonormal
matrix maps to itself), so any gradient step still yields an orthonormal ``R``.
Dropout (``args['dropout']``) acts on the intervened output in training mode,
as in pyreft, drawing only from the call's generator.

Where: the outputs of ``<layer_key>.<i>`` for ``i`` in ``layers`` (all layers
when ``None``).  Which positions: every position, unless the call passes
``intervention_locations`` (``(batch, n_interventions, n_positions)`` token
indices, SWIFT's/pyreft's layout) as a keyword argument; a slot on the model
takes it out of the model's kwargs, and intervention ``j`` (``j``-th chosen
layer) rewrites only those positions.  Limitation: when several ReFT adapters run in
one call, only the first reads ``intervention_locations``; the others
intervene at every position.

Param names: ``<layer_key>.<i>.reft_<adapter>.<pyreft state key>``, e.g.
``model.layers.0.reft_default.rotate_layer``,
``model.layers.0.reft_default.learned_source.weight``.  SWIFT saves ReFT with
pyreft's ``save_intervention`` (``intkey_*.bin`` files, one per layer);
functuner reads them with torch's restricted loader only
(:mod:`functuner.tuners._reft_files`, read by :mod:`functuner.io.tuner_files`)
and writes ``adapter_model.safetensors``, or, with ``safe_serialization=False``,
the same ``intkey_*.bin`` files as SWIFT.

ReFT has no merged form (it rewrites hidden states at positions).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..errors import ConfigError, TargetError
from ._reft_files import INTKEY_GLOB, from_intkey_files, to_intkey_files
from .base import CallContext, KeyNaming, Tuner, TunerConfig, check_exact_tensors

__all__ = [
    "INTERVENTIONS",
    "ReftConfig",
    "init",
    "intervene",
    "layer_list_key",
    "orthonormalize",
    "routes",
    "tuner",
    "validate",
]

# intervention type -> the tensors it has (before the optional proj_layer.bias)
INTERVENTIONS: dict[str, tuple[str, ...]] = {
    "LoreftIntervention": ("rotate_layer", "learned_source.weight", "learned_source.bias"),
    "NoreftIntervention": ("proj_layer.weight", "learned_source.weight", "learned_source.bias"),
    "ConsreftIntervention": ("rotate_layer", "learned_source"),
    "LobireftIntervention": ("rotate_layer", "learned_source"),
    "DireftIntervention": ("rotate_layer", "learned_source.weight", "learned_source.bias"),
    "NodireftIntervention": ("proj_layer.weight", "learned_source.weight", "learned_source.bias"),
}
_ARGS = ("dropout", "act_fn", "add_bias", "dtype")
_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
# SWIFT's model_type -> module list, for the llama-like architectures it maps to 'model.layers'
_LAYER_KEYS = {
    t: "model.layers"
    for t in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "yi",
        "gemma",
        "gemma2",
        "deepseek",
        "internlm2",
        "phi3",
        "minicpm",
        "openbuddy",
        "mixtral",
    )
}


@dataclass(frozen=True, eq=False)
class ReftConfig(TunerConfig):
    """SWIFT's ``ReftConfig`` fields.

    * ``model_type`` / ``layer_key``: where the layer list is (``layer_key``,
      e.g. ``'model.layers'``, wins; without either, the one ``nn.ModuleList``
      with ``config.num_hidden_layers`` entries).
    * ``layers``: indices to intervene on (``None``: all).
    * ``r``: rank; ``intervention_type``: one of :data:`INTERVENTIONS`.
    * ``args``: JSON string or dict with ``dropout``, ``act_fn``, ``add_bias``,
      ``dtype`` (pyreft's keyword arguments).
    """

    model_type: str | None = None
    layer_key: str | None = None
    layers: Any = None
    r: int = 4
    intervention_type: str = "LoreftIntervention"
    args: Any = None
    model_key_mapping: Any = None  # a SwiftConfig field SWIFT writes; unused by ReFT
    swift_type: str = "reft"

    def __post_init__(self) -> None:
        super().__post_init__()
        args = self.args
        if isinstance(args, str):
            try:
                args = json.loads(args) if args else {}
            except json.JSONDecodeError as e:
                raise ConfigError(f"args is not valid JSON: {e}") from None
        args = dict(args or {})
        unknown = sorted(set(args) - set(_ARGS))
        if unknown:
            raise ConfigError(f"args has unknown key(s) {unknown}; ReFT takes {list(_ARGS)}")
        object.__setattr__(self, "args", args)
        if self.intervention_type not in INTERVENTIONS:
            raise ConfigError(f"intervention_type={self.intervention_type!r}; use one of {sorted(INTERVENTIONS)}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if (args.get("act_fn") or "linear") not in _ACTS:
            raise ConfigError(f"args['act_fn']={args['act_fn']!r}; use one of {sorted(_ACTS)}")
        if not 0.0 <= float(args.get("dropout", 0.0)) < 1.0:
            raise ConfigError(f"args['dropout'] must be in [0, 1), got {args['dropout']!r}")
        if self.layers is not None:
            if isinstance(self.layers, int):
                object.__setattr__(self, "layers", (self.layers,))
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ConfigError(f"layers must be a list of layer indices, got {self.layers!r}")
        if self.layer_key is None and self.model_type is not None and self.model_type not in _LAYER_KEYS:
            raise ConfigError(f"model_type={self.model_type!r} has no known layer list; pass layer_key='...'")

    @property
    def dropout(self) -> float:
        return float(self.args.get("dropout", 0.0))

    @property
    def act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return _ACTS[self.args.get("act_fn") or "linear"]

    @property
    def add_bias(self) -> bool:
        return bool(self.args.get("add_bias", False))

    def tensor_names(self) -> tuple[str, ...]:
        names = INTERVENTIONS[self.intervention_type]
        if self.add_bias and "proj_layer.weight" in names:
            names = (*names, "proj_layer.bias")
        return names


# ---------------------------------------------------------------------------
# pure math
# ---------------------------------------------------------------------------
def orthonormalize(w: torch.Tensor) -> torch.Tensor:
    """Columns of ``w`` (``(d, r)``, ``d >= r``) made orthonormal, signs fixed. Pure, differentiable.

    An orthonormal ``w`` is returned unchanged (up to rounding).
    """
    q, rr = torch.linalg.qr(w if w.dtype in (torch.float32, torch.float64) else w.float())
    sign = torch.sign(torch.diagonal(rr))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return cast(torch.Tensor, (q * sign).to(w.dtype))


def intervene(
    intervention_type: str,
    h: torch.Tensor,
    t: Mapping[str, torch.Tensor],
    act: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> torch.Tensor:
    """The ReFT formula of ``intervention_type`` on hidden states ``h`` (``(..., d)``). Pure.

    ``t`` maps pyreft's state keys (``rotate_layer``, ``learned_source.weight``...)
    to tensors.  Computed in the params' dtype, returned in ``h``'s dtype.
    """
    dtype = next(iter(t.values())).dtype
    x = h.to(dtype)
    if "rotate_layer" in t:
        basis = orthonormalize(t["rotate_layer"])  # (d, r) = R^T
    else:
        basis = t["proj_layer.weight"].T  # (d, r) = P^T
    if "learned_source.weight" in t:
        source = act(F.linear(x, t["learned_source.weight"], t["learned_source.bias"]))
    else:
        source = t["learned_source"]
    kind = intervention_type
    if kind in ("LoreftIntervention", "ConsreftIntervention"):
        delta = (source - x @ basis) @ basis.T
    elif kind == "NoreftIntervention":
        delta = (source - F.linear(x, t["proj_layer.weight"], t.get("proj_layer.bias"))) @ basis.T
    elif kind in ("LobireftIntervention", "DireftIntervention", "NodireftIntervention"):
        delta = source @ basis.T
    else:
        raise ConfigError(f"unknown intervention_type {kind!r}")
    return (x + delta).to(h.dtype)


# ---------------------------------------------------------------------------
# where: layers
# ---------------------------------------------------------------------------
def layer_list_key(cfg: ReftConfig) -> str | None:
    """The layer list ``cfg`` names (``layer_key``, else its ``model_type``'s), or ``None`` (found on the model)."""
    return cfg.layer_key or (_LAYER_KEYS.get(cfg.model_type) if cfg.model_type else None)


def _layer_list(model: nn.Module, cfg: ReftConfig) -> tuple[str, nn.ModuleList]:
    key = layer_list_key(cfg)
    if key is not None:
        try:
            found = model.get_submodule(key)
        except AttributeError:
            raise TargetError(f"layer_key={key!r}: {type(model).__name__} has no such module") from None
        if not isinstance(found, nn.ModuleList):
            raise TargetError(f"layer_key={key!r} is a {type(found).__name__}, not an nn.ModuleList")
        return key, found
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        raise TargetError(
            f"cannot tell which module list holds the layers ({[name for name, _ in lists]}); pass layer_key='...'"
        )
    return lists[0]


def _hidden_size(model: nn.Module) -> int:
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if d is None:
        raise TargetError(f"{type(model).__name__} has no config.hidden_size; ReFT needs the hidden size")
    return int(d)


class _Site(NamedTuple):
    layer: int  # layer index
    order: int  # which intervention (column of intervention_locations)
    module: nn.Module
    prefix: str


def _sites(model: nn.Module, cfg: ReftConfig, adapter: str) -> list[_Site]:
    key, layer_list = _layer_list(model, cfg)
    chosen = list(range(len(layer_list))) if cfg.layers is None else list(cfg.layers)
    bad = [i for i in chosen if not 0 <= i < len(layer_list)]
    if bad:
        raise TargetError(f"layers={list(cfg.layers)!r}: {bad} out of range for {key!r} ({len(layer_list)} layers)")
    return [_Site(i, j, layer_list[i], f"{key}.{i}.reft_{adapter}.") for j, i in enumerate(sorted(set(chosen)))]


def _shapes(cfg: ReftConfig, d: int) -> dict[str, tuple[int, ...]]:
    r = cfg.r
    table = {
        "rotate_layer": (d, r),
        "learned_source.weight": (r, d),
        "learned_source.bias": (r,),
        "learned_source": (r,),
        "proj_layer.weight": (r, d),
        "proj_layer.bias": (r,),
    }
    return {n: table[n] for n in cfg.tensor_names()}


# ---------------------------------------------------------------------------
# tuner functions
# ---------------------------------------------------------------------------
def init(
    model: nn.Module, config: ReftConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh intervention params, drawn like pyreft (orthogonal ``R``, ``nn.Linear`` defaults, ``rand`` sources). Pure.

    dtype: ``args['dtype']`` if given, else the model's parameter dtype (pyreft
    defaults ``learned_source`` to bfloat16; functuner does not).
    """
    if not isinstance(config, ReftConfig):
        raise ConfigError(f"reft.init needs a ReftConfig, got {type(config).__name__}")
    d = _hidden_size(model)
    if config.r > d and any(n == "rotate_layer" for n in config.tensor_names()):
        raise ConfigError(f"r={config.r} exceeds the hidden size {d}; an orthonormal R needs r <= hidden size")
    sites = _sites(model, config, adapter_name)
    ref = next(model.parameters())
    dtype = ref.dtype
    if config.args.get("dtype") is not None:
        from .base import resolve_dtype

        dtype = resolve_dtype(config.args["dtype"], "args['dtype']") or dtype
    bound = 1.0 / math.sqrt(d)
    tensors: dict[str, torch.Tensor] = {}
    for site in sites:
        for name, shape in _shapes(config, d).items():
            t = torch.empty(shape, dtype=torch.float32)
            if name == "rotate_layer":
                torch.nn.init.orthogonal_(t, generator=generator)
            elif name == "learned_source":
                t.uniform_(0.0, 1.0, generator=generator)
            elif name.endswith(".weight"):
                torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            else:
                t.uniform_(-bound, bound, generator=generator)
            tensors[site.prefix + name] = t.to(device=ref.device, dtype=dtype)
    return TunerParams(tensors, config, adapter_name)


def _check(model: nn.Module, params: TunerParams) -> list[_Site]:
    cfg: ReftConfig = params.config
    sites = _sites(model, cfg, params.adapter_name)
    shapes = _shapes(cfg, _hidden_size(model))
    expected = {s.prefix + n: shape for s in sites for n, shape in shapes.items()}
    check_exact_tensors(params, expected, "ReFT params do not fit the model")
    return sites


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` (or :class:`TargetError`) if ``params`` does not fit ``model``. Pure."""
    _check(model, params)


class _Locations:
    """Per-call cell: the ``intervention_locations`` of the model call under way (set by the root pre slot)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


def _root_pre_slot(
    cell: _Locations, n_sites: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kwargs = dict(kwargs)
    locs = kwargs.pop("intervention_locations", None)
    if locs is not None:
        locs = torch.as_tensor(locs)
        if locs.dim() != 3 or locs.shape[1] != n_sites:
            raise ConfigError(
                f"intervention_locations must be (batch, {n_sites} interventions, positions), got {tuple(locs.shape)}"
            )
    cell.value = locs
    return args, kwargs


def _slot(
    cfg: ReftConfig,
    site: _Site,
    t: dict[str, torch.Tensor],
    cell: _Locations,
    generator: torch.Generator | None,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
) -> Any:
    hidden = output[0] if isinstance(output, tuple) else output
    locs = cell.value

    def run(h: torch.Tensor) -> torch.Tensor:
        out = intervene(cfg.intervention_type, h, t, cfg.act)
        if cfg.dropout > 0 and module.training:
            keep = torch.empty(out.shape, dtype=out.dtype).bernoulli_(1.0 - cfg.dropout, generator=generator)
            out = out * keep.to(out.device) / (1.0 - cfg.dropout)
        return out

    if locs is None:
        new = run(hidden)
    else:
        idx = locs[:, site.order, :].to(hidden.device).long()
        if idx.shape[0] != hidden.shape[0] or (idx.numel() and int(idx.max()) >= hidden.shape[1]):
            raise ConfigError(
                f"intervention_locations {tuple(locs.shape)} do not fit hidden states {tuple(hidden.shape)}"
            )
        idx = idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        new = hidden.scatter(1, idx, run(hidden.gather(1, idx)))
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """A slot on each chosen layer rewriting its output, and one on ``model`` reading ``intervention_locations``."""
    cfg: ReftConfig = params.config
    sites = _check(model, params)
    cell = _Locations()
    fwd: dict[nn.Module, list[Any]] = {}
    for s in sites:
        t = {n: params[s.prefix + n] for n in cfg.tensor_names()}
        fwd.setdefault(s.module, []).append(
            lambda m, a, k, o, _s=s, _t=t: _slot(cfg, _s, _t, cell, ctx.generator, m, a, k, o)
        )
    pre = {model: [lambda m, a, k: _root_pre_slot(cell, len(sites), m, a, k)]}
    ensure_slots([model], pre=True)
    ensure_slots(list(fwd))
    return Routes(forward=fwd, pre=pre)


def needs_generator(model: nn.Module, params: TunerParams) -> bool:
    """Whether a call in the model's current mode draws random numbers (dropout in training)."""
    return params.config.dropout > 0 and model.training


tuner = Tuner(
    swift_type="reft",
    config_cls=ReftConfig,
    init=init,
    routes=routes,
    validate=validate,
    needs_generator=needs_generator,
    key_naming=KeyNaming(glued=(("reft_", ("rotate_layer", "learned_source", "proj_layer")),)),
    read_files=(INTKEY_GLOB, functools.partial(from_intkey_files, layer_list_key=layer_list_key)),  # ms-swift's files
    write_files=functools.partial(to_intkey_files, layer_list_key=layer_list_key),  # safe_serialization=False
)
