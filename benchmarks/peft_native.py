"""One training step of each native PEFT-method tuner (IA3, LoHa, LoKr, VeRA, FourierFT, OFT, BOFT, AdaLoRA, prompt
tuning, P-tuning with its MLP and LSTM encoders, prefix tuning) vs PEFT.

Every row does the same work on the same Llama (built from a config), dtype, threads
and targets: forward, causal-LM loss, backward and one ``torch.optim.AdamW`` step on
the trainable adapter tensors.  Both sides hold identical tensors (PEFT's random init
copied into functuner's params), and before timing the losses and every gradient are
checked equal (PEFT's fp32 tolerance).

* ``functuner``: ``functuner.apply(model, params, ...)`` with leaf tensors, ``loss.backward()``;
* ``PEFT``: ``peft.get_peft_model`` on a copy, ``loss.backward()``;
* ``floor``: the frozen base model's forward + backward (gradient w.r.t. the input
  embeddings, so every layer's backward runs), no adapter, no optimiser.

Rows: ``functuner / PEFT`` and ``functuner / floor`` per tuner (lower is better; no target).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

import functuner as ft

from . import common as C

LR = 1e-4


def _configs(shape: C.Shape) -> dict[str, tuple[Any, Any]]:
    """``{tuner: (functuner config, peft config)}`` with the same fields (random init, so outputs change)."""
    import peft

    from functuner.tuners.adalora import AdaLoraConfig
    from functuner.tuners.boft import BOFTConfig
    from functuner.tuners.fourierft import FourierFTConfig
    from functuner.tuners.ia3 import IA3Config
    from functuner.tuners.loha import LoHaConfig
    from functuner.tuners.lokr import LoKrConfig
    from functuner.tuners.oft import OFTConfig
    from functuner.tuners.prompt_learning import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
    from functuner.tuners.vera import VeraConfig

    attn = ["q_proj", "v_proj"]
    r = shape.rank
    spec: dict[str, tuple[type, type, dict[str, Any]]] = {
        "IA3": (
            IA3Config,
            peft.IA3Config,
            {"target_modules": [*attn, "down_proj"], "feedforward_modules": ["down_proj"], "init_ia3_weights": False},
        ),
        "LoHa": (LoHaConfig, peft.LoHaConfig, {"target_modules": attn, "r": r, "alpha": r, "init_weights": False}),
        "LoKr": (LoKrConfig, peft.LoKrConfig, {"target_modules": attn, "r": r, "alpha": r, "init_weights": False}),
        "VeRA": (VeraConfig, peft.VeraConfig, {"target_modules": attn, "r": 16 * r, "init_weights": False}),
        "FourierFT": (FourierFTConfig, peft.FourierFTConfig, {"target_modules": attn, "n_frequency": 64 * r}),
        "OFT": (OFTConfig, peft.OFTConfig, {"target_modules": attn, "oft_block_size": 2 * r, "init_weights": False}),
        "BOFT": (BOFTConfig, peft.BOFTConfig, {"target_modules": attn, "boft_block_size": 4, "init_weights": False}),
        # the training step only (no task_type: PEFT adds no regulariser; the rank allocator runs between steps)
        "AdaLoRA": (
            AdaLoraConfig,
            peft.AdaLoraConfig,
            {"target_modules": attn, "init_r": r, "target_r": r // 2, "total_step": 100, "init_lora_weights": False},
        ),
    }
    prompt = {"num_virtual_tokens": 16, "task_type": "CAUSAL_LM"}  # the prompt family: 16 virtual tokens
    spec["prompt tuning"] = (PromptTuningConfig, peft.PromptTuningConfig, prompt)
    for enc in ("MLP", "LSTM"):
        kw = {**prompt, "encoder_reparameterization_type": enc, "encoder_hidden_size": 64 * r // 8}
        spec[f"P-tuning ({enc})"] = (PromptEncoderConfig, peft.PromptEncoderConfig, kw)
    spec["prefix tuning"] = (PrefixTuningConfig, peft.PrefixTuningConfig, prompt)
    return {name: (ours(**kw), theirs(**kw)) for name, (ours, theirs, kw) in spec.items()}


def _pair(model: torch.nn.Module, ours: Any, theirs: Any) -> tuple[ft.TunerParams, torch.nn.Module, list[str]]:
    """(params holding PEFT's tensors, the PeftModel, the trainable keys); frozen tensors (VeRA's) stay ours."""
    import peft

    p = ft.init(model, ours, generator=0)
    pm = peft.get_peft_model(copy.deepcopy(model), theirs)
    prefix = "base_model.model."
    named = {n.removeprefix(prefix): t for n, t in pm.named_parameters() if t.requires_grad}  # prompt_encoder.*: bare
    missing = sorted(set(named) - set(p))
    if missing:
        raise AssertionError(f"{type(ours).__name__}: PEFT trains {missing[:3]}, which functuner's params lack")
    p = p.replace({k: named[k].detach().clone() if k in named else p[k] for k in p})
    return p, pm, sorted(named)


def _ours(model: torch.nn.Module, p: ft.TunerParams, keys: list[str], ids: torch.Tensor) -> Callable[[], Any]:
    leaves = {k: p[k].detach().clone().requires_grad_(k in keys) for k in p}
    params = p.replace(leaves)
    opt = torch.optim.AdamW([leaves[k] for k in keys], lr=LR)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = ft.apply(model, params, (ids,), {"labels": ids}).loss
        loss.backward()
        grads = {k: leaves[k].grad.clone() for k in keys}  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), grads

    return step


def _theirs(pm: torch.nn.Module, keys: list[str], ids: torch.Tensor) -> Callable[[], Any]:
    named = {n.removeprefix("base_model.model."): t for n, t in pm.named_parameters() if t.requires_grad}
    opt = torch.optim.AdamW([named[k] for k in keys], lr=LR)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {k: named[k].grad.clone() for k in keys}  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), grads

    return step


def _adalora_training(model: torch.nn.Module, ids: torch.Tensor, rank: int) -> tuple[Callable[[], Any], ...]:
    """AdaLoRA's whole training step through the shim vs PEFT: loss with the orthogonal regulariser (``task_type``
    set), backward, AdamW, ``update_and_allocate(step)``, ``zero_grad``; after ``tinit`` the allocator masks every
    other step."""
    import peft

    from functuner.tuners.adalora import AdaLoraConfig

    kw = {"target_modules": ["q_proj", "v_proj"], "init_r": rank, "target_r": rank // 2, "tinit": 2, "tfinal": 4}
    kw.update(deltaT=2, total_step=30, task_type="CAUSAL_LM", init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(**kw)).train()
    sm = ft.Swift.prepare_model(copy.deepcopy(model), AdaLoraConfig(**kw)).train()
    named = {n.removeprefix("base_model.model."): t for n, t in pm.named_parameters() if t.requires_grad}
    with torch.no_grad():
        for k, t in sm.adapters["default"].tensors.items():
            t.copy_(named[k])

    def stepper(m: Any, allocate: Callable[[int], None]) -> Callable[[], torch.Tensor]:
        opt, count = torch.optim.AdamW([t for t in m.parameters() if t.requires_grad], lr=LR), [0]

        def step() -> torch.Tensor:
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            allocate(count[0])
            opt.zero_grad(set_to_none=True)
            count[0] += 1
            return loss.detach()

        return step

    return stepper(sm, sm.update_and_allocate), stepper(pm, pm.base_model.update_and_allocate)


def _floor(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    emb = model.get_input_embeddings()  # type: ignore[operator]

    def step() -> torch.Tensor:
        x = emb(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward()
        return loss.detach()

    return step


def run(s: C.Settings) -> C.Report:
    """The group's report: per tuner, a training step's time relative to PEFT's and to the frozen floor."""
    import warnings

    report = C.Report("Native PEFT-method tuners: one training step vs PEFT")
    model = C.build_llama(s.shape)
    ids, _ = C.batch(s.shape)
    floor = _floor(model, ids)
    for name, (ours_cfg, theirs_cfg) in _configs(s.shape).items():
        with warnings.catch_warnings():  # PEFT's BOFT tries to compile its CUDA kernel and warns where it cannot
            warnings.filterwarnings("ignore", message="Failed to load the CUDA extension")
            warnings.filterwarnings("ignore", message="Setting boft_n_butterfly_factor to 1")
            p, pm, keys = _pair(model, ours_cfg, theirs_cfg)
        ours, theirs = _ours(model, p, keys, ids), _theirs(pm, keys, ids)
        (l1, g1), (l2, g2) = ours(), theirs()  # first steps from identical tensors: equal loss and gradients
        C.assert_close(f"{name} loss", l1, l2)
        for k in keys:
            C.assert_close(f"{name} grad {k}", g1[k], g2[k], rtol=1e-4, atol=1e-5)
        report.check(f"{name} loss and all {len(keys)} gradients equal PEFT's")
        times = C.interleaved({"ours": ours, "peft": theirs, "floor": floor}, warmup=s.warmup, repeats=s.repeats)
        report.add(f"{name}: functuner / PEFT step time", C.ratio(times["ours"], times["peft"]))
        report.add(f"{name}: functuner / frozen-floor step time", C.ratio(times["ours"], times["floor"]))
        report.info(
            f"{name}: step times (functuner, PEFT, floor)",
            " / ".join(f"{times[k] * 1e3:.1f} ms" for k in ("ours", "peft", "floor")),
        )
    ours, theirs = _adalora_training(model, ids, s.shape.rank)
    C.assert_close("AdaLoRA full step loss", ours(), theirs())  # from identical tensors, regulariser included
    report.check("AdaLoRA full step (SwiftModel vs PeftModel): first losses equal, regulariser included")
    times = C.interleaved({"ours": ours, "peft": theirs, "floor": floor}, warmup=s.warmup, repeats=s.repeats)
    report.add(
        "AdaLoRA full step (+ regulariser, update_and_allocate): SwiftModel / PEFT",
        C.ratio(times["ours"], times["peft"]),
    )
    report.info(
        "AdaLoRA full step: step times (SwiftModel, PEFT, floor)",
        " / ".join(f"{times[k] * 1e3:.1f} ms" for k in ("ours", "peft", "floor")),
    )
    report.notes.append(
        "AdaLoRA full step: SwiftModel vs PeftModel with task_type CAUSAL_LM (regulariser in the loss), AdamW and"
        " update_and_allocate(step) every step (tinit 2, deltaT 2, tfinal 4, total_step 30; the full mode's 12 steps"
        " are the budget phase: importance EMAs every step, ranks masked every other step)"
    )
    report.notes.append(
        "targets q_proj, v_proj (IA3 also down_proj as feed-forward); r = shape rank (LoHa/LoKr), 16 x rank (VeRA),"
        " n_frequency 64 x rank (FourierFT), oft_block_size 2 x rank (OFT), boft_block_size 4 (BOFT), init_r = rank"
        " (AdaLoRA, the step without its allocator); prompt family: 16 virtual tokens, P-tuning encoder_hidden_size"
        " 8 x rank"
    )
    return report
