"""Res-Tuning: a bypass network fed from stem modules, unbound from the backbone (SWIFT's ``ResTuning``).

Jiang et al. 2023 (arXiv:2310.19859).  What one call computes:

1. probes (detached, so no gradient reaches the backbone): the *root* module's
   input or output (``root_modules`` regex, first match) and each *stem*
   module's input or output (``stem_modules``: regex in module order, or a list
   in list order); a tuple probe means its first element;
2. the bypass: ``x = root probe``; for stem ``i`` (``depth`` = number of
   stems) ``x = lateral_i(stem_i) + vertical_i(x)``, then ``aux_i(x, size of
   stem i+1)`` when block ``i`` has an aux tuner;
3. the *target* (every module ``target_modules`` full-matches): with
   ``target_modules_hook='input'`` its input at ``target_hidden_pos`` (index or
   keyword) is *replaced* by the bypass output; with ``'output'`` its output (or
   the element at ``target_hidden_pos``) is.

Each lateral / vertical / aux tuner is one of SWIFT's: ``res_adapter``
(``x + s * ln2(gelu(ln1(x)))`` over channels, ``adapter_length`` hidden units,
optional ``adapter_weight`` ``scale`` / ``scale_channel`` / ``scalar_<v>`` /
``gate``), ``res_group_adapter`` (the same per channel group of ``dim/head``,
4-D inputs), ``upsample`` (nearest resize to the next stem's size, plus a
zero-initialised 3x3 conv when ``upsample_out_channels`` is set), ``zero``
(contributes 0) or identity (any other / empty config).  ``tuner_cfg`` is a
string (lateral = vertical = it; aux ``upsample`` when ``use_upsample``
except for the last block), a dict with ``lateral_cfg`` / ``vertical_cfg`` /
``aux_cfg``, or a list of those, one per block.

Param names (SWIFT's): ``restuning_<adapter>.bypass_blocks.<i>.<lateral|vertical|aux>_tuner.tuner.<ln1.weight...>``.
Deviations: SWIFT crashes without ``root_modules`` (it indexes an empty list);
here the first stem's input is the root probe then.  A tuple target output gets
its element replaced (SWIFT's item assignment fails on tuples).  ``scale_kv`` /
``scale_kv_channel`` weights are ignored by SWIFT's forward and rejected here.
No merged form.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..core.targets import own_named_modules
from ..errors import ConfigError, TargetError
from .base import CallContext, KeyNaming, Tuner, TunerConfig, check_exact_tensors

__all__ = ["ResTuningConfig", "bypass", "init", "routes", "tuner", "validate"]

_HOOKS = ("input", "output")


@dataclass(frozen=True, eq=False)
class ResTuningConfig(TunerConfig):
    """SWIFT's ``ResTuningConfig`` fields (see the module docstring for their meaning)."""

    dims: Any = None
    root_modules: str | None = None
    root_modules_hook: str = "input"
    stem_modules: Any = None
    stem_modules_hook: str = "output"
    target_modules: str | None = None
    target_modules_hook: str = "input"
    target_hidden_pos: Any = None
    tuner_cfg: Any = None
    use_upsample: bool = False
    upsample_out_channels: Any = None
    zero_init_last: bool = False
    use_bypass: bool = True
    model_key_mapping: Any = None
    swift_type: str = "RESTUNING"

    def __post_init__(self) -> None:
        if self.target_hidden_pos is None:  # as SWIFT's __post_init__
            object.__setattr__(self, "target_hidden_pos", 0)
        super().__post_init__()

    def check(self, *, complete: bool = True) -> None:
        """Field checks (:meth:`TunerConfig.check`); unset required fields only when ``complete``."""
        for f in ("root_modules_hook", "stem_modules_hook", "target_modules_hook"):
            if getattr(self, f) not in _HOOKS:
                raise ConfigError(f"{f}={getattr(self, f)!r}; use 'input' or 'output'")
        if (complete or self.stem_modules is not None) and not self.stem_modules:
            raise ConfigError("stem_modules is required (a regex or a list of module names)")
        if (complete or self.target_modules is not None) and not isinstance(self.target_modules, str):
            raise ConfigError(f"target_modules must be a regex string, got {self.target_modules!r}")
        dims = (self.dims,) if isinstance(self.dims, int) else self.dims
        bad_dims = not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
        if (complete or self.dims is not None) and bad_dims:
            raise ConfigError(f"dims must be a positive int or a list of them, got {self.dims!r}")
        if complete and self.tuner_cfg is None:
            raise ConfigError("tuner_cfg is required: e.g. 'res_adapter' or {'lateral_cfg': ..., 'vertical_cfg': ...}")


# ---------------------------------------------------------------------------
# the tuner kinds: specs (names, shapes, init) and pure forwards
# ---------------------------------------------------------------------------
class _Spec(NamedTuple):
    kind: str  # res_adapter | res_group_adapter | upsample | identity
    zero: bool
    cfg: Any  # the kind's own options
    dim: int
    layer: int
    depth: int
    zero_last: bool  # zero_init_last: ln2 of the last block starts at zero


def _has(cfg: Any, key: str) -> bool:
    return cfg == key or (isinstance(cfg, (dict, str)) and key in cfg)


def _spec(cfg: Any, dim: int, layer: int, depth: int, zero_last: bool) -> _Spec:
    cfg = {} if cfg is None else cfg
    zero = _has(cfg, "zero")
    for kind in ("res_adapter", "res_group_adapter", "upsample"):
        if (isinstance(cfg, str) and cfg == kind) or (isinstance(cfg, dict) and kind in cfg):
            inner = cfg[kind] if isinstance(cfg, dict) else cfg
            return _Spec(kind, zero, inner, dim, layer, depth, zero_last)
    return _Spec("identity", zero, cfg, dim, layer, depth, zero_last)


def _opt(cfg: Any, key: str, default: Any) -> Any:
    return cfg[key] if isinstance(cfg, dict) and key in cfg else default


def _adapter_length(s: _Spec) -> int:
    n = _opt(s.cfg, "adapter_length", 32)
    if isinstance(n, (list, tuple)):
        if len(n) <= s.layer:
            raise ConfigError(f"adapter_length list {n} has no entry for block {s.layer}")
        n = n[s.layer]
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(f"adapter_length must be a positive int (or a list of them), got {n!r}")
    return n


def _weight_shapes(s: _Spec, dim: int) -> dict[str, tuple[int, ...]]:
    w = _opt(s.cfg, "adapter_weight", None)
    if w is None or (isinstance(w, str) and w.startswith("scalar")):
        return {}
    if w == "gate":
        return {"scaling.weight": (1, dim), "scaling.bias": (1,)}
    if w == "scale":
        return {"scaling": (1,)}
    if w == "scale_channel":
        return {"scaling": (dim,)}
    raise ConfigError(f"adapter_weight={w!r} is not supported; use scale, scale_channel, scalar_<v> or gate")


def _shapes(s: _Spec, upsample_out: int | None) -> dict[str, tuple[int, ...]]:
    if s.zero or s.kind == "identity":
        return {}
    if s.kind == "res_adapter":
        n = _adapter_length(s)
        return {
            "ln1.weight": (n, s.dim),
            "ln1.bias": (n,),
            "ln2.weight": (s.dim, n),
            "ln2.bias": (s.dim,),
            **_weight_shapes(s, s.dim),
        }
    if s.kind == "res_group_adapter":
        adim, head, sf = _opt(s.cfg, "dim", s.dim), _opt(s.cfg, "head", 4), _opt(s.cfg, "scale_factor", 2)
        if adim % head != 0:
            raise ConfigError(f"res_group_adapter: dim {adim} is not divisible by head {head}")
        m = adim // head
        return {
            "ln1.weight": (m * sf, m),
            "ln1.bias": (m * sf,),
            "ln2.weight": (m, m * sf),
            "ln2.bias": (m,),
            **_weight_shapes(s, s.dim),
        }
    if upsample_out:
        return {"conv.weight": (upsample_out, s.dim, 3, 3), "conv.bias": (upsample_out,)}
    return {}


def _init_tensor(name: str, shape: tuple[int, ...], s: _Spec, g: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape)
    last_zero = s.zero_last and s.layer == s.depth - 1 and name.startswith("ln2")
    if name.startswith("conv") or last_zero:
        return t.zero_()
    if name == "scaling":
        return t.fill_(1.0)
    if name == "scaling.weight":
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)
    if name == "scaling.bias":
        return t.uniform_(-1 / math.sqrt(s.dim), 1 / math.sqrt(s.dim), generator=g)
    if s.kind == "res_adapter":
        if name.endswith("weight"):
            return nn.init.xavier_uniform_(t, generator=g)
        return t.normal_(0.0, 1e-6, generator=g)
    if name.endswith("weight"):  # res_group_adapter: kaiming weights, N(0, 1) biases
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)
    return t.normal_(0.0, 1.0, generator=g)


def _weighting(s: _Spec, data: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    w = _opt(s.cfg, "adapter_weight", None)
    if w is None:
        return data
    if w == "gate":
        return data * torch.sigmoid(F.linear(data, t["scaling.weight"], t["scaling.bias"])).mean(dim=1).view(-1, 1, 1)
    if w.startswith("scalar"):
        return data * float(w.split("_")[-1])
    return data * t["scaling"]


def _apply_tuner(s: _Spec, t: dict[str, torch.Tensor], x: Any, target_size: Any) -> Any:
    """One lateral/vertical/aux tuner on ``x`` (pure)."""
    if s.zero:
        return 0.0
    if s.kind == "identity":
        return x
    if s.kind == "upsample":
        if x.shape[1] != s.dim:
            raise ConfigError(f"Res-Tuning upsample: input has {x.shape[1]} channels, dims says {s.dim}")
        size = dict(scale_factor=2) if target_size is None else dict(size=tuple(target_size))
        y = F.interpolate(x.float(), mode="nearest", **size).type_as(x)
        return F.conv2d(y, t["conv.weight"], t["conv.bias"], padding=1) if "conv.weight" in t else y
    dtype = x.dtype
    x = x.to(t["ln1.weight"].dtype)

    def mlp(z: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(z, t["ln1.weight"], t["ln1.bias"])), t["ln2.weight"], t["ln2.bias"])

    if s.kind == "res_adapter":
        if x.shape[1 if x.dim() == 4 else -1] != s.dim:
            raise ConfigError(f"Res-Tuning res_adapter: input {tuple(x.shape)} does not have dims={s.dim} channels")
        if x.dim() == 4:
            b, c, h, w = x.shape
            out = _weighting(s, mlp(x.reshape(b, c, h * w).permute(0, 2, 1)), t)
            out = out.permute(0, 2, 1).reshape(b, out.shape[-1], h, w)
        else:
            out = _weighting(s, mlp(x), t)
        return (x + out).to(dtype)
    # res_group_adapter: channels split into `head` interleaved groups (einops 'b n (c h) -> (b h) n c')
    if x.dim() != 4:
        raise ConfigError(f"Res-Tuning res_group_adapter needs 4-D (b, c, h, w) inputs, got {tuple(x.shape)}")
    b, c, h, w = x.shape
    heads = _opt(s.cfg, "head", 4)
    tokens = (
        x.permute(0, 2, 3, 1).reshape(b, h * w, c // heads, heads).permute(0, 3, 1, 2).reshape(b * heads, h * w, -1)
    )
    y = mlp(tokens).reshape(b, heads, h * w, -1).permute(0, 2, 3, 1).reshape(b, h * w, -1)
    y = _weighting(s, y, t)
    return (x + y.reshape(b, h, w, -1).permute(0, 3, 1, 2)).to(dtype)


# ---------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------
class _Block(NamedTuple):
    layer: int
    tuners: tuple[tuple[str, _Spec], ...]  # ("lateral_tuner", spec), ("vertical_tuner", ...), ("aux_tuner", ...)


class _Layout(NamedTuple):
    root: tuple[str, nn.Module] | None
    stems: tuple[tuple[str, nn.Module], ...]
    targets: tuple[tuple[str, nn.Module], ...]
    blocks: tuple[_Block, ...]
    shapes: dict[str, tuple[int, ...]]


def _block_cfgs(cfg: ResTuningConfig, i: int, depth: int) -> dict[str, Any]:
    c = cfg.tuner_cfg[i] if isinstance(cfg.tuner_cfg, (list, tuple)) else cfg.tuner_cfg
    if isinstance(c, str):
        return {
            "lateral_tuner": c,
            "vertical_tuner": c,
            "aux_tuner": "upsample" if cfg.use_upsample and i != depth - 1 else None,
        }
    if isinstance(c, dict):
        return {
            "lateral_tuner": c.get("lateral_cfg"),
            "vertical_tuner": c.get("vertical_cfg"),
            "aux_tuner": c.get("aux_cfg"),
        }
    raise ConfigError(f"tuner_cfg for block {i} must be a string or a dict, got {c!r}")


def _layout(model: nn.Module, cfg: ResTuningConfig, adapter: str) -> _Layout:
    names = [n for n, _ in own_named_modules(model)]
    root = None
    if cfg.root_modules:
        hits = [n for n in names if re.fullmatch(cfg.root_modules, n)]
        if not hits:
            raise TargetError(f"root_modules={cfg.root_modules!r} matched no module of {type(model).__name__}")
        root = (hits[0], model.get_submodule(hits[0]))
    if isinstance(cfg.stem_modules, str):
        stem_names = [n for n in names if re.fullmatch(cfg.stem_modules, n)]
    else:
        missing = [n for n in cfg.stem_modules if n not in names]
        if missing:
            raise TargetError(f"stem_modules {missing} are not modules of {type(model).__name__}")
        stem_names = list(cfg.stem_modules)
    if not stem_names:
        raise TargetError(f"stem_modules={cfg.stem_modules!r} matched no module of {type(model).__name__}")
    targets = [(n, model.get_submodule(n)) for n in names if re.fullmatch(str(cfg.target_modules), n)]
    if not targets:
        raise TargetError(f"target_modules={cfg.target_modules!r} matched no module of {type(model).__name__}")
    for n, m in targets:
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            raise TargetError(f"target {n!r} is a {type(m).__name__}, which has no forward to hook")
    depth = len(stem_names)
    dims = [cfg.dims] * depth if isinstance(cfg.dims, int) else list(cfg.dims)
    if len(dims) != depth:
        raise ConfigError(f"dims has {len(dims)} entries but stem_modules matched {depth} modules")
    ups = cfg.upsample_out_channels
    blocks, shapes = [], {}
    for i in range(depth):
        up = ups[i] if isinstance(ups, (list, tuple)) else ups
        tuners = []
        for stage, c in _block_cfgs(cfg, i, depth).items():
            if stage == "aux_tuner" and not c:
                continue
            s = _spec(c, dims[i], i, depth, bool(cfg.zero_init_last))
            tuners.append((stage, s))
            for pname, shape in _shapes(s, up).items():
                shapes[f"restuning_{adapter}.bypass_blocks.{i}.{stage}.tuner.{pname}"] = shape
        blocks.append(_Block(i, tuple(tuners)))
    stems = tuple((n, model.get_submodule(n)) for n in stem_names)
    return _Layout(root, stems, tuple(targets), tuple(blocks), shapes)


# ---------------------------------------------------------------------------
# tuner functions
# ---------------------------------------------------------------------------
def init(
    model: nn.Module, config: ResTuningConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh bypass params drawn like SWIFT (Xavier + N(0, 1e-6) for res_adapter, zero convs...). Pure."""
    if not isinstance(config, ResTuningConfig):
        raise ConfigError(f"restuning.init needs a ResTuningConfig, got {type(config).__name__}")
    config.check()
    lay = _layout(model, config, adapter_name)
    ref = next(model.parameters())
    tensors: dict[str, torch.Tensor] = {}
    for blk in lay.blocks:
        for stage, s in blk.tuners:
            head = f"restuning_{adapter_name}.bypass_blocks.{blk.layer}.{stage}.tuner."
            for key, shape in lay.shapes.items():
                if key.startswith(head):
                    t = _init_tensor(key[len(head) :], shape, s, generator)
                    tensors[key] = t.to(device=ref.device, dtype=ref.dtype)
    return TunerParams(tensors, config, adapter_name)


def _check(model: nn.Module, params: TunerParams) -> _Layout:
    lay = _layout(model, params.config, params.adapter_name)
    check_exact_tensors(params, lay.shapes, "Res-Tuning params do not fit")
    return lay


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` / :class:`TargetError` if ``params`` do not fit ``model``. Pure."""
    _check(model, params)


def _first(x: Any) -> Any:
    x = x[0] if isinstance(x, (list, tuple)) else x
    return x.detach()


def bypass(
    blocks: tuple[_Block, ...],
    tensors: dict[int, dict[str, dict[str, torch.Tensor]]],
    root: torch.Tensor,
    stems: list[torch.Tensor],
) -> Any:
    """The bypass network on detached probes: ``x = lateral(stem_i) + vertical(x)``, then aux. Pure."""
    x = root
    for blk, stem in zip(blocks, stems, strict=True):
        size = stems[blk.layer + 1].shape[2:] if blk.layer < len(stems) - 1 else None
        parts = dict(blk.tuners)
        t = tensors[blk.layer]
        out = _apply_tuner(parts["lateral_tuner"], t["lateral_tuner"], stem, None) + _apply_tuner(
            parts["vertical_tuner"], t["vertical_tuner"], x, None
        )
        if "aux_tuner" in parts:
            out = _apply_tuner(parts["aux_tuner"], t["aux_tuner"], out, size)
        x = out
    return x


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """Probe slots on root/stems (per-call storage) and a slot on each target that feeds it the bypass output."""
    cfg: ResTuningConfig = params.config
    lay = _check(model, params)
    probes: dict[str, Any] = {}  # per call: "root", "stem<i>"
    head = f"restuning_{params.adapter_name}.bypass_blocks."
    tensors: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for blk in lay.blocks:
        for stage, _ in blk.tuners:
            pre_ = f"{head}{blk.layer}.{stage}.tuner."
            tensors.setdefault(blk.layer, {})[stage] = {
                k[len(pre_) :]: v for k, v in params.items() if k.startswith(pre_)
            }
    fwd: dict[nn.Module, list[Any]] = {}
    pre: dict[nn.Module, list[Any]] = {}

    def recorder(key: str, hook: str, module: nn.Module) -> None:
        if hook == "input":

            def rec_in(m: nn.Module, a: tuple[Any, ...], k: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
                probes[key] = _first(a[0] if a else next(iter(k.values())))
                return a, k

            pre.setdefault(module, []).append(rec_in)
        else:

            def rec_out(m: nn.Module, a: tuple[Any, ...], k: dict[str, Any], o: Any) -> Any:
                probes[key] = _first(o)
                return o

            fwd.setdefault(module, []).append(rec_out)

    if lay.root is not None:
        recorder("root", cfg.root_modules_hook, lay.root[1])
    else:
        recorder("root", "input", lay.stems[0][1])
    for i, (_, m) in enumerate(lay.stems):
        recorder(f"stem{i}", cfg.stem_modules_hook, m)

    def run(name: str) -> Any:
        needed = ["root"] + [f"stem{i}" for i in range(len(lay.stems))]
        missing = [k for k in needed if k not in probes]
        if missing:
            raise ConfigError(
                f"Res-Tuning target {name!r} ran before the probes {missing} were recorded;"
                " the target must come after the root and stem modules in the forward pass"
            )
        return bypass(lay.blocks, tensors, probes["root"], [probes[f"stem{i}"] for i in range(len(lay.stems))])

    pos = cfg.target_hidden_pos
    for name, module in lay.targets:
        if cfg.target_modules_hook == "input":

            def target_in(m: nn.Module, a: tuple[Any, ...], k: dict[str, Any], _n: str = name) -> Any:
                new = run(_n)
                if isinstance(pos, int):
                    a = (*a[:pos], new, *a[pos + 1 :])
                else:
                    k = {**k, pos: new}
                return a, k

            pre.setdefault(module, []).append(target_in)
        else:

            def target_out(m: nn.Module, a: tuple[Any, ...], k: dict[str, Any], o: Any, _n: str = name) -> Any:
                new = run(_n)
                if isinstance(o, tuple):
                    return (*o[:pos], new, *o[pos + 1 :])
                if isinstance(o, (list, dict)):
                    o = type(o)(o)
                    o[pos] = new
                    return o
                return new

            fwd.setdefault(module, []).append(target_out)
    ensure_slots(list(pre), pre=True)
    ensure_slots(list(fwd))
    return Routes(forward=fwd, pre=pre)


tuner = Tuner(
    swift_type="RESTUNING",
    config_cls=ResTuningConfig,
    init=init,
    routes=routes,
    validate=validate,
    key_naming=KeyNaming(glued=(("restuning_", ("bypass_blocks",)),)),
)
