"""GaLore, Q-GaLore and LISA vs full fine-tuning with AdamW and vs LoRA: memory and step time, side by side.

Every row trains the same Llama on the same batch (forward, causal-LM loss, backward, optimizer step):

* ``full``: every parameter trainable, ``torch.optim.AdamW``;
* ``galore``: :func:`functuner.optim.create_galore_optimizer` (rank ``r`` on the seven linear kinds of
  every layer, AdamW on the rest), projector refreshed every 200 steps (the SVD is in the warm-up);
* ``galore (SVD every step)``: the same with ``update_proj_gap=1``, to show the refresh cost;
* ``galore per-parameter``: ``optim_per_parameter=True`` (each parameter stepped during backward);
* ``q-galore``: ``GaLoreConfig(quantize=True, proj_quant=True)``: the targets' weights in int8
  (:func:`functuner.optim.quantize_model`, group 256, stochastic rounding), projectors in int4 (group 256),
  lazy projector refresh;
* ``lisa``: :class:`functuner.optim.LISACallback` with one active decoder layer, ``torch.optim.AdamW``;
* ``lora`` / ``lora (peft)``: rank-``r`` LoRA on the same seven linear kinds, functuner's shim
  (``Swift.prepare_model``) and real PEFT, ``torch.optim.AdamW`` on the adapter tensors.

Weight bytes: Q-GaLore's int8 targets (codes + one float32 scale and minimum per group) over the same
weights in float32 (expected ``(1 + 8 / 256) / 4 = 0.258``).

State bytes are counted from the optimizer's state after one step (every tensor, projections included).
GaLore's ratio is compared with its closed form: per ``m x n`` target, ``2 * (moments of the projected
gradient) + projector`` over AdamW's ``2 m n``, which is about ``r / min(m, n)`` (times 1.5 for a square
weight, whose projector is as large as a moment).  Times are medians, printed as ratios to ``full``;
nothing asserts a time.

Correctness checks run first: the functional transform and the eager optimizer give the same weights;
with ``galore_torch`` installed, so does the authors' optimizer; LISA moves only the active layers.

Usage::

    python -m benchmarks --only galore_lisa [--quick]
    python benchmarks/galore_lisa.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from benchmarks import common as C
from functuner.optim import (
    GaLoreAdamW,
    GaLoreConfig,
    LISACallback,
    LISAConfig,
    QGaLoreLinear,
    apply_updates,
    create_galore_optimizer,
    galore_adamw,
    galore_targets,
    quantize_model,
)
from functuner.optim.galore import low_rank_shape, projection_side

LR = 1e-3


def _trainable_copy(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model).train()
    m.requires_grad_(True)
    return m


def _size(x: Any) -> int:
    """Bytes of the tensors in ``x`` (nested dicts / lists), scalars (step counters) excluded."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size() if x.dim() > 0 else 0
    if isinstance(x, dict):
        return sum(_size(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_size(v) for v in x)
    return 0


def _state_bytes(opt: Any, only: set[int] | None = None) -> int:
    """Bytes of an optimizer's state (a per-parameter optimizer's inner ones), optionally for some params (ids)."""
    inner = getattr(opt, "optimizers", None)
    opts = list(inner.values()) if isinstance(inner, dict) else [opt]
    return sum(_size(st) for o in opts for p, st in o.state.items() if only is None or id(p) in only)


def _stepper(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return step


def _galore_config(shape: C.Shape, gap: int, per_parameter: bool = False) -> GaLoreConfig:
    return GaLoreConfig(
        rank=shape.rank,
        update_proj_gap=gap,
        galore_scale=0.25,
        target_modules=list(C.LLAMA_TARGETS),
        optim_per_parameter=per_parameter,
    )


def _check_parity(report: C.Report, model: torch.nn.Module, ids: torch.Tensor, cfg: GaLoreConfig) -> None:
    """Two steps (the second refreshes nothing, the third would): functional == eager (== galore_torch)."""
    eager = _trainable_copy(model)
    targets = set(galore_targets(eager, cfg))
    params = {n: p.detach().clone() for n, p in eager.named_parameters()}
    groups = [
        {"params": [p for n, p in eager.named_parameters() if n not in targets]},
        {
            "params": [p for n, p in eager.named_parameters() if n in targets],
            "rank": cfg.rank,
            "update_proj_gap": cfg.update_proj_gap,
            "scale": cfg.galore_scale,
            "proj_type": cfg.proj_type,
        },
    ]
    ref_model = copy.deepcopy(eager)
    opt = GaLoreAdamW(groups, lr=LR)
    tx = galore_adamw(LR, config=cfg, targets=targets)
    state = tx.init(params)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        eager(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad.clone() for n, p in eager.named_parameters() if p.grad is not None}
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = apply_updates(params, updates)
    for n, p in eager.named_parameters():
        C.assert_close(f"galore functional vs eager ({n})", params[n], p, rtol=1e-5, atol=1e-6)
    report.check("GaLore functional transform == eager GaLoreAdamW (2 steps, every weight)")

    if importlib.util.find_spec("galore_torch") is None:
        report.notes.append(
            "galore_torch is not installed: the parity check against the authors' optimizer was skipped"
        )
        return
    import galore_torch

    ref_targets = [p for n, p in ref_model.named_parameters() if n in targets]
    ref_groups = [
        {"params": [p for n, p in ref_model.named_parameters() if n not in targets]},
        {**groups[1], "params": ref_targets},
    ]
    ref = galore_torch.GaLoreAdamW(ref_groups, lr=LR, no_deprecation_warning=True)
    for _ in range(2):
        ref.zero_grad(set_to_none=True)
        ref_model(input_ids=ids, labels=ids).loss.backward()
        ref.step()
    ours = dict(eager.named_parameters())
    for n, p in ref_model.named_parameters():
        C.assert_close(f"galore vs galore_torch ({n})", ours[n], p, rtol=1e-5, atol=1e-6)
    report.check("GaLoreAdamW == galore_torch.GaLoreAdamW (2 steps, every weight)")


def _expected_galore_ratio(model: torch.nn.Module, cfg: GaLoreConfig) -> tuple[float, float]:
    """(closed-form state ratio over the targets, mean r / min(m, n))."""
    shapes = dict(model.named_parameters())
    ours = adam = 0
    r_over: list[float] = []
    for n in galore_targets(model, cfg):
        m, k = shapes[n].shape
        side = projection_side((m, k), cfg.proj_type)
        lm, ln = low_rank_shape((m, k), cfg.rank, side)
        r = min(cfg.rank, m, k)
        proj = {"right": r * k, "left": m * r, "full": m * r + r * k}[side]
        ours += 2 * lm * ln + proj
        adam += 2 * m * k
        r_over.append(min(cfg.rank, m, k) / min(m, k))
    return ours / adam, sum(r_over) / len(r_over)


def _lora_rows(
    base: torch.nn.Module, shape: C.Shape
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.nn.Module, torch.optim.Optimizer]:
    """functuner's shim LoRA and real PEFT LoRA with the same adapter tensors, each with AdamW on them."""
    import functuner as ft

    model = copy.deepcopy(base).train()
    params = ft.init(model, C.lora_config(shape), generator=0)
    peft_model = C.peft_lora(model, params).train()
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    sm = ft.Swift.prepare_model(model, params.config)
    named = dict(sm.base_model.named_parameters())
    with torch.no_grad():
        for k, v in params.items():
            named[k].copy_(v)
    sm.train()
    opt = torch.optim.AdamW([p for p in sm.parameters() if p.requires_grad], lr=LR)
    return sm, opt, peft_model, peft_opt


def run(s: C.Settings) -> C.Report:
    shape = dataclasses.replace(s.shape, layers=max(2, s.shape.layers))  # LISA needs layers to choose from
    warmup, repeats = s.warmup, s.repeats
    if not s.quick:
        # 12 rows of full-weight training: the suite's shape at batch 2 (the state and weight ratios do not
        # depend on the batch) and 5 timed repeats, so the group fits in 8 minutes on 2 shared cores
        shape = dataclasses.replace(shape, batch=2)
        warmup, repeats = 1, 5
    report = C.Report(
        f"GaLore / Q-GaLore / LISA vs full fine-tuning and LoRA (hidden {shape.hidden}, {shape.layers} layers,"
        f" r={shape.rank}, batch {shape.batch})"
    )
    base = C.build_llama(shape)
    ids, _ = C.batch(shape)
    cfg = _galore_config(shape, gap=200)
    _check_parity(report, base, ids, _galore_config(shape, gap=2))

    # the rows
    qcfg = dataclasses.replace(cfg, quantize=True, proj_quant=True)
    qgalore = _trainable_copy(base)
    quantize_model(qgalore, qcfg)
    qgalore_opt = create_galore_optimizer(qgalore, qcfg, lr=LR, generator=0)
    lora, lora_opt, peft_model, peft_opt = _lora_rows(base, shape)
    full = _trainable_copy(base)
    full_opt = torch.optim.AdamW(full.parameters(), lr=LR)
    galore = _trainable_copy(base)
    galore_opt = create_galore_optimizer(galore, cfg, lr=LR)
    svd = _trainable_copy(base)
    svd_opt = create_galore_optimizer(svd, _galore_config(shape, gap=1), lr=LR)
    per = _trainable_copy(base)
    per_opt = create_galore_optimizer(per, _galore_config(shape, gap=200, per_parameter=True), lr=LR)
    lisa = _trainable_copy(base)
    cb = LISACallback(lisa, LISAConfig(n_layers=1, step_interval=10**9, seed=0))
    lisa_opt = torch.optim.AdamW([p for p in lisa.parameters() if p.requires_grad], lr=LR)
    steps = {
        "full": _stepper(full, full_opt, ids),
        "galore": _stepper(galore, galore_opt, ids),
        "galore_svd": _stepper(svd, svd_opt, ids),
        "galore_per": _stepper(per, per_opt, ids),
        "lisa": _stepper(lisa, lisa_opt, ids),
        "qgalore": _stepper(qgalore, qgalore_opt, ids),
        "lora": _stepper(lora, lora_opt, ids),
        "lora_peft": _stepper(peft_model, peft_opt, ids),
    }
    for step in steps.values():
        step()

    # LISA moved exactly the active layer and the non-layer parameters
    before = dict(base.named_parameters())
    layer_prefix = "model.layers."
    for n, p in lisa.named_parameters():
        moved = not torch.equal(p, before[n])
        inside = n.startswith(layer_prefix)
        want = (not inside) or int(n[len(layer_prefix) :].split(".")[0]) in cb.active
        if moved != want:
            raise AssertionError(f"LISA: {n} moved={moved}, expected {want} (active layers {cb.active})")
    report.check(f"LISA moved only layers {list(cb.active)} plus embeddings, final norm and head")
    int8 = [m for m in qgalore.modules() if isinstance(m, QGaLoreLinear)]
    if not int8 or any(m.weight.dtype != torch.int8 for m in int8):
        raise AssertionError("Q-GaLore: the target weights are not int8 after a step")
    report.check(f"Q-GaLore's {len(int8)} target weights are still int8 after a step")

    # state bytes
    targets = set(galore_targets(galore, cfg))
    adam_all = _state_bytes(full_opt)
    adam_targets = _state_bytes(full_opt, {id(q) for n, q in full.named_parameters() if n in targets})
    galore_targets_bytes = _state_bytes(galore_opt, {id(q) for n, q in galore.named_parameters() if n in targets})
    expected, r_over_min = _expected_galore_ratio(galore, cfg)
    measured = galore_targets_bytes / adam_targets
    report.add("GaLore optimizer state / AdamW state, target weights", measured, target=expected * 1.0001)
    report.add("closed form of that ratio (the target above)", expected)
    report.add("mean r / min(m, n) over the target weights", r_over_min)
    report.add("GaLore optimizer state / AdamW state, whole model", _state_bytes(galore_opt) / adam_all)
    report.add("GaLore per-parameter state / AdamW state, whole model", _state_bytes(per_opt) / adam_all)
    report.add("LISA optimizer state / AdamW state (1 active layer)", _state_bytes(lisa_opt) / adam_all)
    q_targets = {id(m.weight) for m in int8}
    q_state = _state_bytes(qgalore_opt, q_targets)
    report.add("Q-GaLore optimizer state / AdamW state, target weights (int4 projectors)", q_state / adam_targets)
    report.add("Q-GaLore optimizer state / AdamW state, whole model", _state_bytes(qgalore_opt) / adam_all)
    q_weight = sum(m.quantized().nbytes for m in int8)
    f32_weight = sum(m.weight.numel() * 4 for m in int8)
    report.add("Q-GaLore weight bytes / float32, target weights (int8 + group scales)", q_weight / f32_weight)
    all_f32 = sum(p.numel() * p.element_size() for p in full.parameters())
    q_all = sum(p.numel() * p.element_size() for p in qgalore.parameters()) + sum(
        t.numel() * t.element_size() for m in int8 for t in (m.weight_scales, m.weight_mins)
    )
    report.add("Q-GaLore weight bytes / float32, whole model", q_all / all_f32)
    lora_state = _state_bytes(lora_opt)
    report.add("LoRA optimizer state / AdamW state, whole model", lora_state / adam_all)
    n_train = sum(p.numel() for p in lisa.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in lisa.parameters())
    report.add("LISA trainable parameters / all parameters", n_train / n_all)
    lisa_train = [p for p in lisa.parameters() if p.requires_grad]
    lisa_bytes = sum(p.numel() * p.element_size() for p in lisa_train)
    report.info("AdamW state, full fine-tuning", C.mib(adam_all))
    report.info("GaLore optimizer state", C.mib(_state_bytes(galore_opt)))
    report.info("Q-GaLore optimizer state", C.mib(_state_bytes(qgalore_opt)))
    report.info("LISA optimizer state (1 active layer)", C.mib(_state_bytes(lisa_opt)))
    report.info("LISA trainable state (weights + gradients + Adam moments of the trainable set)", C.mib(4 * lisa_bytes))
    report.info("weights, float32 / Q-GaLore", f"{C.mib(all_f32)} / {C.mib(q_all)}")

    # peak bytes allocated during one step (gradients, activations and transient optimizer tensors; the
    # state already allocated before the step is not counted)
    peaks = {name: C.peak_bytes(step) for name, step in steps.items()}
    for name, label in [
        ("galore", "GaLore peak bytes during a step / full"),
        ("galore_per", "GaLore per-parameter peak bytes during a step / full"),
        ("lisa", "LISA peak bytes during a step / full"),
        ("qgalore", "Q-GaLore peak bytes during a step / full"),
        ("lora", "LoRA (functuner) peak bytes during a step / full"),
    ]:
        report.add(label, C.ratio(peaks[name], peaks["full"]))
    report.info("full fine-tuning peak during a step", C.mib(peaks["full"]))

    # step times
    times = C.interleaved(steps, warmup=warmup, repeats=repeats)
    for name, label in [
        ("galore", "GaLore step time / full fine-tuning"),
        ("galore_svd", "GaLore step time with an SVD refresh every step / full"),
        ("galore_per", "GaLore per-parameter step time / full"),
        ("lisa", "LISA step time / full fine-tuning"),
        ("qgalore", "Q-GaLore step time / full fine-tuning"),
        ("lora", "LoRA (functuner) step time / full fine-tuning"),
        ("lora_peft", "LoRA (PEFT) step time / full fine-tuning"),
    ]:
        report.add(label, C.ratio(times[name], times["full"]))
    for name, label in [
        ("full", "full fine-tuning step time / LoRA (PEFT)"),
        ("galore", "GaLore step time / LoRA (PEFT)"),
        ("qgalore", "Q-GaLore step time / LoRA (PEFT)"),
        ("lisa", "LISA step time / LoRA (PEFT)"),
        ("lora", "LoRA (functuner) step time / LoRA (PEFT)"),
    ]:
        report.add(label, C.ratio(times[name], times["lora_peft"]))
    report.info("full fine-tuning step (median)", f"{times['full'] * 1e3:.1f} ms")
    report.notes.append(
        "state bytes are exact counts of the optimizers' tensors; the GaLore rows include its projection matrices"
    )
    report.notes.append(f"batch {shape.batch} x seq {shape.seq}; times are medians of {repeats} interleaved repeats")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/galore_lisa.py", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny model, few repeats (CI)")
    args = ap.parse_args(argv)
    print(run(C.settings(args.quick)).markdown(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
