"""BOFT (butterfly orthogonal fine-tuning) as a config plus pure functions, with PEFT's math and names (peft 0.21).

BOFT multiplies a layer's input by an orthogonal matrix ``M`` built from ``m =
boft_n_butterfly_factor`` butterfly factors and scales its output per channel by
``s``::

    M = P_{m-1} B_{m-1} P_{m-1}^T ... P_0 B_0 P_0^T      (B_i block diagonal, P_i butterfly permutations)
    y = (base(x M) - bias) * s + bias                  (nn.Linear)
    y = conv(x, ((M W_flat^T)^T * s).view(W.shape), bias)   (nn.Conv2d, as PEFT computes it)
    W' = (M W_flat^T)^T * s                            (merged; bias unchanged)

Each block of ``B_i`` is the Cayley transform ``(I - S)(I + S)^-1`` of the skew part
``S = (R - R^T) / 2`` of a learned ``boft_block_size``-square matrix
(``boft_R: (m, boft_block_num, b, b)``; ``boft_s: (out, 1)``, conv ``(1, out)``).

Differences from PEFT, all refused or stated rather than silent:

* PEFT builds the butterfly with a CUDA extension and, where that extension
  cannot be compiled (every CPU-only machine), warns and uses
  ``boft_n_butterfly_factor=1`` (its pure-torch path handles one factor only).  Here
  the factor is always the configured one, so a ``boft_n_butterfly_factor > 1``
  adapter agrees with PEFT where PEFT has its extension (tested whole-model, with the
  extension's two kernels ported to torch); with the default factor 1 both agree
  everywhere.  A PEFT checkpoint saved without the extension holds one factor while
  its config says more: loading it raises, naming the fix (set the factor to 1).
* ``nn.Conv2d`` must have dilation 1, one group and equal stride / padding on
  both axes (PEFT passes ``stride[0]`` / ``padding[0]`` and ignores the rest).

In training, ``boft_dropout`` replaces a random fraction of the blocks of one
random factor by the identity (PEFT's multiplicative dropout), drawn from the
call's generator.  Param names are PEFT's in-memory names relative to the original
model: ``<module>.boft_R.<adapter>``, ``<module>.boft_s.<adapter>``.  Every function is pure.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..errors import ConfigError, ParamsMismatchError, UnsupportedModuleError
from . import _lycoris as ly
from .base import CallContext, KeyNaming, Tuner, TunerConfig, module_local

__all__ = ["PEFT_FORMAT", "BOFTConfig", "butterfly", "init", "merge", "routes", "tuner", "unmerge", "validate"]

NAMES = ("boft_R", "boft_s")


@dataclass(frozen=True, eq=False)
class BOFTConfig(TunerConfig):
    """PEFT's ``BOFTConfig`` fields and defaults (peft 0.21): one of ``boft_block_size`` / ``boft_block_num`` non-zero.

    ``target_modules`` is required (PEFT's per-architecture defaults are not
    applied).  ``init_weights=True``: ``R = 0``, ``s = 1`` (the base model);
    ``False``: ``R ~ N(0, 0.1^2)``, ``s ~ N(1, 0.1^2)`` (PEFT's draws).
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: Any = None
    exclude_modules: Any = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Any = None
    init_weights: bool = True
    layers_to_transform: Any = None
    layers_pattern: Any = None
    # bookkeeping fields PEFT writes into adapter_config.json
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    auto_mapping: Any = None
    peft_version: Any = None
    swift_type: str = "BOFT"
    peft_type: str = "BOFT"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"BOFTConfig.{name} must be a non-negative integer, got {v!r}")
        if self.boft_n_butterfly_factor < 1:
            raise ConfigError(
                f"BOFTConfig.boft_n_butterfly_factor must be a positive integer, got {self.boft_n_butterfly_factor}"
            )
        if (self.boft_block_size != 0) == (self.boft_block_num != 0):
            raise ConfigError(
                f"BOFTConfig: give exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num"
                f" ({self.boft_block_num}) non-zero, as PEFT requires"
            )
        if self.bias != "none":
            raise ConfigError(
                f"BOFTConfig.bias={self.bias!r} is not supported natively (functuner keeps base biases frozen);"
                " use bias='none', or give peft.BOFTConfig to Swift.prepare_model for PEFT's own BOFT"
            )
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"BOFTConfig.init_weights must be True or False, got {self.init_weights!r}")
        if not 0.0 <= float(self.boft_dropout) < 1.0:
            raise ConfigError(f"BOFTConfig.boft_dropout must be in [0, 1), got {self.boft_dropout!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("BOFTConfig: layers_pattern needs layers_to_transform as well (as in PEFT)")


class _Plan(NamedTuple):
    factors: int
    num: int
    size: int
    dim: int
    out: int
    conv: bool


def _plan(name: str, module: nn.Module, config: BOFTConfig) -> _Plan:
    """Block count and size for ``module``; PEFT's checks, raised as ConfigError / UnsupportedModuleError."""
    if isinstance(module, nn.Linear):
        dim, out, conv = module.in_features, module.out_features, False
    elif isinstance(module, nn.Conv2d):
        if (
            module.groups != 1
            or tuple(module.dilation) != (1, 1)
            or len(set(module.stride)) != 1
            or not isinstance(module.padding, tuple)
            or len(set(module.padding)) != 1
            or module.kernel_size[0] != module.kernel_size[1]
        ):
            raise UnsupportedModuleError(
                f"BOFT cannot adapt {name!r}: a Conv2d needs groups=1, dilation 1, a square kernel and equal stride and"
                " padding on both axes (PEFT's BOFT convolution uses stride[0] / padding[0] only)"
            )
        k = int(module.kernel_size[0])
        dim, out, conv = module.in_channels * k * k, module.out_channels, True
    else:
        raise UnsupportedModuleError(
            f"BOFT cannot adapt module {name!r} of type {type(module).__name__}; supported: nn.Linear, nn.Conv2d (as"
            " in PEFT)"
        )
    extra = config.boft_n_butterfly_factor - 1
    what = f"BOFT on {name!r}: the rotated size ({dim})"
    if config.boft_block_num:
        num = config.boft_block_num
        if dim % num != 0:
            raise ConfigError(f"{what} must be divisible by boft_block_num ({num})")
        if extra and (extra > int(math.log2(num)) or num % (2**extra) != 0):
            raise ConfigError(
                f"{what}: invalid combination of boft_n_butterfly_factor ({extra + 1}) and boft_block_num ({num})"
            )
        size = dim // num
    else:
        size = config.boft_block_size
        if dim % size != 0:
            raise ConfigError(f"{what} must be divisible by boft_block_size ({size})")
        if extra and (dim < size * 2**extra or dim % (size * 2**extra) != 0):
            raise ConfigError(
                f"{what}: invalid combination of boft_n_butterfly_factor ({extra + 1}) and boft_block_size ({size})"
            )
        num = dim // size
    if extra and (num % 2 or size % 2):
        raise ConfigError(f"{what}: boft_block_num ({num}) and boft_block_size ({size}) must be even with butterflies")
    return _Plan(extra + 1, num, size, dim, out, conv)


def expected_shapes(name: str, module: nn.Module, config: BOFTConfig) -> dict[str, tuple[int, ...]]:
    """``{"boft_R": (m, num, b, b), "boft_s": (out, 1) or conv (1, out)}`` for ``module`` (PEFT's layout)."""
    p = _plan(name, module, config)
    return {"boft_R": (p.factors, p.num, p.size, p.size), "boft_s": (1, p.out) if p.conv else (p.out, 1)}


def _butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """PEFT's ``block_butterfly_perm`` (a permutation of ``range(n)``)."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise ConfigError("BOFT: invalid number of butterfly blocks")
    block = n // b
    step = block / r
    sorted_seq = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    order = torch.empty(block, dtype=torch.long)
    initial = torch.arange(block)
    for i, pos in enumerate(sorted_seq):
        order[int(i * r) : int(i * r + r)] = initial[int(pos * r) : int(pos * r + r)]
    indices = torch.arange(n)
    for i in range(0, n, block):
        indices[i : i + block] = indices[i : i + block][order]
    return indices


@functools.lru_cache(maxsize=64)
def _perms(dim: int, num: int, size: int, factors: int) -> torch.Tensor:
    """``(factors, dim)`` permutations (PEFT's ``boft_P`` as index vectors). Constant."""
    return torch.stack([_butterfly_perm(dim, num // 2**i, size // 2, factors - 1) for i in range(factors)])


def _block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """``(D, H, H)`` -> the ``(D H, D H)`` block-diagonal matrix (an einsum, so it works under vmap)."""
    d, h = blocks.shape[0], blocks.shape[-1]
    eye = torch.eye(d, dtype=blocks.dtype, device=blocks.device)
    return torch.einsum("dij,de->diej", blocks, eye).reshape(d * h, d * h)


def _cayley(r: torch.Tensor) -> torch.Tensor:
    """PEFT's ``cayley_batch``: ``(I - S)(I + S)^-1`` with ``S = (R - R^T) / 2``, per block."""
    skew = 0.5 * (r - r.transpose(-2, -1))
    n = r.shape[-1]
    eye = torch.eye(n, device=r.device, dtype=r.dtype).expand_as(r)
    return cast(torch.Tensor, torch.linalg.solve(eye + skew, eye - skew, left=False))


def butterfly(boft_r: torch.Tensor, plan: _Plan, keep: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The ``(dim, dim)`` orthogonal ``M`` of one module; ``keep``: ``(factor, block mask)`` of training dropout."""
    blocks = _cayley(boft_r)
    if keep is not None:
        n_random, mask = keep
        eye = torch.eye(plan.size, dtype=blocks.dtype, device=blocks.device)
        m = mask.to(device=blocks.device, dtype=blocks.dtype).view(-1, 1, 1)
        dropped = (1 - m) * blocks[n_random] + m * eye
        blocks = torch.cat([blocks[:n_random], dropped.unsqueeze(0), blocks[n_random + 1 :]])
    perms = _perms(plan.dim, plan.num, plan.size, plan.factors).to(blocks.device)
    total: torch.Tensor | None = None
    for i in range(plan.factors):
        p = perms[i]
        mi = _block_diag(blocks[i])[p][:, p]
        total = mi if total is None else mi @ total
    assert total is not None
    return total


def _drop_mask(plan: _Plan, p: float, generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
    """PEFT's multiplicative dropout draw: one random factor, ``int(p * num)`` of its blocks set to the identity."""
    n_random = int(torch.randint(0, plan.factors, (1,), generator=generator).item())
    k = int(p * plan.num)
    mask = torch.cat([torch.ones(k), torch.zeros(plan.num - k)])
    return n_random, mask[torch.randperm(plan.num, generator=generator)]


class _Site(NamedTuple):
    name: str
    module: nn.Module
    keys: Mapping[str, str]
    plan: _Plan


def _layout(model: nn.Module, params: TunerParams) -> tuple[tuple[_Site, ...], ly.Layout]:
    layout = ly.build_layout(model, params, NAMES, expected_shapes, "BOFT")
    sites = tuple(_Site(s.name, s.module, s.keys, _plan(s.name, s.module, params.config)) for s in layout.sites)
    return sites, layout


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`~functuner.errors.ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    _layout(model, params)


def init(
    model: nn.Module, config: BOFTConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh BOFT params: ``R = 0, s = 1`` (identity), or with ``init_weights=False`` PEFT's normal draws from ``generator``.

    Every targeted module is checked before anything is drawn; tensors take the base weight's dtype and device.
    """
    if not isinstance(config, BOFTConfig):
        raise ConfigError(f"boft.init needs a BOFTConfig, got {type(config).__name__}")
    plans = [(n, m, expected_shapes(n, m, config)) for n, m in ly.selected_modules(model, config)]
    tensors: dict[str, torch.Tensor] = {}
    for name, module, shapes in plans:
        w = cast(torch.Tensor, module.weight)
        if config.init_weights:
            r, s = torch.zeros(shapes["boft_R"]), torch.ones(shapes["boft_s"])
        else:
            r = torch.randn(shapes["boft_R"], generator=generator) * 0.1
            s = 1.0 + torch.randn(shapes["boft_s"], generator=generator) * 0.1
        tensors[f"{name}.boft_R.{adapter_name}"] = r.to(device=w.device, dtype=w.dtype)
        tensors[f"{name}.boft_s.{adapter_name}"] = s.to(device=w.device, dtype=w.dtype)
    tensors.update(ly.init_modules_to_save(model, config, adapter_name))
    return TunerParams(tensors, config, adapter_name)


def _keep(
    module: nn.Module, plan: _Plan, p: float, generator: torch.Generator | None
) -> tuple[int, torch.Tensor] | None:
    return _drop_mask(plan, p, generator) if module.training and p > 0 else None


def _linear_pre(
    r: torch.Tensor,
    plan: _Plan,
    p: float,
    gen: torch.Generator | None,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    x = ly.first_arg(args, kwargs, "BOFT")
    m = butterfly(r, plan, _keep(module, plan, p, gen)).to(x.dtype)
    return ly.replace_first_arg(args, kwargs, x @ m)


def _linear_out(s: torch.Tensor, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> Any:
    bias = module.bias
    res = out - bias if bias is not None else out
    res = res * s.squeeze(-1).to(out.dtype)
    return (res + bias if bias is not None else res).to(out.dtype)


def _conv_out(
    r: torch.Tensor,
    s: torch.Tensor,
    plan: _Plan,
    p: float,
    gen: torch.Generator | None,
    module: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    x = ly.first_arg(args, kwargs, "BOFT")
    w = module.weight
    m = butterfly(r, plan, _keep(module, plan, p, gen)).to(x.dtype)
    rotated = (m @ w.reshape(plan.out, -1).T).T * s.transpose(0, 1).to(x.dtype)
    y = F.conv2d(
        x.to(w.dtype), rotated.reshape(w.shape), module.bias, stride=module.stride[0], padding=module.padding[0]
    )
    return y.to(x.dtype)


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """Linear: a pre slot rotating the input and a slot scaling the output; Conv2d: a slot with the rotated weight."""
    sites, layout = _layout(model, params)
    p = float(params.config.boft_dropout)
    fwd: dict[nn.Module, list[Any]] = {}
    pre: dict[nn.Module, list[Any]] = {}
    for site in sites:
        r, s = params[site.keys["boft_R"]], params[site.keys["boft_s"]]
        if site.plan.conv:
            fwd.setdefault(site.module, []).append(functools.partial(_conv_out, r, s, site.plan, p, ctx.generator))
        else:
            pre.setdefault(site.module, []).append(functools.partial(_linear_pre, r, site.plan, p, ctx.generator))
            fwd.setdefault(site.module, []).append(functools.partial(_linear_out, s))
    ly.override_routes(layout, params, fwd)
    ensure_slots(list(fwd))
    ensure_slots(list(pre), pre=True)
    return Routes(forward=fwd, pre=pre)


def needs_generator(model: nn.Module, params: TunerParams) -> bool:
    """Whether a call in the model's current mode draws random numbers (``boft_dropout`` in training)."""
    return float(params.config.boft_dropout) > 0 and any(s.module.training for s in _layout(model, params)[0])


def _merge_impl(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None, invert: bool
) -> dict[str, torch.Tensor]:
    sites, layout = _layout(model, params)
    state = ly.base_state(model, base)
    out = dict(state)
    for site in sites:
        wkey = f"{site.name}.weight"
        if wkey not in state:
            raise ParamsMismatchError(f"merge: the base state has no {wkey!r} (BOFT adapts module {site.name!r})")
        W = state[wkey]
        m = butterfly(params[site.keys["boft_R"]].float(), site.plan)
        s = params[site.keys["boft_s"]].float().reshape(-1, 1)
        flat = W.float().reshape(site.plan.out, -1)
        new = (m.T @ (flat / s).T).T if invert else (m @ flat.T).T * s
        ly.set_with_aliases(out, state, wkey, new.reshape(W.shape).to(W.dtype))
    if not invert:
        ly.merge_overrides(layout, params, state, out)
    return out


def merge(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """New base weights ``(M W^T)^T * s`` (fp32, rounded once to ``W``'s dtype); ``modules_to_save`` copies replace theirs."""
    return _merge_impl(model, params, base, invert=False)


def unmerge(model: nn.Module, params: TunerParams, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``(M^T (W' / s)^T)^T`` (``M`` is orthogonal; as PEFT, approximate where ``s`` is near zero)."""
    return _merge_impl(model, params, merged, invert=True)


# PEFT's checkpoint layout: ``base_model.model.<module>.boft_R`` / ``.boft_s``
PEFT_FORMAT = ly.peft_format("BOFT", NAMES, "BOFT")


_float_check = ly.state_check(NAMES, "BOFT")


def _check_state(config: BOFTConfig, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Floating-point tensors, and ``boft_R`` holding ``boft_n_butterfly_factor`` factors (PEFT's CPU saves may not)."""
    _float_check(config, state, source)
    factor = int(config.boft_n_butterfly_factor)
    for key, t in state.items():
        if ".boft_R." in f"{key}." and ".modules_to_save." not in key and t.dim() == 4 and t.shape[0] != factor:
            why = (
                " PEFT writes such files where its CUDA extension cannot be built (any CPU-only machine): it then"
                " trains one factor whatever the config says. To load what PEFT trained, set"
                ' "boft_n_butterfly_factor": 1 in its adapter_config.json'
                if t.shape[0] == 1
                else ""
            )
            raise ParamsMismatchError(
                f"{source}: {key!r} holds {t.shape[0]} butterfly factor(s) (shape {tuple(t.shape)}), but the config's"
                f" boft_n_butterfly_factor is {factor}.{why}"
            )


tuner = Tuner(
    swift_type="BOFT",
    config_cls=BOFTConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    needs_generator=needs_generator,
    key_naming=KeyNaming(after=NAMES),
    peft=PEFT_FORMAT,
    check_model=ly.model_check(expected_shapes),
    check_state=_check_state,
    sub_batch=module_local,
)
