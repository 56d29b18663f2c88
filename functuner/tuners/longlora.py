"""LongLoRA: LoRA + trainable embedder/normalizer copies + shifted sparse attention (S2-Attn) in training.

LongLoRA (Chen et al. 2023, arXiv:2309.12307) is three things, SWIFT's
``LongLoRAConfig`` names them:

* plain LoRA on ``target_modules`` (every :class:`~functuner.tuners.lora.LoRAConfig`
  field works the same; the LoRA tensors have LoRA's names);
* trainable copies of the parameters named by ``embedder_and_normalizer``
  (a regex full-matched against parameter names, or a list of substrings, as in
  SWIFT), stored under the model's own parameter names
  (``model.embed_tokens.weight``, ``model.norm.weight``...), which is how SWIFT
  saves them;
* with ``model_type='llama'``: S2-Attn while the model is in training mode.
  The sequence (length ``L``) is cut into groups of ``g = int(L * group_size_ratio)``
  tokens; each head attends causally inside its group only, and the second half
  of the heads sees groups shifted by ``g/2`` tokens.  In eval mode attention
  is the model's own (S2 is a training-time approximation).

S2-Attn here is exact, not approximated again: after RoPE, the rolled grouped
attention equals full attention with a head-dependent block mask in the
original token order (:func:`s2_allowed`).  ``apply`` therefore hands that mask
to the model's own attention (``eager`` or ``sdpa``) through a pre slot on each
attention module; nothing is patched.  The cost is that of full attention with
a mask (no O(L*g) saving); :func:`s2_attention` is the grouped O(L*g) form as a
pure function for callers who compute attention themselves.  Padding: the key
padding of the model's mask (its last row) is kept; tokens still attend to
themselves, so fully padded rows never produce NaN.

Pure: the model's parameters and ``params`` are only read.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.params import TunerParams
from ..core.routing import Routes, ensure_slots
from ..errors import ConfigError, ParamsMismatchError, TargetError
from .base import CallContext, Tuner, override_slot
from .lora import peft_format
from .lora import tuner as lora

__all__ = [
    "LongLoRAConfig",
    "init",
    "merge",
    "routes",
    "s2_allowed",
    "s2_attention",
    "s2_shift",
    "s2_unshift",
    "tuner",
    "unmerge",
    "validate",
]

_S2_MODEL_TYPES = ("llama",)


@dataclass(frozen=True, eq=False)
class LongLoRAConfig(lora.LoRAConfig):
    """SWIFT's ``LongLoRAConfig``: every LoRA field plus the three below.

    * ``embedder_and_normalizer``: regex (full match on parameter names) or a
      list of substrings; the matching parameters become trainable copies.
      ``()`` disables them.
    * ``model_type``: ``'llama'`` turns S2-Attn on in training mode; ``None``
      leaves attention alone (SWIFT does the same).
    * ``group_size_ratio``: group length as a fraction of the sequence length.
    * ``use_flash_attn``: accepted for configs written by older SWIFT versions;
      functuner always uses the model's configured attention (``eager``/``sdpa``).
    """

    embedder_and_normalizer: Any = ("embed", "norm")
    model_type: str | None = None
    group_size_ratio: float = 0.25
    use_flash_attn: bool = False
    swift_type: str = "longlora"
    # SWIFT's LongLoRAConfig skips PEFT's __post_init__, so its peft_type stays None (and is written as null)
    peft_type: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model_type is not None and str(self.model_type).lower() not in _S2_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r}: LongLoRA's S2-Attn supports {_S2_MODEL_TYPES} (or None)"
            )
        ratio = self.group_size_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise ConfigError(f"group_size_ratio must be in (0, 1], got {ratio!r}")
        spec = self.embedder_and_normalizer
        if spec is not None and not isinstance(spec, (str, tuple)):
            raise ConfigError(f"embedder_and_normalizer must be a regex string or a list of names, got {spec!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, as SWIFT 4.6 writes them: ``use_flash_attn`` (not a 4.6 field) only when set."""
        out = super().to_dict()
        if not out.get("use_flash_attn"):
            out.pop("use_flash_attn", None)
        return out

    def lora_view(self) -> lora.LoRAConfig:
        """The plain LoRA part of this config, built once per config object.

        One object per config (not one per call) so LoRA's per-config caches hold one entry, and the
        layout found for it eagerly is found again under ``torch.compile`` (which looks it up by identity).
        """
        cached = self.__dict__.get("_lora_view_cache")
        if cached is None:
            names = {f.name for f in dataclasses.fields(lora.LoRAConfig)} - {"swift_type", "peft_type"}
            cached = lora.LoRAConfig(**{n: getattr(self, n) for n in names})
            object.__setattr__(self, "_lora_view_cache", cached)
        return cast(lora.LoRAConfig, cached)


# ---------------------------------------------------------------------------
# S2-Attn as pure functions
# ---------------------------------------------------------------------------
def _group_size(q_len: int, ratio: float) -> int:
    g = int(q_len * ratio)
    if g < 1 or q_len % g != 0:
        raise ConfigError(
            f"S2-Attn: sequence length {q_len} cannot be split into groups of int({q_len} * group_size_ratio="
            f"{ratio}) = {g} tokens; pad the sequence or change group_size_ratio"
        )
    if g % 2 != 0 and g > 1:
        raise ConfigError(
            f"S2-Attn: group size {g} (length {q_len} * group_size_ratio {ratio}) is odd; LongLoRA shifts half the"
            " heads by g/2 tokens, which needs an even group size"
        )
    return g


def s2_shift(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Roll the second half of the heads ``group_size // 2`` tokens towards the start. Pure.

    ``x``: ``(batch, heads, seq, head_dim)`` (after RoPE).  Returns a new tensor
    of the same shape: ``out[:, h, t] = x[:, h, (t + g/2) mod seq]`` for
    ``h >= heads // 2``; other heads unchanged.
    """
    half = x.shape[1] // 2
    return torch.cat([x[:, :half], x[:, half:].roll(-(group_size // 2), dims=2)], dim=1)


def s2_unshift(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`s2_shift` (same shapes). Pure."""
    half = x.shape[1] // 2
    return torch.cat([x[:, :half], x[:, half:].roll(group_size // 2, dims=2)], dim=1)


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int) -> torch.Tensor:
    """Shifted sparse attention, grouped form (O(seq * group_size) memory). Pure.

    ``q``, ``k``, ``v``: ``(batch, heads, seq, head_dim)`` with RoPE applied and
    key/value heads already repeated to ``heads``; ``seq % group_size == 0``.
    Returns ``(batch, heads, seq, head_dim)`` in the original token order:
    causal attention inside each group, the second half of the heads on groups
    shifted by ``group_size // 2``.
    """
    b, h, n, d = q.shape
    if n % group_size != 0:
        raise ConfigError(f"s2_attention: sequence length {n} is not a multiple of group_size {group_size}")
    ng = n // group_size

    def grouped(t: torch.Tensor) -> torch.Tensor:  # (b, h, n, d) -> (b * ng, h, g, d)
        return t.reshape(b, h, ng, group_size, d).transpose(1, 2).reshape(b * ng, h, group_size, d)

    qs, ks, vs = (grouped(s2_shift(t, group_size)) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    out = out.reshape(b, ng, h, group_size, d).transpose(1, 2).reshape(b, h, n, d)
    return s2_unshift(out, group_size)


def s2_allowed(seq_len: int, num_heads: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Which key each query may attend to under S2-Attn, in the original token order. Pure.

    Returns a bool tensor ``(num_heads, seq_len, seq_len)`` (``[h, query, key]``).
    Heads ``< num_heads // 2``: same group and key <= query.  Other heads: the
    same rule on positions shifted by ``-group_size // 2`` (mod ``seq_len``), which
    is exactly what rolling q/k/v, attending per group and rolling back computes.
    """
    pos = torch.arange(seq_len, device=device)
    shifted = (pos - group_size // 2) % seq_len

    def rule(p: torch.Tensor) -> torch.Tensor:
        same_group = (p[:, None] // group_size) == (p[None, :] // group_size)
        return same_group & (p[None, :] <= p[:, None])

    plain, rolled = rule(pos), rule(shifted)
    half = num_heads // 2
    return torch.stack([plain] * half + [rolled] * (num_heads - half))


def _s2_mask(
    module: nn.Module,
    given: torch.Tensor | None,
    q_len: int,
    batch: int,
    ratio: float,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    impl = getattr(module.config, "_attn_implementation", "eager") or "eager"
    if impl not in ("eager", "sdpa"):
        raise ConfigError(
            f"LongLoRA S2-Attn needs attn_implementation 'eager' or 'sdpa' in training, the model uses {impl!r}"
        )
    model_config: Any = module.config
    num_heads = int(model_config.num_attention_heads)
    g = _group_size(q_len, ratio)
    allowed = s2_allowed(q_len, num_heads, g, device).unsqueeze(0).expand(batch, -1, -1, -1)
    if given is not None:
        if given.shape[-1] != q_len or given.shape[-2] != q_len:
            raise ConfigError(
                f"LongLoRA S2-Attn: attention mask {tuple(given.shape)} has cached keys; S2 is training-only"
            )
        last_row = given[:, :, -1:, :]
        key_ok = last_row if given.dtype == torch.bool else last_row == 0
        allowed = allowed & key_ok
    allowed = allowed | torch.eye(q_len, dtype=torch.bool, device=device)
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def _s2_pre_slot(
    ratio: float, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if not module.training:
        return args, kwargs
    hidden = args[0] if args else kwargs["hidden_states"]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length(getattr(module, "layer_idx", 0)) > 0:
        raise ConfigError(
            "LongLoRA S2-Attn runs in training mode only, without cached keys; call model.eval() to decode"
        )
    kwargs = dict(kwargs)
    if len(args) >= 3:  # attention_mask given positionally (hidden, position_embeddings, mask)
        given = args[2]
    else:
        given = kwargs.get("attention_mask")
    mask = _s2_mask(module, given, hidden.shape[1], hidden.shape[0], ratio, hidden.dtype, hidden.device)
    if len(args) >= 3:
        args = (*args[:2], mask, *args[3:])
    else:
        kwargs["attention_mask"] = mask
    return args, kwargs


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [
        (n, m)
        for n, m in model.named_modules()
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config"))
    ]
    if not found:
        raise TargetError(f"LongLoRA model_type='llama': {type(model).__name__} has no Llama-style attention modules")
    return found


# ---------------------------------------------------------------------------
# embedder / normalizer copies
# ---------------------------------------------------------------------------
def _matches(name: str, spec: Any) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(part in name for part in spec)


def _extra_names(model: nn.Module, config: LongLoRAConfig) -> list[str]:
    spec = config.embedder_and_normalizer
    if not spec:
        return []
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or not _matches(name, spec):
            continue
        seen.add(id(p))
        out.append(name)
    if not out:
        sample = [n for n, _ in model.named_parameters()][:6]
        raise TargetError(f"embedder_and_normalizer={spec!r} matched no parameter; some names: {sample}")
    return out


def _split(model: nn.Module, params: TunerParams) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA tensors, embedder/normalizer tensors) of ``params``."""
    extra_set = set(_extra_names(model, params.config))
    extras = {k: v for k, v in params.items() if k in extra_set}
    return {k: v for k, v in params.items() if k not in extras}, extras


def _aliases(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(parameter) -> every (owner module, leaf name, full name) holding it (tied weights included)."""
    out: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for leaf, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, leaf, f"{mname}.{leaf}" if mname else leaf))
    return out


def _check_extras(model: nn.Module, extras: Mapping[str, torch.Tensor]) -> None:
    own = dict(model.named_parameters(remove_duplicate=False))
    for key, t in extras.items():
        if key not in own:
            raise ParamsMismatchError(f"params key {key!r} names no parameter of the model")
        if tuple(t.shape) != tuple(own[key].shape):
            raise ParamsMismatchError(
                f"params[{key!r}] has shape {tuple(t.shape)}, the model's has {tuple(own[key].shape)}"
            )


# ---------------------------------------------------------------------------
# the tuner functions
# ---------------------------------------------------------------------------
def init(
    model: nn.Module, config: LongLoRAConfig, generator: torch.Generator, adapter_name: str = "default"
) -> TunerParams:
    """LoRA params (as :func:`functuner.tuners.lora.init`) plus copies of the embedder/normalizer parameters. Pure."""
    if not isinstance(config, LongLoRAConfig):
        raise ConfigError(f"longlora.init needs a LongLoRAConfig, got {type(config).__name__}")
    extra = _extra_names(model, config)  # raises before any tensor is made
    if config.model_type is not None:
        _attention_modules(model)
    tensors = dict(lora.init(model, config.lora_view(), generator, adapter_name))
    own = dict(model.named_parameters(remove_duplicate=False))
    for name in extra:
        tensors[name] = own[name].detach().clone()
    return TunerParams(tensors, config, adapter_name)


def validate(model: nn.Module, params: TunerParams) -> None:
    """Raise :class:`ParamsMismatchError` if ``params`` does not fit ``model``. Pure."""
    lora_part, extras = _split(model, params)
    if lora_part:
        lora.validate(model, TunerParams(lora_part, params.config.lora_view(), params.adapter_name))
    _check_extras(model, extras)


def routes(model: nn.Module, params: TunerParams, ctx: CallContext) -> Routes:
    """LoRA's slots, parameter overrides for the embedder/normalizer copies, S2 pre slots (llama)."""
    cfg: LongLoRAConfig = params.config
    lora_part, extras = _split(model, params)
    fwd: dict[nn.Module, list[Any]] = {}
    if lora_part:
        r = lora.routes(model, TunerParams(lora_part, cfg.lora_view(), params.adapter_name), ctx)
        fwd = {m: list(fns) for m, fns in r.forward.items()}
    _check_extras(model, extras)
    aliases = _aliases(model)
    own = dict(model.named_parameters(remove_duplicate=False))
    per_module: dict[nn.Module, dict[str, torch.Tensor]] = {}
    for key, t in extras.items():
        for module, leaf, _ in aliases[id(own[key])]:
            per_module.setdefault(module, {})[leaf] = t
    for module, overrides in per_module.items():
        fwd.setdefault(module, []).insert(0, override_slot(overrides))
    pre: dict[nn.Module, list[Any]] = {}
    if cfg.model_type is not None:
        ratio = float(cfg.group_size_ratio)
        for _, attn in _attention_modules(model):
            pre[attn] = [lambda m, a, k, _r=ratio: _s2_pre_slot(_r, m, a, k)]
        ensure_slots(list(pre), pre=True)
    ensure_slots(list(fwd))
    return Routes(forward=fwd, pre=pre)


def _set_all(out: dict[str, torch.Tensor], state: Mapping[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    old = state[key]
    for k, t in state.items():
        if t is old:
            out[k] = value
    out[key] = value


def merge(
    model: nn.Module, params: TunerParams, base: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """LoRA folded in (fp32, rounded once) and the embedder/normalizer copies in place of the originals. Pure.

    This is the eval-mode model; S2-Attn is a training-time attention pattern
    and has no weights to merge.
    """
    cfg: LongLoRAConfig = params.config
    lora_part, extras = _split(model, params)
    if base is None:
        src: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
        src.update(dict(model.named_buffers(remove_duplicate=False)))
    else:
        src = dict(base)
    out = dict(src)
    if lora_part:
        out = lora.merge(model, TunerParams(lora_part, cfg.lora_view(), params.adapter_name), src)
    for key, t in extras.items():
        if key not in src:
            raise ParamsMismatchError(f"merge: base state has no {key!r}")
        _set_all(out, src, key, t.to(src[key].dtype))
    return out


def unmerge(model: nn.Module, params: TunerParams, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`merge` for the LoRA part; raises when embedder/normalizer copies were merged.

    The copies replaced the original tensors, which the adapter does not hold;
    keep the original weights (:func:`merge` never overwrites them).
    """
    cfg: LongLoRAConfig = params.config
    lora_part, extras = _split(model, params)
    if extras:
        raise ConfigError(
            f"unmerge: LongLoRA replaced {sorted(extras)[:3]}... with trained copies; the originals cannot be"
            " recovered from the adapter. Keep the original weights instead."
        )
    return lora.unmerge(model, TunerParams(lora_part, cfg.lora_view(), params.adapter_name), merged)


tuner = Tuner(
    swift_type="longlora",
    config_cls=LongLoRAConfig,
    init=init,
    routes=routes,
    validate=validate,
    merge=merge,
    unmerge=unmerge,
    needs_generator=lambda model, params: lora.needs_generator(
        model, TunerParams(_split(model, params)[0], params.config.lora_view(), params.adapter_name)
    ),
    to_swift_keys=peft_format.to_swift_keys,
    from_swift_keys=peft_format.from_swift_keys,
    key_naming=peft_format.KEY_NAMING,
    # no optimizer_groups: ms-swift 4.6's LongLoRA has no optimizer_group_callback, so its LoRA factors get the
    # plain decay / no-decay groups (no LoRA+ lr ratio; checked side by side in tests/swift_interop/scenarios.py);
    # no per-sample form (per_sample=None)
)
