"""LoRA (and its DoRA / rsLoRA variants) as a config plus pure functions.

Math, per adapted module with base weight ``W`` and scaling
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA):

* ``nn.Linear`` / GPT-2 ``Conv1D``:  ``y = base(x) + s * B(A(dropout(x)))`` with
  ``A: (r, in)``, ``B: (out, r)``.  The product ``B @ A`` is never formed in
  the forward, so training never pays for a full-size weight gradient.
* ``nn.Embedding``: ``y = base(x) + s * embedding(x, A.T) @ B.T`` with
  ``A: (r, num_embeddings)``, ``B: (embedding_dim, r)``.
* ``nn.Conv1d`` / ``nn.Conv2d``: ``A`` is a conv with the base kernel, stride
  and padding (``(r, in, *k)``), ``B`` a 1x1 conv (``(out, r, 1...)``).
* DoRA: ``y = m / ||W + s B A||_row * (W x + s B A x) + bias``, the norm detached
  from the graph (DoRA paper, section 4.3), as PEFT does.

Parameter names match PEFT/SWIFT in-memory names relative to the original
model: ``<module>.lora_A.<adapter>.weight``, ``<module>.lora_B.<adapter>.weight``,
``<module>.lora_embedding_A.<adapter>``, ``<module>.lora_embedding_B.<adapter>``,
``<module>.lora_magnitude_vector.<adapter>.weight``; trainable biases
(``bias='all'|'lora_only'``) keep the model's own name (``<module>.bias``);
``modules_to_save`` copies live at ``<module>.modules_to_save.<adapter>.<param>``.

Every function here is pure: it reads the model and the params and returns new
tensors; nothing is written to either.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ...core.params import TunerParams
from ...core.routing import Routes, ensure_slots
from ...core.targets import is_conv1d_gpt2, match_name, pattern_value, select_modules
from ...errors import ConfigError, ParamsMismatchError, UnsupportedModuleError
from ..base import CallContext, Tuner, TunerConfig, override_slot, resolve_dtype

__all__ = [
    "LoRAConfig",
    "LoraConfig",
    "init",
    "lora_delta",
    "merge",
    "routes",
    "tuner",
    "unmerge",
    "validate",
]

_INIT_CHOICES = (True, False, "gaussian")
_BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass(frozen=True, eq=False)
class LoRAConfig(TunerConfig):
    """LoRA config with SWIFT's ``LoRAConfig`` field names (a superset of PEFT's ``LoraConfig``).

    Fields PEFT has and functuner does not implement (``loftq_config``,
    ``megatron_config``, ``layer_replication``...) are accepted only at their
    neutral defaults; a non-default value raises :class:`ConfigError` naming it.
    """

    r: int = 8
    target_modules: Any = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Any = None
    init_lora_weights: Any = True
    layers_to_transform: Any = None
    layers_pattern: Any = None
    rank_pattern: Any = field(default_factory=dict)
    alpha_pattern: Any = field(default_factory=dict)
    use_dora: bool = False
    exclude_modules: Any = None
    lora_bias: bool = False
    # SWIFT's extra fields
    lora_dtype: Any = None
    lorap_lr_ratio: float | None = None
    lorap_emb_lr: float = 1e-6
    use_qa_lora: bool = False
    use_merged_linear: bool = False
    enable_lora: Any = None
    # bookkeeping fields that PEFT/SWIFT write into adapter_config.json
    task_type: Any = None
    inference_mode: bool = False
    base_model_name_or_path: Any = None
    revision: Any = None
    swift_type: str = "LORA"
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank_pattern, dict) is False or isinstance(self.alpha_pattern, dict) is False:
            raise ConfigError("rank_pattern and alpha_pattern must be dicts {module-name regex: value}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got r={self.r!r}")
        for name, val in self.rank_pattern.items():
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ConfigError(f"rank_pattern[{name!r}] must be a positive integer, got {val!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ConfigError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not (0.0 <= float(self.lora_dropout) < 1.0):
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if self.init_lora_weights not in _INIT_CHOICES:
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use one of {_INIT_CHOICES}"
            )
        for name in ("use_qa_lora", "use_merged_linear", "lora_bias"):
            if getattr(self, name):
                raise ConfigError(f"{name}=True is not supported by functuner's LoRA")
        if self.enable_lora is not None:
            raise ConfigError("enable_lora (merged-linear LoRA) is not supported by functuner's LoRA")
        resolve_dtype(self.lora_dtype, "lora_dtype")
        if self.lorap_lr_ratio is not None and self.lorap_lr_ratio <= 0:
            raise ConfigError(f"lorap_lr_ratio must be positive, got {self.lorap_lr_ratio!r}")

    def rank_for(self, module_name: str) -> int:
        return int(pattern_value(module_name, self.rank_pattern, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(pattern_value(module_name, self.alpha_pattern, self.lora_alpha))

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


LoraConfig = LoRAConfig  # PEFT's spelling


# ---------------------------------------------------------------------------
# module kinds
# ---------------------------------------------------------------------------
def _kind(module: nn.Module, name: str) -> str:
    if is_conv1d_gpt2(module):
        return "conv1d_gpt2"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            raise UnsupportedModuleError(
                f"LoRA on {name!r}: grouped convolutions (groups={module.groups}) are not supported"
            )
        return "conv"
    raise UnsupportedModuleError(
        f"LoRA cannot adapt module {name!r} of type {type(module).__name__}; supported: nn.Linear, nn.Embedding,"
        " nn.Conv1d, nn.Conv2d, transformers Conv1D"
    )


def _in_out(module: nn.Module, kind: str) -> tuple[int, int]:
    shape = _weight(module).shape
    if kind in ("conv1d_gpt2", "embedding"):
        return int(shape[0]), int(shape[1])
    return int(shape[1]), int(shape[0])


def _weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` typed as a tensor (``nn.Module.__getattr__`` is typed ``Tensor | Module``)."""
    return cast(torch.Tensor, module.weight)


def _names(module_name: str, kind: str, adapter: str) -> tuple[str, str, str]:
    if kind == "embedding":
        a, b = f"{module_name}.lora_embedding_A.{adapter}", f"{module_name}.lora_embedding_B.{adapter}"
    else:
        a, b = f"{module_name}.lora_A.{adapter}.weight", f"{module_name}.lora_B.{adapter}.weight"
    return a, b, f"{module_name}.lora_magnitude_vector.{adapter}.weight"


def _expected_shapes(module: nn.Module, kind: str, r: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    fan_in, fan_out = _in_out(module, kind)
    if kind == "embedding":
        return (r, fan_in), (fan_out, r), (fan_out,)
    if kind == "conv":
        k = tuple(int(d) for d in _weight(module).shape[2:])
        ones = (1,) * len(k)
        return (r, fan_in, *k), (fan_out, r, *ones), (1, fan_out, *ones)
    return (r, fan_in), (fan_out, r), (fan_out,)


# ---------------------------------------------------------------------------
# pure math
# ---------------------------------------------------------------------------
def _weight_as_out_in(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The base weight viewed as (out, in, ...) - the Linear convention."""
    if kind in ("conv1d_gpt2", "embedding"):
        return weight.T
    return weight


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, kind: str = "linear") -> torch.Tensor:
    """The full-size weight change ``s * B @ A`` in the base weight's own layout, in float32.

    Shapes: linear ``(out, in)``; GPT-2 Conv1D ``(in, out)``; embedding
    ``(num_embeddings, dim)``; conv ``(out, in, *k)``.  For inference merges only:
    training through :func:`functuner.apply` never forms it.
    """
    A32, B32 = A.float(), B.float()
    if kind == "conv":
        if all(k == 1 for k in A.shape[2:]):
            delta = (B32.flatten(1) @ A32.flatten(1)).reshape(B.shape[0], A.shape[1], *A.shape[2:])
        else:
            conv = F.conv1d if A.dim() == 3 else F.conv2d
            delta = conv(A32.transpose(0, 1), B32).transpose(0, 1)
        return delta * scaling
    delta = (B32 @ A32) * scaling  # (out, in) for linear; (dim, num_emb) for embedding
    if kind in ("conv1d_gpt2", "embedding"):
        delta = delta.T
    return delta


def _dora_norm(weight_out_in: torch.Tensor, delta_out_in: torch.Tensor, kind: str) -> torch.Tensor:
    """Row norm of ``W + delta`` (per output unit), float32; conv keeps PEFT's ``(1, out, 1...)`` shape."""
    w = weight_out_in.float() + delta_out_in.float()
    if kind == "conv":
        norm: torch.Tensor = w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True)
        return norm.transpose(1, 0)
    return cast(torch.Tensor, torch.linalg.vector_norm(w, dim=1))


def _dora_row_norm_lowrank(
    weight_out_in: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Row norm of ``W + s B A`` (shape ``(out,)``, float32) without forming the ``(out, in)`` sum.

    ``||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T``:
    one ``(out, in) x (in, r)`` product and rank-sized work, instead of the
    full-size delta, sum and norm (about 3x less memory traffic per call).
    Linear / GPT-2 Conv1D only; no autograd graph (call under ``no_grad``).
    """
    w, a, b = weight_out_in.float(), A.float(), B.float()
    sq = (
        w.square().sum(1)
        + (2.0 * scaling) * (b * (w @ a.T)).sum(1)
        + (scaling * scaling) * ((b @ (a @ a.T)) * b).sum(1)
    )
    return sq.clamp_min(0.0).sqrt()


def _add_lowrank(out: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out + scaling * h @ B.T`` as one fused ``addmm`` (no full-size temporaries for the scaling or the sum).

    ``out``: ``(..., out_features)``, ``h``: ``(..., r)``, ``B``: ``(out_features, r)``, all one dtype.
    Autograd saves only ``h`` and ``B`` (rank-sized), not ``out``.
    """
    o = out.shape[-1]
    return torch.addmm(out.reshape(-1, o), h.reshape(-1, h.shape[-1]), B.T, alpha=scaling).view(out.shape)


# ---------------------------------------------------------------------------
# layout: per (model, params structure) the modules and names involved
# ---------------------------------------------------------------------------
class _Site(NamedTuple):
    name: str
    module: nn.Module
    kind: str
    a: str
    b: str
    m: str | None
    bias: str | None
    scaling: float
    dropout: float


class _Layout(NamedTuple):
    sites: tuple[_Site, ...]
    overrides: tuple[tuple[nn.Module, tuple[tuple[str, str], ...]], ...]  # module, ((param name, tensor key), ...)


_LAYOUT_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, _Layout]] = weakref.WeakKeyDictionary()
_LAYOUT_LOCK = threading.Lock()


def _find_module(model: nn.Module, name: str, key: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ParamsMismatchError(
            f"params key {key!r} refers to module {name!r}, which the model does not have"
        ) from None


def _build_layout(model: nn.Module, params: TunerParams) -> _Layout:
    cfg: LoRAConfig = params.config
    ad = params.adapter_name
    sites: list[_Site] = []
    claimed: set[str] = set()
    keys = list(params)
    modules_to_save_keys: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        for marker in (f".lora_A.{ad}.weight", f".lora_embedding_A.{ad}"):
            if key.endswith(marker):
                mname = key[: -len(marker)]
                module = _find_module(model, mname, key)
                kind = _kind(module, mname)
                a, b, m = _names(mname, kind, ad)
                if a != key:
                    raise ParamsMismatchError(f"params key {key!r}: module {mname!r} is a {kind}, expected key {a!r}")
                if b not in params:
                    raise ParamsMismatchError(f"params has {a!r} but not its partner {b!r}")
                has_m = m in params
                if has_m != bool(cfg.use_dora):
                    raise ParamsMismatchError(
                        f"params for {mname!r}: use_dora={cfg.use_dora} but {m!r} is {'present' if has_m else 'missing'}"
                    )
                bias_key = f"{mname}.bias" if f"{mname}.bias" in params else None
                sites.append(
                    _Site(
                        mname,
                        module,
                        kind,
                        a,
                        b,
                        m if has_m else None,
                        bias_key,
                        cfg.scaling_for(mname),
                        float(cfg.lora_dropout),
                    )
                )
                claimed.update(k for k in (a, b, m if has_m else None, bias_key) if k)
        if ".modules_to_save." in key:
            mname, _, rest = key.partition(".modules_to_save.")
            if not rest.startswith(ad + "."):
                raise ParamsMismatchError(f"params key {key!r} does not carry adapter name {ad!r}")
            modules_to_save_keys.setdefault(mname, []).append((rest[len(ad) + 1 :], key))
            claimed.add(key)
    overrides: list[tuple[nn.Module, tuple[tuple[str, str], ...]]] = []
    for mname, pairs in modules_to_save_keys.items():
        module = _find_module(model, mname, pairs[0][1])
        overrides.append((module, tuple(pairs)))
    # remaining keys: trainable biases of non-adapted modules (bias='all')
    for key in keys:
        if key in claimed:
            continue
        mname, _, leaf = key.rpartition(".")
        if leaf != "bias":
            raise ParamsMismatchError(f"params key {key!r} is not a LoRA, bias or modules_to_save tensor")
        module = _find_module(model, mname, key)
        overrides.append((module, (("bias", key),)))
    return _Layout(tuple(sites), tuple(overrides))


def _layout(model: nn.Module, params: TunerParams) -> _Layout:
    """The cached layout of ``params`` on ``model`` (validated once per model and params structure)."""
    if torch.compiler.is_compiling():
        return _compiled_layout(model, params)
    # shapes are part of the key: params with the same names but other shapes must be checked again
    # (tests/reliability/test_bad_input.py::test_wrong_shape_is_caught_even_after_good_params_with_the_same_names)
    sig = (tuple(params), params.config, params.adapter_name, tuple(t.shape for t in params.values()))
    with _LAYOUT_LOCK:
        per_model = _LAYOUT_CACHE.get(model)
        layout = per_model.get(sig) if per_model is not None else None
    if layout is None:
        layout = _build_layout(model, params)
        _check_shapes(model, params, layout)
        with _LAYOUT_LOCK:
            _LAYOUT_CACHE.setdefault(model, {})[sig] = layout
    key = (id(model), id(params.config), params.adapter_name, sig[0])
    if key not in _COMPILE_INDEX:
        with _LAYOUT_LOCK:
            _COMPILE_INDEX[key] = (weakref.ref(model), params.config, layout)
    return layout


# Under torch.compile, Dynamo can neither take the lock nor hash a config (json), so layouts are found
# here by the identity of the model and the config object, indexed by the eager call that preceded
# compilation (functuner.apply once before compiling).  The entry keeps the config alive (its id is
# never reused) and checks the model through a weak reference.
_COMPILE_INDEX: dict[tuple[int, int, str, tuple[str, ...]], tuple[Any, Any, _Layout]] = {}


def _compiled_layout(model: nn.Module, params: TunerParams) -> _Layout:
    key = (id(model), id(params.config), params.adapter_name, tuple(params._tensors))
    entry = _COMPILE_INDEX.get(key)
    if entry is None or entry[0]() is not model:
        raise RuntimeError(
            "functuner under torch.compile: these params were never applied to this model eagerly; call"
            " functuner.apply(model, params, ...) once outside torch.compile before compiling"
        )
    return entry[2]


def _check_shapes(model: nn.Module, params: TunerParams, layout: _Layout) -> None:
    for s in layout.sites:
        r = params[s.a].shape[0] if params[s.a].dim() > 0 else -1
        want_r = params.config.rank_for(s.name)
        if r != want_r:
            raise ParamsMismatchError(
                f"params[{s.a!r}] has rank {r}, but the config says r={want_r} for module {s.name!r}"
                " (the scaling lora_alpha/r depends on it; fix r or rank_pattern)"
            )
        ea, eb, em = _expected_shapes(s.module, s.kind, r)
        for key, expect in ((s.a, ea), (s.b, eb), (s.m, em)):
            if key is None:
                continue
            got = tuple(params[key].shape)
            if got != expect:
                raise ParamsMismatchError(
                    f"params[{key!r}] has shape {got}, but module {s.name!r} ({type(s.module).__name__},"
                    f" weight {tuple(_weight(s.module).shape)}) needs {expect}"
                )
        if s.bias is not None:
            mb = getattr(s.module, "bias", None)
            if mb is None or tuple(params[s.bias].shape) != tuple(mb.shape):
                raise ParamsMismatchError(f"params[{s.bias!r}] does not fit the bias of module {s.name!r}")
    for module, pairs in layout.overrides:
        own = dict(module.named_parameters())
        for pname, key in pairs:
            if pname not in own:
                raise ParamsMismatchError(f"params key {key!r}: the module has no parameter {pname!r}")
            if tuple(own[pname].shape) != tuple(params[key].shape):
                raise ParamsMismatchError(
                    f"params[{key!r}] has shape {tuple(params[key].shape)}, the module's {pname!r} has"
                    f" {tuple(own[pname].shape)}"
                )


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    _layout(model, params)


# ---------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------
def init(
    model: nn.Module, config: LoRAConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """Fresh LoRA params for ``model`` (pure: the model is read, never written).

    A is drawn like PEFT (``kaiming_uniform_(a=sqrt(5))`` for ``True``, normal with
    std ``1/r`` for ``'gaussian'``), B is zero, so the adapted model starts equal
    to the base model; ``init_lora_weights=False`` draws both randomly (for
    tests).  Embeddings: A zero, B normal.  DoRA magnitudes are the row norms of
    the base weights.  Tensors are created on the base weight's device with
    ``lora_dtype`` (default: the base weight's dtype).  Random draws use only
    ``generator`` (on CPU, so results do not depend on the device).
    """
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"lora.init needs a LoRAConfig, got {type(config).__name__}")
    selected = select_modules(
        model,
        config.target_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    if config.modules_to_save:
        selected = [(n, m) for n, m in selected if not match_name(n, config.modules_to_save)]
    lora_dtype = resolve_dtype(config.lora_dtype, "lora_dtype")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in selected:
        kind = _kind(module, name)
        r = config.rank_for(name)
        # r larger than the module's fan-in/out is wasteful but valid (PEFT accepts it too)
        base_w = _weight(module)
        dtype = lora_dtype or base_w.dtype
        a_shape, b_shape, m_shape = _expected_shapes(module, kind, r)
        A = torch.empty(a_shape, dtype=torch.float32)
        B = torch.empty(b_shape, dtype=torch.float32)
        if kind == "embedding":
            if config.init_lora_weights is False:
                torch.nn.init.normal_(A, generator=generator)
            else:
                torch.nn.init.zeros_(A)
            torch.nn.init.normal_(B, generator=generator)
        else:
            if config.init_lora_weights == "gaussian":
                torch.nn.init.normal_(A, std=1.0 / r, generator=generator)
            else:
                torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            if config.init_lora_weights is False:
                torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=generator)
            else:
                torch.nn.init.zeros_(B)
        a_key, b_key, m_key = _names(name, kind, adapter_name)
        A, B = A.to(device=base_w.device, dtype=dtype), B.to(device=base_w.device, dtype=dtype)
        tensors[a_key], tensors[b_key] = A, B
        if config.use_dora:
            with torch.no_grad():
                delta = _weight_as_out_in(lora_delta(A, B, config.scaling_for(name), kind), kind)
                norm = _dora_norm(_weight_as_out_in(base_w, kind), delta, kind)
            tensors[m_key] = norm.reshape(m_shape).to(device=base_w.device, dtype=dtype)
        if config.bias in ("all", "lora_only") and getattr(module, "bias", None) is not None:
            tensors[f"{name}.bias"] = cast(torch.Tensor, module.bias).detach().clone()
    if config.bias == "all":
        adapted = {n for n, _ in selected}
        for mname, module in model.named_modules():
            b = module._parameters.get("bias")
            if (
                b is not None
                and mname not in adapted
                and not (config.modules_to_save and match_name(mname, config.modules_to_save))
            ):
                tensors[f"{mname}.bias" if mname else "bias"] = b.detach().clone()
    if config.modules_to_save:
        found = False
        for mname, module in model.named_modules():
            if mname and match_name(mname, config.modules_to_save):
                found = True
                for pname, p in module.named_parameters():
                    tensors[f"{mname}.modules_to_save.{adapter_name}.{pname}"] = p.detach().clone()
        if not found:
            raise ConfigError(f"modules_to_save={list(config.modules_to_save)!r} matched no module of the model")
    return TunerParams(tensors, config, adapter_name)


# ---------------------------------------------------------------------------
# forward slots
# ---------------------------------------------------------------------------
def _dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return F.dropout(x, p, training=True)
    keep = torch.empty(x.shape, dtype=x.dtype, device="cpu").bernoulli_(1.0 - p, generator=generator).to(x.device)
    return x * keep / (1.0 - p)


def _first_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return cast(torch.Tensor, args[0])
    for k in ("input", "x", "hidden_states"):
        if k in kwargs:
            return cast(torch.Tensor, kwargs[k])
    raise TypeError("LoRA slot: could not find the module's input tensor")


def _slot(
    site: _Site,
    A: torch.Tensor,
    B: torch.Tensor,
    M: torch.Tensor | None,
    bias: torch.Tensor | None,
    generator: torch.Generator | None,
    module: Any,  # nn.Linear / Conv1D / Embedding / ConvNd: their attributes are read directly
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
) -> torch.Tensor:
    x = _first_arg(args, kwargs)
    kind, s = site.kind, site.scaling
    out_dtype = out.dtype
    base_bias = getattr(module, "bias", None) if kind != "embedding" else None
    if bias is not None:
        shift = (bias - base_bias) if base_bias is not None else bias
        out = out + (shift.view(1, -1, *([1] * (out.dim() - 2))) if kind == "conv" else shift)
        base_bias = bias
    if kind == "embedding":
        emb = F.embedding(
            x,
            A.T,
            padding_idx=module.padding_idx,
            max_norm=module.max_norm,
            norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq,
            sparse=module.sparse,
        )
        lora_out = (emb @ B.T) * s
        if M is None:
            return (out + lora_out).to(out_dtype)
        w = module.weight
        norm = _dora_norm(w.T.detach(), lora_delta(A.detach(), B.detach(), s, kind).T, kind).to(M.dtype)
        scale = M / norm
        return (scale * out + scale * lora_out).to(out_dtype)
    xa = x.to(A.dtype)
    dropped = site.dropout > 0.0 and module.training
    if dropped:
        xa = _dropout(xa, site.dropout, generator)
    if kind == "conv":
        conv = F.conv1d if A.dim() == 3 else F.conv2d
        h = conv(xa, A, stride=module.stride, padding=module.padding)
        lora_out = conv(h, B)
    else:
        h = F.linear(xa, A)
        if out.dtype == h.dtype and not dropped:
            return _fused_linear(h, A, B, M, s, out, base_bias, module, kind)
        lora_out = F.linear(h, B)
    if M is None:
        return (out + lora_out * s).to(out_dtype)
    # DoRA
    w = module.weight
    w_oi = _weight_as_out_in(w, kind)
    with torch.no_grad():
        if kind == "conv":
            delta = lora_delta(A.detach(), B.detach(), s, kind)
            norm = _dora_norm(w_oi.detach(), _weight_as_out_in(delta, kind), kind)
        else:
            norm = _dora_row_norm_lowrank(w_oi.detach(), A.detach(), B.detach(), s)
    scale = M / norm.to(M.dtype)
    if kind != "conv":
        scale = scale.view(1, -1) if scale.dim() == 1 else scale
    if dropped:
        if kind == "conv":
            conv = F.conv1d if A.dim() == 3 else F.conv2d
            base_result = conv(xa.to(w.dtype), w, None, module.stride, module.padding, module.dilation, module.groups)
        else:
            base_result = F.linear(xa.to(w.dtype), w_oi)
    else:
        base_result = out
        if base_bias is not None:
            base_result = out - (base_bias.view(1, -1, *([1] * (out.dim() - 2))) if kind == "conv" else base_bias)
    dora = (scale - 1) * base_result + scale * lora_out * s
    return (out + dora).to(out_dtype)


def _fused_linear(
    h: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    M: torch.Tensor | None,
    s: float,
    out: torch.Tensor,
    base_bias: torch.Tensor | None,
    module: nn.Module,
    kind: str,
) -> torch.Tensor:
    """The linear LoRA/DoRA output from the base output ``out`` and ``h = x A^T`` (no dropout, one dtype).

    LoRA: ``out + s h B^T`` in one ``addmm``.  DoRA: with ``c = m / ||W + s B A||_row``
    (detached; computed rank-wise by :func:`_dora_row_norm_lowrank`) the output
    ``out + (c - 1) W x + c s B A x`` equals ``c (W x + s B A x) + bias``: one
    ``addmm`` and one scale instead of five full-size elementwise passes.
    """
    if M is None:
        return _add_lowrank(out, h, B, s)
    with torch.no_grad():
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        norm = _dora_row_norm_lowrank(_weight_as_out_in(weight, kind).detach(), A.detach(), B.detach(), s)
    scale = M.view(-1) / norm.to(M.dtype)
    base_result = out if base_bias is None else out - base_bias
    scaled = _add_lowrank(base_result, h, B, s) * scale.to(out.dtype)
    return scaled if base_bias is None else scaled + base_bias


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """The slot functions one call runs: a LoRA delta at each adapted module, overrides elsewhere."""
    layout = _layout(model, params)
    fwd: dict[nn.Module, list[Any]] = {}
    gen = ctx.generator
    for site in layout.sites:
        fn = functools.partial(
            _slot,
            site,
            params[site.a],
            params[site.b],
            params[site.m] if site.m else None,
            params[site.bias] if site.bias else None,
            gen,
        )
        fwd.setdefault(site.module, []).append(fn)
    for module, pairs in layout.overrides:
        fwd.setdefault(module, []).insert(0, override_slot({pname: params[key] for pname, key in pairs}))
    ensure_slots(list(fwd))
    return Routes(forward=fwd)


def needs_generator(model: nn.Module, params: TunerParams) -> bool:
    """Whether a call on ``model`` (in its current train/eval mode) would draw random numbers."""
    if params.config.lora_dropout <= 0:
        return False
    return any(s.module.training for s in _layout(model, params).sites if s.kind != "embedding")


# ---------------------------------------------------------------------------
# merge / unmerge
# ---------------------------------------------------------------------------
def _base_mapping(model: nn.Module, base: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor]:
    if base is not None:
        return base
    state: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    return state


def _set_with_aliases(
    out: dict[str, torch.Tensor], base: Mapping[str, torch.Tensor], key: str, value: torch.Tensor
) -> None:
    """Write ``value`` at ``key`` and at every other key that shares the base tensor (tied weights)."""
    old = base[key]
    out[key] = value
    for k, t in base.items():
        if t is old and k != key:
            out[k] = value


def _plus_delta(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, kind: str) -> torch.Tensor:
    """``W + alpha * B A`` in ``W``'s layout, float32 (the caller rounds to ``W.dtype``).

    Linear, GPT-2 Conv1D and embeddings use one ``addmm``, so a float32 merge
    allocates only the result (no full-size delta or sum temporaries); conv
    kernels go through :func:`lora_delta`.
    """
    if kind == "conv":
        return W.float() + lora_delta(A, B, alpha, kind)
    A32, B32 = A.float(), B.float()
    if kind == "linear":
        return torch.addmm(W.float(), B32, A32, alpha=alpha)
    return torch.addmm(W.float(), A32.T, B32.T, alpha=alpha)  # (in, out) / (num_embeddings, dim) layouts


def _merge_impl(
    model: nn.Module,
    params: TunerParams,
    base: Mapping[str, torch.Tensor] | None,
    sign: int,
    unmerged: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    layout = _layout(model, params)
    state = _base_mapping(model, base)
    norm_state = state if unmerged is None else unmerged
    out = dict(state)
    for site in layout.sites:
        wkey = f"{site.name}.weight"
        if wkey not in state:
            raise ParamsMismatchError(f"merge: base state has no {wkey!r}")
        W = state[wkey]
        if site.m is None:
            new = _plus_delta(W, params[site.a], params[site.b], sign * site.scaling, site.kind)
        else:
            delta = lora_delta(params[site.a], params[site.b], site.scaling, site.kind)
            M = params[site.m].float()
            if sign < 0:
                raise ConfigError(
                    f"unmerge: DoRA ({site.name!r}) is not invertible from merged weights alone; keep the"
                    " original weights (functuner.merge never overwrites them)"
                )
            w_oi = _weight_as_out_in(W.float(), site.kind)
            d_oi = _weight_as_out_in(delta, site.kind)
            # the norm is ||W0 + s B A|| of the weight before any adapter was merged, as in the forward (and PEFT)
            norm = _dora_norm(_weight_as_out_in(norm_state[wkey].float(), site.kind), d_oi, site.kind)
            factor = M / norm
            if site.kind == "conv":
                new_oi = factor.transpose(0, 1) * (w_oi + d_oi)
            else:
                new_oi = factor.view(-1, 1) * (w_oi + d_oi)
            new = _weight_as_out_in(new_oi, site.kind)  # transposing back is its own inverse
        _set_with_aliases(out, state, wkey, new.to(W.dtype))
        if site.bias is not None:
            bkey = f"{site.name}.bias"
            new_bias = params[site.bias]
            if unmerged is not None and bkey in unmerged and state[bkey] is not unmerged[bkey]:
                # an earlier adapter already replaced this bias: add ours as a delta from the unmerged bias,
                # as the forward does when several adapters carry the bias of one adapted module
                new_bias = state[bkey] + (new_bias - unmerged[bkey])
            _set_with_aliases(out, state, bkey, new_bias)
    for module, pairs in layout.overrides:
        mname = next(n for n, m in model.named_modules() if m is module)
        for pname, key in pairs:
            full = f"{mname}.{pname}" if mname else pname
            _set_with_aliases(out, state, full, params[key])
    return out


def merge(
    model: nn.Module,
    params: TunerParams,
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    unmerged: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """New base weights with the adapter folded in: ``W + s B A`` computed in fp32, rounded once.

    ``base`` defaults to the model's own parameters and buffers (tied weights
    under every name).  Returns a new dict: merged entries are new tensors,
    every other entry is the same tensor object as in ``base`` (no copies).
    Trainable biases and ``modules_to_save`` copies replace their originals.
    When several adapters are merged in turn (``unmerged`` given), the bias of
    an adapted module that more than one of them carries is summed as deltas
    from the unmerged bias, as the adapter forward does; other biases and
    ``modules_to_save`` copies are replaced (the last adapter wins), as in the
    forward too.

    DoRA: ``m / ||W0 + s B A||_row * (W + s B A)`` where ``W0`` comes from
    ``unmerged`` (default: ``base``), the weights before any adapter was merged.
    When several adapters are merged in turn (``functuner.merge`` with a list),
    ``base`` already holds the earlier ones but the norm must not, exactly as in
    the adapter forward and in PEFT.
    """
    return _merge_impl(model, params, base, +1, unmerged)


def unmerge(model: nn.Module, params: TunerParams, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`merge` for plain LoRA: ``W' - s B A`` in fp32, rounded once.

    Accuracy (measured in ``tests/core/test_properties.py``), elementwise per adapter:
    bf16/fp16 ``|unmerge(merge(W)) - W| <= 0.5 * eps * (|W| + |s B A|)``, half
    an ulp of the merged weight; fp32 up to about ``1.7 * eps * (|W| + |s B A|)``
    (merge and unmerge each use one fused fp32 ``addmm``, whose internal
    roundings differ).  Repeated merge/unmerge cycles do not drift (the weights
    were a fixed point after one cycle in every example).  DoRA raises (the merged weights do not determine the
    original ones); keep the original weights instead, which :func:`merge` never
    overwrites.  Biases / ``modules_to_save`` cannot be restored from the adapter
    and are returned as they are in ``merged``.
    """
    layout = _layout(model, params)
    out = dict(merged)
    for site in layout.sites:
        if site.m is not None:
            raise ConfigError(
                f"unmerge: DoRA ({site.name!r}) is not invertible from merged weights alone; keep the original"
                " weights (functuner.merge never overwrites them)"
            )
        wkey = f"{site.name}.weight"
        W = merged[wkey]
        new = _plus_delta(W, params[site.a], params[site.b], -site.scaling, site.kind).to(W.dtype)
        _set_with_aliases(out, merged, wkey, new)
    return out


tuner = Tuner(
    swift_type="LORA",
    config_cls=LoRAConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    needs_generator=needs_generator,
)
