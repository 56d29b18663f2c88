"""PEFT's LoRA variants besides DoRA, as pure functions: KaSA, MiCA, VeLoRA and BD-LoRA.

Each is selected by a :class:`~.config.LoRAConfig` field with PEFT's name and
value (PEFT's sub-config object or its ``adapter_config.json`` dict), and
follows PEFT's implementation (``peft/tuners/lora/variants.py``, peft 0.21.2):

* **KaSA** (``kasa_config``, `arXiv:2412.06071 <https://arxiv.org/abs/2412.06071>`_):
  the frozen base weight loses its ``r`` smallest singular components
  (``W = U S V^T``, ``W_k = W - U_d S_d V_d^T``) and the update is
  ``s B diag(d) A`` with a trainable vector ``d`` (``<module>.lora_diag.<adapter>``).
  PEFT overwrites the base weight; functuner never does: the forward subtracts
  the dropped component from the base output, computed once per base weight
  by an SVD (cached while the weight is unchanged), and :func:`functuner.merge`
  returns ``W_k + s B diag(d) A``.  ``nn.Linear`` only, ``r < min(in, out)``.
* **MiCA** (``init_lora_weights="mica"``, `arXiv:2604.01694 <https://arxiv.org/abs/2604.01694>`_):
  ``B`` starts as the ``r`` left singular vectors of the smallest singular
  values of ``W``, ``A`` at zero, and ``B`` stays frozen: functuner's forward
  gives it a zero gradient (PEFT sets ``requires_grad=False``), so an optimizer
  leaves it as it is unless it applies weight decay to it.  ``nn.Linear``, GPT-2
  ``Conv1D`` and ``nn.Embedding``.
* **VeLoRA** (``velora_config``, `arXiv:2405.17991 <https://arxiv.org/abs/2405.17991>`_):
  the forward is LoRA's; in training the gradient of ``A`` uses the input
  compressed to one number per feature group, ``x_g . v`` for a unit
  projection ``v`` (``<module>.lora_velora_embed.<adapter>``), and rebuilt as
  ``scale * (x_g . v) v`` (saving activation memory).  ``init_type="random"``
  draws ``v`` at init (from the generator); ``"batch_average"`` takes ``v`` as
  the normalised mean sub-token of each training batch; ``"batch_average_once"``
  uses the stored ``v`` once it is non-zero and otherwise the batch's, as PEFT's
  first step does (functuner never writes params, so a zero stored ``v`` is
  recomputed from every batch until the caller stores one:
  :func:`velora_projection` of the layer input).
* **BD-LoRA** (``use_bdlora``, block-diagonal factors): on modules whose name
  contains one of ``target_modules_bd_a`` (``..._bd_b``) the ``A`` (``B``)
  factor is block-diagonal with ``nblocks`` blocks, stored as PEFT stores it,
  ``(r, in / nblocks)`` (``(out, r / nblocks)``); the forward and merge use the
  block-diagonal matrix.

* **MonteCLoRA** (``monteclora_config``): see :mod:`.monteclora`; in training
  ``A`` is perturbed by draws from the call's generator.

Combinations of two variants (or a variant with DoRA) are refused, as PEFT
refuses them.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ...errors import ConfigError
from . import monteclora as mc

__all__ = [
    "VARIANT_FIELDS",
    "VariantSite",
    "bd_dense",
    "check_site_variant",
    "effective_factors",
    "extra_shapes",
    "monteclora_a",
    "frozen",
    "init_variant",
    "kasa_dropped",
    "kasa_truncated",
    "merge_inputs",
    "mica_factors",
    "normalize_config",
    "site_variant",
    "velora_linear",
    "velora_projection",
]

VARIANT_FIELDS = ("kasa_config", "velora_config", "use_bdlora", "monteclora_config")
_DEFAULTS: dict[str, dict[str, Any]] = {  # PEFT's sub-config fields and defaults (peft 0.21.2)
    "kasa_config": {"beta": 1e-4, "gamma": 1e-3},
    "velora_config": {"num_groups": 64, "scale": 1.0, "init_type": "batch_average"},
    "use_bdlora": {"target_modules_bd_a": None, "target_modules_bd_b": None, "nblocks": 1, "match_strict": True},
}
_VELORA_INITS = ("batch_average", "batch_average_once", "random")


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------
def _subconfig(name: str, value: Any) -> dict[str, Any] | None:
    """PEFT's sub-config (object or dict) as a plain dict with every field; :class:`ConfigError` naming a bad one."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be None, PEFT's sub-config or its dict, got {value!r}")
    defaults = _DEFAULTS[name]
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ConfigError(f"{name} has no field(s) {unknown}; its fields are {sorted(defaults)}")
    out = {**defaults, **value}
    for k, v in out.items():
        if isinstance(v, (tuple, set, frozenset)):
            out[k] = sorted(v) if isinstance(v, (set, frozenset)) else list(v)
    if name == "kasa_config":
        for k in ("beta", "gamma"):
            if not isinstance(out[k], (int, float)) or isinstance(out[k], bool) or out[k] < 0:
                raise ConfigError(f"kasa_config.{k} must be a non-negative number, got {out[k]!r}")
    elif name == "velora_config":
        if isinstance(out["num_groups"], bool) or not isinstance(out["num_groups"], int) or out["num_groups"] <= 0:
            raise ConfigError(f"velora_config.num_groups must be a positive integer, got {out['num_groups']!r}")
        if not isinstance(out["scale"], (int, float)) or out["scale"] <= 0:
            raise ConfigError(f"velora_config.scale must be positive, got {out['scale']!r}")
        if out["init_type"] not in _VELORA_INITS:
            raise ConfigError(f"velora_config.init_type must be one of {_VELORA_INITS}, got {out['init_type']!r}")
    else:
        nb = out["nblocks"]
        if isinstance(nb, bool) or not isinstance(nb, int) or nb <= 0:
            raise ConfigError(f"use_bdlora.nblocks must be a positive integer, got {nb!r}")
        a, b = set(out["target_modules_bd_a"] or ()), set(out["target_modules_bd_b"] or ())
        if a & b:
            raise ConfigError(f"use_bdlora: {sorted(a & b)} are in both target_modules_bd_a and target_modules_bd_b")
    return out


def normalize_config(config: Any) -> None:
    """Check and normalise the variant fields of a LoRA config in place (at construction; the config is frozen).

    Sub-configs become plain dicts (as in PEFT's ``adapter_config.json``).  Refused
    with :class:`ConfigError` naming the field: MonteCLoRA; two variants at once
    (or one with ``use_dora``), as PEFT refuses; a variant with ``lora_bias`` or
    ``target_parameters``.
    """
    for name in ("kasa_config", "velora_config", "use_bdlora"):
        object.__setattr__(config, name, _subconfig(name, getattr(config, name)))
    value = config.monteclora_config
    if value is not None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"monteclora_config must be None, PEFT's MontecloraConfig or its dict, got {value!r}")
        object.__setattr__(config, "monteclora_config", mc.normalize(value))
    active = [n for n in VARIANT_FIELDS if getattr(config, n) is not None]
    if config.init_lora_weights == "mica":
        active.append('init_lora_weights="mica"')
    if config.use_dora:
        active.append("use_dora")
    if len(active) > 1:
        raise ConfigError(f"LoRA variants {active} cannot be combined (PEFT refuses the combination too); pick one")
    if active and active != ["use_dora"]:
        if config.lora_bias:
            raise ConfigError(f"lora_bias=True is not supported with {active[0]} by functuner; drop one")
        if config.target_parameters:
            raise ConfigError(f"target_parameters is not supported with {active[0]}; variants adapt nn.Linear layers")


# ---------------------------------------------------------------------------
# per site
# ---------------------------------------------------------------------------
class VariantSite(NamedTuple):
    """The variant of one adapted module and the params keys of its extra tensors."""

    name: str  # "kasa" | "mica" | "velora" | "bdlora"
    blocks_a: int = 1  # BD-LoRA: A is block-diagonal with this many blocks (1: dense)
    blocks_b: int = 1
    diag: str | None = None  # KaSA: key of lora_diag
    embed: str | None = None  # VeLoRA: key of the projection
    num_groups: int = 1  # VeLoRA
    scale: float = 1.0  # VeLoRA
    init_type: str = ""  # VeLoRA
    bd_a: bool = False  # BD-LoRA: A is PEFT's BlockDiagonalLinear (also with nblocks=1: its own init)
    bd_b: bool = False
    mc: tuple[str, ...] = ()  # MonteCLoRA: keys of the sampler tensors, in monteclora.LEAVES order
    num_samples: int = 0  # MonteCLoRA
    sample_scaler: float = 0.0  # MonteCLoRA

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k in (self.diag, self.embed) if k) + self.mc


_KINDS = {"kasa": ("linear",), "mica": ("linear", "conv1d_gpt2", "embedding"), "velora": ("linear", "conv1d_gpt2")}
_KINDS["bdlora"] = ("linear",)
_KINDS["monteclora"] = ("linear", "conv1d_gpt2")


def site_variant(config: Any, module_name: str, kind: str, adapter: str) -> VariantSite | None:
    """The variant ``config`` puts on module ``module_name`` (layer ``kind``), or ``None`` for plain LoRA / DoRA.

    :class:`ConfigError` naming the module where PEFT has no such variant for the layer
    (KaSA only on ``nn.Linear``...), and for BD-LoRA's ``match_strict`` misses.
    """
    vs: VariantSite | None = None
    if config.kasa_config is not None:
        vs = VariantSite("kasa", diag=f"{module_name}.lora_diag.{adapter}")
    elif config.init_lora_weights == "mica":
        vs = VariantSite("mica")
    elif config.velora_config is not None:
        v = config.velora_config
        vs = VariantSite(
            "velora",
            embed=f"{module_name}.lora_velora_embed.{adapter}",
            num_groups=int(v["num_groups"]),
            scale=float(v["scale"]),
            init_type=str(v["init_type"]),
        )
    elif config.monteclora_config is not None:
        vs = VariantSite(
            "monteclora",
            mc=tuple(f"{module_name}.lora_monteclora_sampler.{adapter}.{leaf}" for leaf in mc.LEAVES),
            num_samples=int(config.monteclora_config["num_samples"]),
            sample_scaler=float(config.monteclora_config["sample_scaler"]),
        )
    elif config.use_bdlora is not None:
        bd = config.use_bdlora
        in_a = any(p in module_name for p in bd["target_modules_bd_a"] or ())
        in_b = any(p in module_name for p in bd["target_modules_bd_b"] or ())
        if in_a and in_b:
            raise ConfigError(
                f"use_bdlora: module {module_name!r} matches both the A and the B block-diagonal patterns"
            )
        if bd["match_strict"] and not (in_a or in_b):
            raise ConfigError(
                f"use_bdlora: module {module_name!r} matches neither target_modules_bd_a nor target_modules_bd_b;"
                " add it to one, or set match_strict=False (as in PEFT)"
            )
        n = int(bd["nblocks"])
        vs = VariantSite("bdlora", blocks_a=n if in_a else 1, blocks_b=n if in_b else 1, bd_a=in_a, bd_b=in_b)
    if vs is not None and kind not in _KINDS[vs.name]:
        raise ConfigError(
            f"LoRA variant {vs.name} on {module_name!r}: PEFT has it for {', '.join(_KINDS[vs.name])} layers only,"
            f" not for a {kind} layer; exclude the module (exclude_modules) or drop the variant"
        )
    return vs


def check_site_variant(vs: VariantSite, module_name: str, weight_shape: tuple[int, ...], r: int, kind: str) -> None:
    """Refuse sizes the variant cannot take on this layer (as PEFT does), naming the module."""
    out_f, in_f = (weight_shape[1], weight_shape[0]) if kind in ("conv1d_gpt2", "embedding") else weight_shape[:2]
    if vs.name == "kasa" and r >= min(in_f, out_f):
        raise ConfigError(
            f"KaSA on {module_name!r}: r={r} must be smaller than min(in, out)={min(in_f, out_f)} so that at least one"
            " singular component of the base weight is kept (PEFT refuses it too)"
        )
    if vs.name == "mica" and r > min(in_f, out_f):
        raise ConfigError(f"MiCA on {module_name!r}: r={r} must be <= min(in, out)={min(in_f, out_f)} (as in PEFT)")
    if vs.name == "bdlora":
        n = max(vs.blocks_a, vs.blocks_b)
        need = (in_f, r) if vs.blocks_a > 1 else (r, out_f)
        if n > 1 and any(d % n for d in need):
            raise ConfigError(
                f"BD-LoRA on {module_name!r}: nblocks={n} must divide the block-diagonal factor's sizes {need}"
            )


def extra_shapes(vs: VariantSite, r: int, in_features: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(params key, shape)`` of the variant's own tensors on a layer of rank ``r`` reading ``in_features``."""
    out: list[tuple[str, tuple[int, ...]]] = []
    if vs.diag:
        out.append((vs.diag, (r,)))
    if vs.embed:
        out.append((vs.embed, (-(-in_features // vs.num_groups),)))
    sampler = mc.shapes(r, vs.num_samples)
    out += [(key, sampler[leaf]) for key, leaf in zip(vs.mc, mc.LEAVES, strict=False)]
    return tuple(out)


def factor_shapes(
    vs: VariantSite | None, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Stored shapes of ``(A, B)`` under the variant (BD-LoRA stores only the diagonal blocks, as PEFT)."""
    if vs is None or vs.name != "bdlora":
        return a_shape, b_shape
    return (a_shape[0], a_shape[1] // vs.blocks_a), (b_shape[0], b_shape[1] // vs.blocks_b)


# ---------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------
def bd_dense(w: torch.Tensor, nblocks: int) -> torch.Tensor:
    """PEFT's ``BlockDiagonalLinear`` weight ``(out, in / n)`` as the ``(out, in)`` block-diagonal matrix."""
    if nblocks == 1:
        return w
    return cast(torch.Tensor, torch.block_diag(*torch.chunk(w, nblocks, dim=0)))  # type: ignore[no-untyped-call]


class _Frozen(torch.autograd.Function):
    """Identity whose gradient is zero (MiCA's frozen ``B``)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return t.clone()  # a rank-sized copy: a view would clash with the optimizer's in-place step

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)


def frozen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the graph with a zero gradient (PEFT's ``requires_grad=False`` factor, kept in one params pytree)."""
    return cast(torch.Tensor, _Frozen.apply(t)) if t.requires_grad else t  # type: ignore[no-untyped-call]


def effective_factors(
    vs: VariantSite | None, A: torch.Tensor, B: torch.Tensor, params: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense ``(A, B)`` the variant's delta ``s B A`` uses: BD blocks expanded, KaSA's ``diag(d)`` folded into B."""
    if vs is None:
        return A, B
    if vs.name == "bdlora":
        return bd_dense(A, vs.blocks_a), bd_dense(B, vs.blocks_b)
    if vs.name == "kasa":
        assert vs.diag is not None
        return A, B * params[vs.diag].to(B.dtype)
    if vs.name == "mica":
        return A, frozen(B)
    return A, B


def mica_factors(weight_out_in: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MiCA's ``(A, B)``: ``B`` the last ``r`` left singular vectors of ``W`` (smallest singular values), ``A`` zero."""
    w = weight_out_in.detach().float()
    U, _, _ = torch.linalg.svd(w, full_matrices=False)
    return torch.zeros(r, w.shape[1]), U[:, -r:].contiguous()


_SVD_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> (version, r, factors), by identity
_SVD_LOCK = threading.Lock()


def kasa_dropped(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KaSA's dropped component of a base weight ``(out, in)`` as fp32 factors ``(U_d S_d (out, r), V_d^T (r, in))``.

    The ``r`` smallest singular components of ``W``; ``W - U_d S_d V_d^T`` is
    PEFT's truncated base weight.  Computed by one SVD per weight and cached
    (weakly, while the tensor's version is unchanged), so a training loop pays
    it once.
    """
    with _SVD_LOCK:
        hit = _SVD_CACHE.get(weight)  # type: ignore[no-untyped-call]
    if hit is not None and hit[0] == weight._version and hit[1] == r:
        return cast(tuple[torch.Tensor, torch.Tensor], hit[2])
    w = weight.detach().float()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    k = S.shape[0] - r
    factors = ((U[:, k:] * S[k:]).contiguous(), Vh[k:, :].contiguous())
    with _SVD_LOCK:
        _SVD_CACHE[weight] = (weight._version, r, factors)
    return factors


def kasa_truncated(weight: torch.Tensor, r: int) -> torch.Tensor:
    """PEFT's KaSA base weight: ``W`` without its ``r`` smallest singular components, as PEFT forms it (fp32)."""
    w = weight.detach().float()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    k = S.shape[0] - r
    return cast(torch.Tensor, (U[:, :k] * S[:k]) @ Vh[:k, :])


def _grouped(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``x (..., in)`` as sub-tokens ``(tokens, num_groups, ceil(in / num_groups))``, zero-padded."""
    group_dim = -(-x.shape[-1] // num_groups)
    pad = num_groups * group_dim - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(-1, num_groups, group_dim)


def velora_projection(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """VeLoRA's batch projection: the normalised mean sub-token of ``x`` (fp32; all ones normalised if it is zero)."""
    with torch.no_grad():
        v = _grouped(x.detach(), num_groups).reshape(-1, -(-x.shape[-1] // num_groups)).mean(0).float()
        norm = torch.linalg.vector_norm(v)
        if norm == 0:
            v = torch.ones_like(v)
            norm = torch.linalg.vector_norm(v)
        return cast(torch.Tensor, v / norm)


class _VeloraLinear(torch.autograd.Function):
    """``x A^T`` whose gradient for ``A`` uses ``x`` rebuilt from its rank-one-per-group compression."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, A: torch.Tensor, v: torch.Tensor, num_groups: int, scale: float) -> Any:
        ctx.x_shape, ctx.x_dtype, ctx.num_groups, ctx.scale = tuple(x.shape), x.dtype, num_groups, scale
        compressed = torch.einsum("tgd,d->tg", _grouped(x.detach(), num_groups), v.to(x.dtype))
        ctx.save_for_backward(compressed, A, v)
        return F.linear(x, A)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        compressed, A, v = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ A.to(g.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = (compressed.to(g.dtype).unsqueeze(-1) * v.to(g.dtype).view(1, 1, -1)).reshape(
                compressed.shape[0], -1
            )[:, : ctx.x_shape[-1]] * ctx.scale
            grad_a = (g.T @ rebuilt).to(A.dtype)
        return grad_x, grad_a, None, None, None


def velora_linear(
    x: torch.Tensor, A: torch.Tensor, vs: VariantSite, stored: torch.Tensor, training: bool
) -> torch.Tensor:
    """``x A^T`` with VeLoRA's compressed-activation gradient for ``A`` while training (plain ``F.linear`` otherwise)."""
    if not (training and torch.is_grad_enabled() and A.requires_grad):
        return F.linear(x, A)
    if vs.init_type == "batch_average" or (vs.init_type == "batch_average_once" and not bool(stored.any())):
        v = velora_projection(x, vs.num_groups).to(stored.dtype)
    else:
        v = stored.detach()
    return cast(torch.Tensor, _VeloraLinear.apply(x, A, v, vs.num_groups, vs.scale))  # type: ignore[no-untyped-call]


def velora_init_projection(group_dim: int, init_type: str, generator: torch.Generator) -> torch.Tensor:
    """VeLoRA's projection at init: a normalised normal draw (``"random"``) or zero (filled from batches)."""
    if init_type != "random":
        return torch.zeros(group_dim)
    v = torch.randn(group_dim, generator=generator)
    return cast(torch.Tensor, v / torch.linalg.vector_norm(v))


def init_variant(
    vs: VariantSite,
    module_name: str,
    kind: str,
    weight: torch.Tensor,
    r: int,
    generator: torch.Generator,
    tensors: dict[str, torch.Tensor],
    a_key: str,
    b_key: str,
) -> None:
    """Adjust LoRA's fresh ``A`` / ``B`` in ``tensors`` for the variant and add its own tensors, as PEFT initialises.

    KaSA: ``lora_diag`` normal (``B`` is zero unless ``init_lora_weights=False``).  MiCA: :func:`mica_factors`.
    VeLoRA: the projection (:func:`velora_init_projection`).  BD-LoRA: a block-diagonal ``A`` is drawn
    ``kaiming_uniform_`` over its blocks, a block-diagonal ``B`` is zero (PEFT's ``BlockDiagonalLinear``).
    Random draws use ``generator`` only.
    """
    A, B = tensors[a_key], tensors[b_key]
    dev, dtype = A.device, A.dtype
    check_site_variant(vs, module_name, tuple(weight.shape), r, kind)
    if vs.name == "kasa":
        assert vs.diag is not None
        tensors[vs.diag] = torch.randn(r, generator=generator).to(device=dev, dtype=dtype)
    elif vs.name == "mica":
        w_oi = weight.T if kind in ("conv1d_gpt2", "embedding") else weight
        a, b = mica_factors(w_oi, r)
        tensors[a_key], tensors[b_key] = a.to(device=dev, dtype=dtype), b.to(device=dev, dtype=dtype)
    elif vs.name == "velora":
        assert vs.embed is not None
        group_dim = -(-int(A.shape[1]) // vs.num_groups)
        tensors[vs.embed] = velora_init_projection(group_dim, vs.init_type, generator).to(device=dev, dtype=dtype)
    elif vs.name == "bdlora":
        a_shape, b_shape = factor_shapes(vs, tuple(A.shape), tuple(B.shape))
        if vs.bd_a:
            a = torch.empty(a_shape)
            torch.nn.init.kaiming_uniform_(a, generator=generator)
            tensors[a_key] = a.to(device=dev, dtype=dtype)
        if vs.bd_b:
            tensors[b_key] = torch.zeros(b_shape, device=dev, dtype=dtype)
    elif vs.name == "monteclora":
        fresh = mc.init_tensors(r, vs.num_samples, generator)
        for key, leaf in zip(vs.mc, mc.LEAVES, strict=True):
            tensors[key] = fresh[leaf].to(device=dev, dtype=dtype)


def merge_inputs(
    vs: VariantSite | None,
    W: torch.Tensor,
    W0: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    params: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, A, B)`` such that LoRA's merge ``W + s B A`` is the variant's merged weight.

    KaSA: ``W`` loses the dropped singular components of the unmerged weight
    ``W0`` (PEFT's truncated base) and ``B`` carries ``diag(d)``; BD-LoRA: dense factors.
    """
    if vs is None:
        return W, A, B
    A, B = effective_factors(vs, A.detach(), B.detach(), params)
    if vs.name == "kasa":
        us, vh = kasa_dropped(W0, int(A.shape[0]))
        W = W.float() - us.to(W.device) @ vh.to(W.device)  # fp32, as the caller's merge computes
    return W, A, B


def monteclora_a(
    vs: VariantSite, A: torch.Tensor, sampler: tuple[torch.Tensor, ...], generator: torch.Generator | None
) -> torch.Tensor:
    """MonteCLoRA's ``A`` for one training step (:mod:`.monteclora`), the draws taken from ``generator``."""
    z = mc.draw(int(A.shape[0]), int(A.shape[1]), vs.num_samples, generator)
    noise, weights = mc.sample(sampler[0], sampler[1], *z, vs.sample_scaler)
    if bool(torch.isnan(weights).any()):
        warnings.warn("MonteCLoRA sampling produced NaNs, using the unperturbed A (as PEFT)", stacklevel=2)
        return A
    return mc.perturbed_a(A, noise, weights)
