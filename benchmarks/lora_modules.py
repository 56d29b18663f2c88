"""LoRA training steps on the module types beyond ``nn.Linear``: Conv2d, Conv3d and MoE ``target_parameters``.

Three models, each trained the same way by three rows (forward, loss, backward
and, except the floor, one ``torch.optim.AdamW`` step on the adapter tensors):

* ``conv2d``: a stack of ``nn.Conv2d`` (3x3, padding 1) with ReLU and a linear
  head, LoRA on every convolution;
* ``conv3d``: the same with ``nn.Conv3d``;
* ``moe``: a transformers ``Qwen3MoeForCausalLM`` built from a config, whose
  experts are fused 3-D parameters (``mlp.experts.gate_up_proj``, ``(E, 2 I, H)``),
  adapted through ``target_parameters`` (PEFT's ``ParamWrapper``; functuner's
  ``"param"`` sites), causal-LM loss.

Rows: ``functional`` (``functuner.value_and_grad`` of a pure loss), ``peft``
(``peft.get_peft_model`` with the same tensors, ``loss.backward()``) and
``floor`` (the frozen base's forward and backward with respect to its input, no
adapter).  Reported: medians, as ratios ``functional / peft`` and ``/ floor``;
no target (the issue asks for the numbers next to PEFT), nothing asserts a time.

Correctness first: for each model, functuner's and PEFT's loss and every
adapter gradient of one step agree (``rtol 1e-4``).

Usage::

    python -m benchmarks --only lora_modules [--quick]
    python benchmarks/lora_modules.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import functuner as ft
from benchmarks import common as C

LR = 1e-4


@dataclass(frozen=True)
class _Sizes:
    batch: int
    channels: int
    image: int  # Conv2d: image x image; Conv3d: (image / 4) x (image / 2) x (image / 2)
    layers: int
    rank: int
    moe_hidden: int
    moe_layers: int
    experts: int
    moe_seq: int


QUICK = _Sizes(batch=2, channels=8, image=8, layers=2, rank=4, moe_hidden=32, moe_layers=1, experts=4, moe_seq=8)
FULL = _Sizes(batch=8, channels=64, image=32, layers=4, rank=16, moe_hidden=256, moe_layers=2, experts=8, moe_seq=128)


class _ConvNet(nn.Module):
    """``layers`` same-size 3x3 convolutions (Conv2d or Conv3d) with ReLU, global mean, a linear head."""

    def __init__(self, dims: int, channels: int, layers: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.convs = nn.ModuleList(conv(channels, channels, 3, padding=1) for _ in range(layers))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = torch.relu(c(x))
        return self.head(x.flatten(2).mean(-1))


class _Case:
    """A model, its inputs, a loss ``loss(out)``, and the LoRA config, for one benchmark row set."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        loss: Callable[[Any], torch.Tensor],
        config: ft.LoRAConfig,
        peft_kwargs: dict[str, Any],
        floor_input: Callable[[], tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]],
    ) -> None:
        self.name, self.model, self.args, self.kwargs, self.loss = name, model, args, kwargs, loss
        self.config, self.peft_kwargs, self.floor_input = config, peft_kwargs, floor_input


def _frozen(model: nn.Module) -> nn.Module:
    model = model.to(C.device()).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _conv_case(dims: int, z: _Sizes) -> _Case:
    torch.manual_seed(0)
    model = _frozen(_ConvNet(dims, z.channels, z.layers))
    g = torch.Generator().manual_seed(1)
    spatial = (z.image, z.image) if dims == 2 else (max(z.image // 4, 2), z.image // 2, z.image // 2)
    x = torch.randn(z.batch, z.channels, *spatial, generator=g).to(C.device())
    y = torch.randint(0, 10, (z.batch,), generator=g).to(C.device())
    targets = [f"convs.{i}" for i in range(z.layers)]
    cfg = ft.LoRAConfig(r=z.rank, lora_alpha=2 * z.rank, target_modules=targets, init_lora_weights=False)

    def floor_input() -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
        leaf = x.clone().requires_grad_(True)
        return (leaf,), {}, leaf

    return _Case(
        f"conv{dims}d",
        model,
        (x,),
        {},
        lambda out: nn.functional.cross_entropy(out, y),
        cfg,
        {"target_modules": targets},
        floor_input,
    )


def _moe_case(z: _Sizes) -> _Case:
    import transformers

    torch.manual_seed(0)
    h = z.moe_hidden
    tcfg = transformers.Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=h,
        intermediate_size=2 * h,
        moe_intermediate_size=h,
        num_hidden_layers=z.moe_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=h // 4,
        num_experts=z.experts,
        num_experts_per_tok=2,
        max_position_embeddings=max(64, z.moe_seq),
    )
    model = _frozen(transformers.Qwen3MoeForCausalLM(tcfg))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (z.batch, z.moe_seq), generator=g).to(C.device())
    targets = ["mlp.experts.gate_up_proj"]
    cfg = ft.LoRAConfig(r=z.rank, lora_alpha=2 * z.rank, target_parameters=targets, init_lora_weights=False)
    emb = model.get_input_embeddings()

    def floor_input() -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
        e = emb(ids).detach().requires_grad_(True)
        return (), {"inputs_embeds": e, "labels": ids}, e

    return _Case(
        "moe",
        model,
        (ids,),
        {"labels": ids},
        lambda out: out.loss,
        cfg,
        {"target_modules": [], "target_parameters": targets},
        floor_input,
    )


def _loss_of(out: Any, case: _Case) -> torch.Tensor:
    return case.loss(out)


def _functional(case: _Case, params: ft.TunerParams) -> tuple[Callable[[], torch.Tensor], Callable[[], dict]]:
    state: dict[str, Any] = {"p": params.map(lambda t: t.detach().clone()), "g": {}}
    opt = torch.optim.AdamW(list(state["p"].values()), lr=LR)

    def loss_fn(p: ft.TunerParams) -> torch.Tensor:
        return _loss_of(ft.apply(case.model, p, case.args, case.kwargs), case)

    vg = ft.value_and_grad(loss_fn)

    def step() -> torch.Tensor:
        loss, grads = vg(state["p"])
        for t, gr in zip(state["p"].values(), grads.values(), strict=True):
            t.grad = gr
        opt.step()
        state["g"] = dict(grads.items())
        for t in state["p"].values():
            t.grad = None
        return loss

    return step, lambda: state["g"]


def _peft(case: _Case, params: ft.TunerParams) -> tuple[Callable[[], torch.Tensor], Callable[[], dict]]:
    import peft

    cfg = params.config
    pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, init_lora_weights=False, **case.peft_kwargs)
    pm = peft.get_peft_model(copy.deepcopy(case.model), pcfg)
    sd = ft.to_peft_state_dict(params, params.adapter_name)
    res = peft.set_peft_model_state_dict(pm, {k: v.detach().clone() for k, v in sd.items()})
    if getattr(res, "unexpected_keys", None):
        raise AssertionError(f"{case.name}: PEFT did not take keys {res.unexpected_keys[:3]}")
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=LR)
    last: dict[str, torch.Tensor] = {}

    def step() -> torch.Tensor:
        loss = _loss_of(pm(*case.args, **case.kwargs), case)
        loss.backward()
        opt.step()
        last.clear()
        last.update({n: p.grad.detach().clone() for n, p in trainable.items() if p.grad is not None})
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def grads() -> dict[str, torch.Tensor]:
        state = peft.get_peft_model_state_dict(pm, state_dict={n: last[n] for n in last})
        return ft.from_peft_state_dict(state, params.adapter_name, config=params.config)

    return step, grads


def _floor(case: _Case) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        args, kwargs, leaf = case.floor_input()
        loss = _loss_of(case.model(*args, **kwargs), case)
        loss.backward()
        return loss.detach()

    return step


def _check(report: C.Report, case: _Case, ours: tuple[Callable, Callable], theirs: tuple[Callable, Callable]) -> None:
    lo, lt = ours[0](), theirs[0]()
    C.assert_close(f"{case.name}: loss functuner vs peft", lo, lt, rtol=1e-5, atol=1e-5)
    go, gt = ours[1](), theirs[1]()
    if set(go) != set(gt):
        raise AssertionError(f"{case.name}: gradients cover other tensors: {sorted(set(go) ^ set(gt))[:3]}")
    worst = max(C.assert_close(f"{case.name}: grad {k}", go[k], gt[k], rtol=1e-4, atol=1e-6) for k in go)
    report.check(f"{case.name} loss and all {len(go)} adapter gradients equal PEFT's (max abs diff {worst:.2g})")


def run(s: C.Settings) -> C.Report:
    z = QUICK if s.quick else FULL
    report = C.Report("LoRA on Conv2d / Conv3d / MoE target_parameters: training step")
    for case in (_conv_case(2, z), _conv_case(3, z), _moe_case(z)):
        params = ft.init(case.model, case.config, generator=0)
        ours, theirs = _functional(case, params), _peft(case, params)
        _check(report, case, ours, theirs)
        # fresh optimizers after the check step, so both rows time the same state
        ours, theirs = _functional(case, params), _peft(case, params)
        t = C.interleaved(
            {"functional": ours[0], "peft": theirs[0], "floor": _floor(case)}, warmup=s.warmup, repeats=s.repeats
        )
        report.add(f"{case.name}: functional / peft step", C.ratio(t["functional"], t["peft"]))
        report.add(f"{case.name}: peft / floor step", C.ratio(t["peft"], t["floor"]))
        report.add(f"{case.name}: functional / floor step", C.ratio(t["functional"], t["floor"]))
        report.info(f"{case.name}: functional step (median)", f"{t['functional'] * 1e3:.1f} ms")
    report.notes.append(
        f"conv: batch {z.batch}, {z.layers} layers of {z.channels} channels, 3x3(x3) kernels, images {z.image}^2"
        f" (3-D: {max(z.image // 4, 2)}x{z.image // 2}^2), r={z.rank}; moe: Qwen3-MoE hidden {z.moe_hidden},"
        f" {z.moe_layers} layers, {z.experts} experts (top 2), batch {z.batch} x seq {z.moe_seq}, r={z.rank} per"
        f" expert on mlp.experts.gate_up_proj; {s.repeats} interleaved repeats, medians"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    print(run(C.settings(args.quick)).markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
