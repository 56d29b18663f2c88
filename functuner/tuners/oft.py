"""OFT (orthogonal fine-tuning) as a config plus pure functions, with PEFT's math and names (peft 0.21).

OFT rotates a layer's input by a block-diagonal orthogonal matrix ``R`` before the
frozen layer runs: ``y = base(x R)``, the merged weight being ``W' = (R W^T)^T``.  Each
of the ``r`` blocks (``oft_block_size`` wide; PEFT's rule: give one of ``r`` /
``oft_block_size``, the other follows from the input size) is the Cayley transform of
a skew-symmetric matrix ``Q`` whose upper triangle is learned
(``oft_R.<adapter>.weight: (r, b (b - 1) / 2)``, one row when ``block_share``)::

    R = (I - Q)(I + Q)^-1            (use_cayley_neumann=False)
    R ~ I + 2Q + 2Q^2 + ... + Q^(n-1) (Neumann series, PEFT's default, n = num_cayley_neumann_terms)

``coft`` (constrained OFT) projects ``Q`` into a ball of radius ``eps / sqrt(r)``
before use.  PEFT writes the projected value back into its parameter during the
forward; here the projection is applied on the fly with a straight-through gradient
(``Q + (proj(Q) - Q).detach()``), which gives PEFT's outputs and gradients without
mutating the params (the projection is idempotent).

Layers: ``nn.Linear`` and ``nn.Conv2d`` (dilation 1; the input is unfolded into
``kernel x kernel`` patches, each patch rotated, and folded back, exactly as PEFT
does).  ``nn.Embedding`` (which PEFT also adapts) is refused with
:class:`UnsupportedModuleError`.  As in PEFT 0.21, ``module_dropout`` is stored but
has no effect on the forward.  An ``r`` / ``oft_block_size`` that does not divide
the input size is adjusted with PEFT's warning and rule.

Param names are PEFT's in-memory names relative to the original model:
``<module>.oft_R.<adapter>.weight``; PEFT's files hold ``<module>.oft_R.weight``.
Every function is pure.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..errors import CheckpointError, ConfigError, ParamsMismatchError, UnsupportedModuleError
from . import _lycoris as ly
from .base import CallContext, KeyNaming, PeftFormat, Tuner, TunerConfig, module_local

__all__ = ["PEFT_FORMAT", "OFTConfig", "cayley", "init", "merge", "rotation", "routes", "tuner", "unmerge", "validate"]


@dataclass(frozen=True, eq=False)
class OFTConfig(TunerConfig):
    """PEFT's ``OFTConfig`` fields and defaults (peft 0.21): exactly one of ``r`` / ``oft_block_size`` non-zero.

    ``target_modules`` is required (PEFT's per-architecture defaults are not
    applied).  ``init_weights=True``: ``Q = 0`` (``R = I``, the base model);
    ``False``: ``Q ~ N(0, 0.1^2)`` (PEFT's draw).
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: Any = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: Any = None
    init_weights: bool = True
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    # bookkeeping fields PEFT writes into adapter_config.json
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    auto_mapping: Any = None
    peft_version: Any = None
    swift_type: str = "OFT"
    peft_type: str = "OFT"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"OFTConfig.{name} must be a non-negative integer, got {v!r}")
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ConfigError(
                f"OFTConfig: give exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) non-zero"
                " (r x oft_block_size == in_features), as PEFT requires"
            )
        if self.bias != "none":
            raise ConfigError(
                f"OFTConfig.bias={self.bias!r} is not supported natively (functuner keeps base biases frozen);"
                " use bias='none', or give peft.OFTConfig to Swift.prepare_model for PEFT's own OFT"
            )
        for name in ("init_weights", "coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"OFTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.module_dropout) < 1.0:
            raise ConfigError(f"OFTConfig.module_dropout must be in [0, 1), got {self.module_dropout!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("OFTConfig: layers_pattern needs layers_to_transform as well (as in PEFT)")


def _adjust(n: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``n`` nearest ``value`` (lower on a tie)."""
    if value >= n:
        return n
    higher = value
    while higher <= n and n % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and n % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


class _Plan(NamedTuple):
    r: int
    block: int
    dim: int  # the rotated size: in_features, or in_channels * k * k for a conv
    kernel: tuple[int, int] | None
    adjusted: str | None  # PEFT's warning text when r / oft_block_size was adjusted


def _plan(name: str, module: nn.Module, config: OFTConfig) -> _Plan:
    if isinstance(module, nn.Linear):
        dim, kernel = module.in_features, None
    elif isinstance(module, nn.Conv2d):
        if module.dilation[0] > 1:
            raise UnsupportedModuleError(f"OFT cannot adapt {name!r}: Conv2d with dilation > 1 (as in PEFT)")
        k = int(module.kernel_size[0])
        dim, kernel = module.in_channels * k * k, (int(module.kernel_size[0]), int(module.kernel_size[1]))
    else:
        raise UnsupportedModuleError(
            f"OFT cannot adapt module {name!r} of type {type(module).__name__}; supported natively: nn.Linear and"
            " nn.Conv2d (give peft.OFTConfig to Swift.prepare_model for PEFT's Embedding OFT)"
        )
    note = None
    if config.r == 0:
        block = config.oft_block_size
        if dim % block != 0 or block > dim:
            block = _adjust(dim, block)
            note = f"Invalid `oft_block_size` ({config.oft_block_size})! Adjusted `oft_block_size` to ({block})."
        r = dim // block
    else:
        r = config.r
        if dim % r != 0 or r > dim:
            r = _adjust(dim, r)
            note = f"Invalid `r` ({config.r})! Adjusted `r` to ({r})."
        block = dim // r
    return _Plan(r, block, dim, kernel, note)


def expected_shapes(name: str, module: nn.Module, config: OFTConfig) -> dict[str, tuple[int, ...]]:
    """``{"oft_R": (rows, b (b - 1) / 2)}`` for ``module``; raises for unsupported layers."""
    plan = _plan(name, module, config)
    return {"oft_R": (1 if config.block_share else plan.r, plan.block * (plan.block - 1) // 2)}


class _Site(NamedTuple):
    name: str
    module: nn.Module
    key: str
    plan: _Plan


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[_Site, ...]]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _build(model: nn.Module, params: TunerParams) -> tuple[_Site, ...]:
    ad, cfg = params.adapter_name, params.config
    sites: list[_Site] = []
    for key in params:
        if ".modules_to_save." in key:
            continue
        marker = f".oft_R.{ad}.weight"
        if not key.endswith(marker):
            raise ParamsMismatchError(
                f"params key {key!r} is not an OFT tensor of adapter {ad!r}; expected '<module>{marker}' or"
                f" '<module>.modules_to_save.{ad}.<param>'"
            )
        mname = key[: -len(marker)]
        try:
            module = model.get_submodule(mname)
        except AttributeError:
            raise ParamsMismatchError(f"params key {key!r} refers to module {mname!r}, which the model lacks") from None
        want = expected_shapes(mname, module, cfg)["oft_R"]
        if tuple(params[key].shape) != want:
            raise ParamsMismatchError(
                f"params[{key!r}] has shape {tuple(params[key].shape)}, but module {mname!r}"
                f" ({type(module).__name__}) with this config needs {want}"
            )
        sites.append(_Site(mname, module, key, _plan(mname, module, cfg)))
    return tuple(sites)


def _layout(model: nn.Module, params: TunerParams) -> tuple[_Site, ...]:
    sig = (tuple(params), params.config, params.adapter_name, tuple(tuple(t.shape) for t in params.values()))
    with _LOCK:
        found = _CACHE.get(model, {}).get(sig)
    if found is None:
        found = _build(model, params)
        with _LOCK:
            _CACHE.setdefault(model, {})[sig] = found
    return found


def _overrides(model: nn.Module, params: TunerParams) -> ly.Layout:
    own = TunerParams({k: v for k, v in params.items() if ".modules_to_save." in k}, params.config, params.adapter_name)
    return ly.build_layout(model, own, ("oft_R",), expected_shapes, "OFT")


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`~functuner.errors.ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    _layout(model, params)
    _overrides(model, params)


def init(model: nn.Module, config: OFTConfig, generator: torch.Generator, adapter_name: str = "default") -> TunerParams:
    """Fresh OFT params: zeros (``init_weights=True``, the identity rotation) or ``N(0, 0.1^2)`` from ``generator``.

    Every targeted module is checked before anything is drawn; an adjusted ``r`` /
    ``oft_block_size`` warns as PEFT does.  Tensors take the base weight's dtype and device.
    """
    if not isinstance(config, OFTConfig):
        raise ConfigError(f"oft.init needs an OFTConfig, got {type(config).__name__}")
    plans = [
        (n, m, _plan(n, m, config), expected_shapes(n, m, config)["oft_R"])
        for n, m in ly.selected_modules(model, config)
    ]
    tensors: dict[str, torch.Tensor] = {}
    for name, module, plan, shape in plans:
        if plan.adjusted:
            warnings.warn(f"{name}: {plan.adjusted}", UserWarning, stacklevel=2)
        w = cast(torch.Tensor, module.weight)
        t = torch.zeros(shape) if config.init_weights else torch.randn(shape, generator=generator) * 0.1
        tensors[f"{name}.oft_R.{adapter_name}.weight"] = t.to(device=w.device, dtype=w.dtype)
    tensors.update(ly.init_modules_to_save(model, config, adapter_name))
    return TunerParams(tensors, config, adapter_name)


@functools.lru_cache(maxsize=64)
def _triu_flat(block: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(block, block, 1)
    return cast(torch.Tensor, rows * block + cols)


def skew(vec: torch.Tensor, block: int) -> torch.Tensor:
    """``(b, block, block)`` skew-symmetric matrices from their upper triangles ``(b, n_elements)``."""
    idx = _triu_flat(block).to(vec.device)
    flat = torch.zeros(vec.shape[0], block * block, dtype=vec.dtype, device=vec.device).index_add(1, idx, vec)
    m = flat.view(vec.shape[0], block, block)
    return m - m.transpose(-2, -1)


def _project(vec: torch.Tensor, block: int, eps: float) -> torch.Tensor:
    """PEFT's COFT projection (``_project_batch``): each block's ``Q`` scaled into norm ``<= eps / sqrt(b)``."""
    q = skew(vec, block)
    bound = eps / float(q.shape[0]) ** 0.5
    norm = torch.linalg.matrix_norm(q).view(-1, 1)
    return torch.where(norm <= bound, vec, bound * vec / norm)


def cayley(q: torch.Tensor, use_neumann: bool, terms: int) -> torch.Tensor:
    """PEFT's ``_cayley_batch`` of skew matrices ``q: (b, n, n)`` (same op order, so the same rounding)."""
    b, n = q.shape[0], q.shape[-1]
    eye = torch.eye(n, device=q.device, dtype=q.dtype).expand(b, n, n)
    if not use_neumann:
        return cast(torch.Tensor, torch.linalg.solve(eye + q, eye - q, left=False))
    r = eye
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            q2 = q @ q
            r = r + 2.0 * q2
            power = q2
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2.0 * power
            power = power @ q
            r = r + power
    return r


def rotation(weight: torch.Tensor, plan: _Plan, config: OFTConfig) -> torch.Tensor:
    """The ``(r, block, block)`` rotation blocks of one module (``block_share``: one block repeated)."""
    vec = weight
    if config.coft:
        vec = vec + (_project(vec.detach(), plan.block, float(config.eps)) - vec).detach()
    blocks = cayley(skew(vec, plan.block), config.use_cayley_neumann, config.num_cayley_neumann_terms)
    return blocks.expand(plan.r, plan.block, plan.block) if config.block_share else blocks


def _block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """``(D, H, H)`` -> the ``(D H, D H)`` block-diagonal matrix (an einsum, so it works under vmap)."""
    d, h = blocks.shape[0], blocks.shape[-1]
    eye = torch.eye(d, dtype=blocks.dtype, device=blocks.device)
    return torch.einsum("dij,de->diej", blocks, eye).reshape(d * h, d * h)


def _rotate_rows(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    r, b = blocks.shape[0], blocks.shape[-1]
    return torch.einsum("...rk,rkc->...rc", x.reshape(*lead, r, b), blocks).reshape(*lead, r * b)


def _rotate_conv_input(x: torch.Tensor, blocks: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """PEFT's ``_unfold`` -> rotate each ``C x kh x kw`` patch -> ``_fold`` (stride 1, no padding, overlaps summed)."""
    bsz, ch, h, w = x.shape
    kh, kw = kernel
    oh, ow = h - kh + 1, w - kw + 1
    patches = x.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5).reshape(bsz * oh * ow, -1)
    rotated = _rotate_rows(patches, blocks).view(bsz, oh, ow, ch, kh, kw).permute(0, 3, 1, 2, 4, 5)
    return F.fold(rotated.reshape(bsz, ch * kh * kw, oh * ow), output_size=(h, w), kernel_size=(kh, kw), stride=(1, 1))


def _pre_slot(
    weight: torch.Tensor,
    plan: _Plan,
    config: OFTConfig,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    x = ly.first_arg(args, kwargs, "OFT")
    blocks = rotation(weight, plan, config)
    xr = x.to(weight.dtype)
    rotated = _rotate_conv_input(xr, blocks, plan.kernel) if x.dim() == 4 and plan.kernel else _rotate_rows(xr, blocks)
    return ly.replace_first_arg(args, kwargs, rotated.to(x.dtype))


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """A pre slot per adapted module rotating its input; ``modules_to_save`` overrides run as forward slots."""
    cfg: OFTConfig = params.config
    pre: dict[nn.Module, list[Any]] = {}
    for site in _layout(model, params):
        pre.setdefault(site.module, []).append(functools.partial(_pre_slot, params[site.key], site.plan, cfg))
    fwd: dict[nn.Module, list[Any]] = {}
    ly.override_routes(_overrides(model, params), params, fwd)
    ensure_slots(list(pre), pre=True)
    ensure_slots(list(fwd))
    return Routes(forward=fwd, pre=pre)


def _merge_impl(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None, invert: bool
) -> dict[str, torch.Tensor]:
    cfg: OFTConfig = params.config
    state = ly.base_state(model, base)
    out = dict(state)
    for site in _layout(model, params):
        wkey = f"{site.name}.weight"
        if wkey not in state:
            raise ParamsMismatchError(f"merge: the base state has no {wkey!r} (OFT adapts module {site.name!r})")
        W = state[wkey]
        rot = _block_diag(rotation(params[site.key].float(), site.plan, cfg))
        flat_t = W.float().reshape(W.shape[0], -1).T
        new_t = torch.linalg.solve(rot, flat_t) if invert else rot @ flat_t
        ly.set_with_aliases(out, state, wkey, new_t.T.reshape(W.shape).to(W.dtype))
    if not invert:
        ly.merge_overrides(_overrides(model, params), params, state, out)
    return out


def merge(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """New base weights ``(R W^T)^T`` (fp32, rounded once to ``W``'s dtype); ``modules_to_save`` copies replace theirs."""
    return _merge_impl(model, params, base, invert=False)


def unmerge(model: nn.Module, params: TunerParams, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``(R^-1 W'^T)^T`` by a linear solve in fp32 (exact up to rounding); ``modules_to_save`` parameters stay."""
    return _merge_impl(model, params, merged, invert=True)


def _peft_format() -> PeftFormat:
    base = ly.peft_format("OFT", ("oft_R",), "OFT")

    def to_keys(state: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            marker = f".oft_R.{adapter_name}.weight"
            if not key.endswith(marker):
                raise CheckpointError(
                    f"key {key!r} is not a tensor of OFT adapter {adapter_name!r}; cannot name it for PEFT"
                )
            out[key[: -len(marker)] + ".oft_R.weight"] = value
        return out

    def from_keys(state: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if not key.endswith(".oft_R.weight"):
                raise CheckpointError(
                    f"PEFT key 'base_model.model.{key}' is not an OFT tensor (expected '<module>.oft_R.weight', or a"
                    " modules_to_save copy; PEFT's Embedding OFT is not supported natively)"
                )
            out[key[: -len(".weight")] + f".{adapter_name}.weight"] = value
        return out

    return PeftFormat(
        peft_type="OFT", config_to_json=base.config_to_json, to_keys=to_keys, from_keys=from_keys, shim_reads=False
    )


# PEFT's checkpoint layout: ``base_model.model.<module>.oft_R.weight``
PEFT_FORMAT = _peft_format()


tuner = Tuner(
    swift_type="OFT",
    config_cls=OFTConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    key_naming=KeyNaming(after=("oft_R",)),
    peft=PEFT_FORMAT,
    check_model=ly.model_check(expected_shapes),
    check_state=ly.state_check(("oft_R",), "OFT"),
    sub_batch=module_local,
)
