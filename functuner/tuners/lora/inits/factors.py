"""Which factors ``init_lora_weights`` gives one adapted layer: the dispatch ``lora.init`` calls per layer.

:func:`init_factors` returns ``(A, B)`` (float32, LoRA's shapes for the layer) for
the data-driven inits, or ``None`` for PEFT's default draws (``True``, ``False``,
``"gaussian"``, and ``"eva"`` without data, which PEFT also initialises that way
until ``initialize_lora_eva_weights`` runs).  :func:`moves_base` tells whether
an init's adapter runs on a residual base weight ``W - s B A`` (PiSSA, OLoRA,
CorDA): :func:`residual_weight` computes it in the layer's own layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ....core.params import TunerParams
from ....errors import ConfigError
from ..config import pissa_niter
from ..layout import layout_of
from ..math import weight_as_out_in
from . import data as data_inits
from . import svd
from .loftq import loftq

__all__ = ["init_factors", "moves_base", "residual_weight", "residual_weights"]

_LINEAR_KINDS = ("linear", "conv1d_gpt2")


def moves_base(config: Any) -> bool:
    """Whether ``config``'s init changes the base weights (PiSSA, PiSSA by fast SVD, OLoRA, CorDA, LoftQ)."""
    init = config.init_lora_weights
    return init in ("pissa", "olora", "corda", "loftq") or pissa_niter(init) is not None


def init_factors(
    config: Any,
    name: str,
    kind: str,
    weight: torch.Tensor,
    r: int,
    generator: torch.Generator,
    data: Mapping[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, B)`` in float32 for the layer ``name`` (base ``weight`` in its own layout), or ``None`` (default draws).

    ``data[name]``: CorDA's input covariance ``(in, in)``; EVA's ``A`` rows
    (``(r, in)``, from :func:`functuner.lora_init`).  Raises :class:`ConfigError`
    for a layer kind PEFT has no such init for, or CorDA without its covariance.
    """
    init = config.init_lora_weights
    if isinstance(init, bool) or init in ("gaussian", "mica"):  # MiCA: a LoRA variant initialises it (.variants)
        return None
    if init == "eva" and (data is None or name not in data):
        return None  # as PEFT before initialize_lora_eva_weights: kaiming A, zero B
    if init == "loftq":
        if kind != "linear":  # PEFT's LoftQ assigns R, L of the stored (in, out) weight: wrong shapes on Conv1D
            raise ConfigError(
                f"LoRA on {name!r} ({kind}): init_lora_weights='loftq' works on nn.Linear layers (as in PEFT);"
                " exclude this module (exclude_modules) or use init_lora_weights=True"
            )
        opts = config.loftq_config
        A, B, _ = loftq(weight.detach(), r, opts["loftq_bits"], opts["loftq_iter"], name)
        return A, B
    if kind not in _LINEAR_KINDS:
        raise ConfigError(
            f"LoRA on {name!r} ({kind}): init_lora_weights={init!r} works on Linear and transformers Conv1D layers"
            " (as in PEFT); exclude this module (exclude_modules) or use init_lora_weights=True"
        )
    w = weight_as_out_in(weight.detach(), kind).float()
    out_f, in_f = int(w.shape[0]), int(w.shape[1])
    s = config.scaling_for(name)
    if init == "pissa":
        return svd.pissa(w, r, s)
    niter = pissa_niter(init)
    if niter is not None:
        return svd.pissa_fast(w, r, s, niter, generator)
    if init == "olora":
        return svd.olora(w, r)
    if init == "orthogonal":
        A, B = svd.orthogonal(in_f, out_f, r, generator)
        return A, B
    if init == "eva":
        assert data is not None
        A = data[name].detach().float()
        if tuple(A.shape) != (r, in_f):
            raise ConfigError(f"EVA on {name!r}: A rows have shape {tuple(A.shape)}, the layer needs ({r}, {in_f})")
        return A.to(w.device), torch.zeros(out_f, r, device=w.device)
    if init == "corda":
        if data is None or name not in data:
            raise ConfigError(
                f"init_lora_weights='corda' needs the input covariance of {name!r}: use"
                " functuner.preprocess_corda(model, config, run_model=...) (PEFT's preprocess_corda, returns the"
                " SwiftModel) or functuner.lora_init(model, config, generator=..., data={module name: covariance})"
                " (see functuner.tuners.lora.inits.data.corda_covariance)"
            )
        method = data_inits.options(config.corda_config, data_inits.CORDA_DEFAULTS, "corda_config")["corda_method"]
        return data_inits.corda(w, data[name], r, s, method, name)
    raise ConfigError(f"init_lora_weights={init!r} is not supported")


def residual_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, kind: str, config: Any = None
) -> torch.Tensor:
    """``W - s B A`` in ``weight``'s layout and dtype (computed in float32, rounded once).

    For LoftQ (``config.init_lora_weights == "loftq"``) the new base is the dequantized weight ``Q`` of
    :func:`.loftq.loftq` instead (recomputed from ``weight``: quantization is deterministic).
    """
    if config is not None and config.init_lora_weights == "loftq":
        opts = config.loftq_config
        _, _, Q = loftq(weight.detach(), int(A.shape[0]), opts["loftq_bits"], opts["loftq_iter"], "")
        return Q.to(device=weight.device, dtype=weight.dtype).contiguous()
    res = svd.residual(weight_as_out_in(weight.detach(), kind), A, B, scaling)
    return weight_as_out_in(res, kind).to(device=weight.device, dtype=weight.dtype).contiguous()


def residual_weights(model: nn.Module, params: TunerParams) -> dict[str, torch.Tensor]:
    """``{state key: W - s B A}`` for each weight ``params`` adapts when its init moves the base (else ``{}``). Pure.

    ``params`` must be the *initial* params (the residual is defined by ``B0 A0``).
    """
    if not moves_base(params.config):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for s in layout_of(model, params).sites:
        mname = names[id(s.module)]
        key = f"{mname}.{s.weight_name}" if mname else s.weight_name
        weight = s.module.get_parameter(s.weight_name)
        out[key] = residual_weight(weight, params[s.a], params[s.b], s.scaling, s.kind, params.config)
    return out
