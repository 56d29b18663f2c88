"""Side-tuning (Zhang et al. 2019) with SWIFT's ``SideConfig``, as pure functions.

Per targeted module, with its input ``x`` (the argument at ``source_hidden_pos``),
its output ``y`` (the whole output if a tensor, else the entry at
``target_hidden_pos``) and a learned scalar ``alpha``::

    y' = sigmoid(alpha) * y + (1 - sigmoid(alpha)) * side_net(x)

``side_net`` is SWIFT's ``'fcn4'`` (4 conv + GroupNorm + ReLU blocks on an image
``(batch, 3, H, W)``, global average pool, linear to ``dim``) or ``'mlp'``
(``fc2(gelu(fc1(x)))``, ``dim -> dim -> dim`` on the last axis).  The side network
runs in its params' dtype and its result is cast to ``y``'s dtype (so an fp32 side
network works on a bf16 model, where SWIFT raises a dtype error).  SWIFT's
``'alexnet'`` downloads pretrained torchvision weights and is not supported.

Param names = SWIFT's: ``<module>.side_<adapter>.alpha`` (scalar) and
``<module>.side_<adapter>.side_net.<...>`` (e.g. ``conv1.0.weight``,
``conv1.1.bias``, ``fc.weight`` for fcn4; ``fc1.weight`` ... for mlp).
Pure: nothing is written to the model or params.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..errors import ConfigError, ParamsMismatchError, UnsupportedModuleError
from ._swift_hooks import check_input_position, input_at, output_at, swift_select, with_output_at
from .base import CallContext, KeyNaming, Tuner, TunerConfig

__all__ = ["SideConfig", "init", "routes", "side_net_shapes", "side_net_forward", "tuner", "validate"]

_SIDE_NETS = ("fcn4", "mlp")
# fcn4 conv blocks: (name, in_channels, out_channels, stride, padding); all 3x3, no bias, GroupNorm(2, out)
_FCN4 = (("conv1", 3, 16, 1, 1), ("conv2", 16, 16, 2, 0), ("conv3", 16, 32, 2, 0), ("conv4", 32, 64, 1, 0))


@dataclass(frozen=True, eq=False)
class SideConfig(TunerConfig):
    """SWIFT's ``SideConfig`` (same field names and defaults).

    ``dim``: output size of the side network (the target's hidden size);
    ``target_modules``: a regex that must match the whole module name (SWIFT
    accepts only a regex here); ``side_module_name``: ``'fcn4'`` or ``'mlp'``;
    ``source_hidden_pos`` / ``target_hidden_pos``: int or str position of the
    side network's input in the module's arguments / of the blended tensor in its output.
    """

    dim: Any = None
    target_modules: Any = None
    side_module_name: str = "fcn4"
    source_hidden_pos: Any = 0
    target_hidden_pos: Any = 0
    swift_type: str = "SIDE"
    model_key_mapping: Any = None

    def check(self, *, complete: bool = True) -> None:
        """Field checks (:meth:`TunerConfig.check`); unset required fields only when ``complete``."""
        if (complete or self.dim is not None) and (
            isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0
        ):
            raise ConfigError(f"SideConfig.dim must be a positive int, got {self.dim!r}")
        name = str(self.side_module_name).lower()
        if name == "alexnet":
            raise ConfigError(
                "SideConfig.side_module_name='alexnet' needs pretrained torchvision weights downloaded at"
                f" build time; functuner supports {list(_SIDE_NETS)}"
            )
        if name not in _SIDE_NETS:
            raise ConfigError(
                f"SideConfig.side_module_name={self.side_module_name!r} is unknown; use one of {_SIDE_NETS}"
            )
        for field in ("source_hidden_pos", "target_hidden_pos"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ConfigError(f"SideConfig.{field} must be an int or a str, got {v!r}")
        if (complete or self.target_modules is not None) and not isinstance(self.target_modules, str):
            raise ConfigError(
                f"SideConfig.target_modules must be a regex string (as in SWIFT), got {self.target_modules!r}"
            )


def side_net_shapes(side_module_name: str, dim: int) -> dict[str, tuple[int, ...]]:
    """Names (relative to ``side_net``) and shapes of the side network's parameters, in SWIFT's order."""
    kind = side_module_name.lower()
    if kind == "mlp":
        return {"fc1.weight": (dim, dim), "fc1.bias": (dim,), "fc2.weight": (dim, dim), "fc2.bias": (dim,)}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, cin, cout, _, _ in _FCN4:
        shapes[f"{name}.0.weight"] = (cout, cin, 3, 3)
        shapes[f"{name}.1.weight"] = (cout,)
        shapes[f"{name}.1.bias"] = (cout,)
    shapes["fc.weight"] = (dim, 64)
    shapes["fc.bias"] = (dim,)
    return shapes


def _prefix(module_name: str, adapter: str) -> str:
    return f"{module_name}.side_{adapter}."


def _check_module(module: nn.Module, name: str, cfg: SideConfig) -> None:
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        raise UnsupportedModuleError(f"Side-tuning cannot target {name!r}: a {type(module).__name__} has no forward")
    check_input_position(
        module.forward,
        cfg.source_hidden_pos,
        "SideConfig.source_hidden_pos",
        f"{name}.forward ({type(module).__name__})",
    )


def _default_init(shapes: Mapping[str, tuple[int, ...]], pname: str, generator: torch.Generator) -> torch.Tensor:
    """PyTorch's default init of the layer owning ``pname`` (what SWIFT gets from nn.Conv2d / GroupNorm / Linear)."""
    layer, leaf = pname.rsplit(".", 1)
    shape = shapes[pname]
    if pname.startswith("conv") and layer.endswith(".1"):  # GroupNorm
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "weight":
        return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(shapes[f"{layer}.weight"][1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def init(
    model: nn.Module, config: SideConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh side networks (PyTorch default layer init, ``alpha = 0``), float32 on each module's device. Pure."""
    if not isinstance(config, SideConfig):
        raise ConfigError(f"side.init needs a SideConfig, got {type(config).__name__}")
    config.check()
    selected = swift_select(model, config.target_modules, "SideConfig.target_modules", regex_only=True)
    for name, module in selected:
        _check_module(module, name, config)
    shapes = side_net_shapes(config.side_module_name, config.dim)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in selected:
        device = next(iter(module.parameters()), torch.empty(0)).device
        prefix = _prefix(name, adapter_name)
        for pname in shapes:
            tensors[prefix + "side_net." + pname] = _default_init(shapes, pname, generator).to(device)
        tensors[prefix + "alpha"] = torch.tensor(0.0, device=device)
    return TunerParams(tensors, config, adapter_name)


class _Site(NamedTuple):
    name: str
    module: nn.Module
    prefix: str


def _sites(model: nn.Module, params: TunerParams) -> list[_Site]:
    cfg: SideConfig = params.config
    marker = f".side_{params.adapter_name}.alpha"
    shapes = side_net_shapes(cfg.side_module_name, cfg.dim)
    sites, claimed = [], set()
    for key in params:
        if not key.endswith(marker):
            continue
        name = key[: -len(marker)]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ParamsMismatchError(f"params key {key!r} refers to module {name!r}, which the model lacks") from None
        _check_module(module, name, cfg)
        prefix = _prefix(name, params.adapter_name)
        if params[key].dim() != 0:
            raise ParamsMismatchError(f"params[{key!r}] must be a scalar, got shape {tuple(params[key].shape)}")
        for pname, shape in shapes.items():
            k = prefix + "side_net." + pname
            if k not in params:
                raise ParamsMismatchError(f"params lacks {k!r} ({cfg.side_module_name} side network)")
            if tuple(params[k].shape) != shape:
                raise ParamsMismatchError(
                    f"params[{k!r}] has shape {tuple(params[k].shape)}; SideConfig(dim={cfg.dim},"
                    f" side_module_name={cfg.side_module_name!r}) needs {shape}"
                )
            claimed.add(k)
        claimed.add(key)
        sites.append(_Site(name, module, prefix))
    extra = sorted(set(params) - claimed)
    if extra:
        raise ParamsMismatchError(f"params keys {extra[:5]} are not tensors of side adapter {params.adapter_name!r}")
    return sites


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` / :class:`ConfigError` if ``params`` does not fit ``model``. Pure."""
    _sites(model, params)


def side_net_forward(kind: str, w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The side network on ``x``: fcn4 ``(B, 3, H, W) -> (B, dim)``; mlp ``(..., dim) -> (..., dim)``. Pure."""
    if kind.lower() == "mlp":
        return F.linear(F.gelu(F.linear(x, w["fc1.weight"], w["fc1.bias"])), w["fc2.weight"], w["fc2.bias"])
    h = x
    for name, _, _, stride, padding in _FCN4:
        h = F.conv2d(h, w[f"{name}.0.weight"], None, stride, padding)
        h = F.relu(F.group_norm(h, 2, w[f"{name}.1.weight"], w[f"{name}.1.bias"]))
    h = F.adaptive_avg_pool2d(h, (1, 1)).view(h.size(0), -1)
    return F.linear(h, w["fc.weight"], w["fc.bias"])


def _slot(
    site: _Site,
    cfg: SideConfig,
    alpha: torch.Tensor,
    net: dict[str, torch.Tensor],
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: Any,
) -> Any:
    where = f"{site.name}.forward"
    x = input_at(args, kwargs, cfg.source_hidden_pos, "SideConfig.source_hidden_pos", where)
    y = output_at(out, cfg.target_hidden_pos, "SideConfig.target_hidden_pos", where)
    kind = cfg.side_module_name.lower()
    if kind == "fcn4" and (x.dim() != 4 or x.shape[1] != 3):
        raise ConfigError(
            f"SideConfig.side_module_name='fcn4' needs images (batch, 3, H, W) at source_hidden_pos="
            f"{cfg.source_hidden_pos!r} of {where}, got shape {tuple(x.shape)}"
        )
    if kind == "mlp" and x.shape[-1] != cfg.dim:
        raise ConfigError(f"SideConfig.dim={cfg.dim} does not match the input of {where} of shape {tuple(x.shape)}")
    if y.shape[-1] != cfg.dim:
        raise ConfigError(f"SideConfig.dim={cfg.dim} does not match the output of {where} of shape {tuple(y.shape)}")
    a = torch.sigmoid(alpha)
    dtype = next(iter(net.values())).dtype  # run the side network in its params' dtype (fp32 by default)
    side = side_net_forward(kind, net, x.to(dtype)).to(y.dtype)
    return with_output_at(out, cfg.target_hidden_pos, a.to(y.dtype) * y + (1 - a.to(y.dtype)) * side)


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """Forward slots blending each targeted module's output with its side network."""
    cfg: SideConfig = params.config
    fwd: dict[nn.Module, list[Any]] = {}
    for site in _sites(model, params):
        start = site.prefix + "side_net."
        net = {k[len(start) :]: v for k, v in params.items() if k.startswith(start)}
        fwd.setdefault(site.module, []).append(functools.partial(_slot, site, cfg, params[site.prefix + "alpha"], net))
    ensure_slots(list(fwd))
    return Routes(forward=fwd)


tuner = Tuner(
    swift_type="SIDE",
    config_cls=SideConfig,
    init=init,
    routes=routes,
    validate=validate,
    key_naming=KeyNaming(glued=(("side_", ("alpha", "side_net")),)),
)
