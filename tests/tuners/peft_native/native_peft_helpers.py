"""Shared toy models and parity checks for the native (IA)³ / LoHa / LoKr tests against real PEFT.

Parity recipe (one row = a toy model and a config): ``functuner.init`` must give
exactly PEFT's tensor names and shapes; then PEFT's own random init
(``init_weights=False``) is copied into our params, so both sides hold the same
tensors without relying on identical RNG streams.  Compared, all in fp32 on CPU:

* forward (eval): ``functuner.apply`` vs the ``PeftModel``;
* gradients of one weighted-sum loss with respect to every adapter tensor;
* merged forward: ``functuner.merge`` run through ``torch.func.functional_call``
  vs PEFT's ``merge_and_unload()`` model;
* ``functuner.unmerge(merge(...))`` restores the base weights.

Tolerances (``ATOL``/``RTOL`` = 1e-5, as PEFT's ``testing_common`` uses for fp32 outputs): one step of
float32 rounding differences between the two implementations' op order.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

import functuner as ft

ATOL = 1e-5
RTOL = 1e-5


class MLP(nn.Module):
    """Linear -> ReLU -> Linear -> Linear head (biases everywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(12, 16)
        self.lin2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin2(torch.relu(self.lin1(x))))


class ConvNet(nn.Module):
    """Conv2d 3x3 (stride 2, padding) -> grouped Conv2d 3x3 -> Conv2d 1x1 -> Conv1d -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(12, 6, 1)
        self.c4 = nn.Conv1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))  # (B, 6, H, W)
        h = self.c4(h.flatten(2))  # (B, 6, H*W)
        return self.head(h.mean(-1))


class PeftMLP(nn.Module):
    """PEFT's ``MLP`` of ``tests/test_custom_models.py`` (huggingface/peft@5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803 - PEFT's argument name
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


class PeftEmbConv1D(nn.Module):
    """PEFT's ``ModelEmbConv1D`` (same file and commit): Embedding -> transformers Conv1D -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803 - PEFT's argument name
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


class PeftConv2D(nn.Module):
    """PEFT's ``ModelConv2D`` (same file and commit): Conv2d(5, 10, 3) on a 3x3 input -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803 - PEFT's argument name
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(X.float().reshape(-1, 5, 3, 3))))))


def peft_conv2d() -> PeftConv2D:
    torch.manual_seed(0)
    return PeftConv2D().eval()


def peft_mlp() -> PeftMLP:
    torch.manual_seed(0)
    return PeftMLP().eval()


def peft_emb_conv1d() -> PeftEmbConv1D:
    torch.manual_seed(0)
    return PeftEmbConv1D().eval()


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def conv_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, torch.Tensor]]]] = {
    "mlp": (mlp, lambda: {"x": torch.randn(5, 12, generator=_gen(1))}),
    "llama": (tiny_llama, lambda: {"input_ids": torch.randint(0, 64, (2, 7), generator=_gen(2))}),
    "gpt2": (tiny_gpt2, lambda: {"input_ids": torch.randint(0, 64, (2, 7), generator=_gen(3))}),
    "conv": (conv_net, lambda: {"x": torch.randn(2, 4, 8, 8, generator=_gen(4))}),
    "peft_conv2d": (peft_conv2d, lambda: {"X": torch.randn(6, 45, generator=_gen(7))}),
    "peft_mlp": (peft_mlp, lambda: {"X": torch.randn(6, 10, generator=_gen(5))}),
    "peft_emb_conv1d": (peft_emb_conv1d, lambda: {"X": torch.randint(0, 100, (6, 10), generator=_gen(6))}),
}


def out_of(o: Any) -> torch.Tensor:
    return o if isinstance(o, torch.Tensor) else o["logits"]


def adapter_params(pm: nn.Module) -> dict[str, torch.nn.Parameter]:
    """PEFT's trainable tensors, keyed by functuner's names (``base_model.model.`` dropped)."""
    prefix = "base_model.model."
    return {n[len(prefix) :]: p for n, p in pm.named_parameters() if p.requires_grad}


def peft_buffers(pm: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """PEFT's frozen tensors shared by its layers (VeRA's ``vera_A``...), keyed ``<name>.<adapter>`` as functuner's."""
    out: dict[str, torch.Tensor] = {}
    for key, buf in pm.named_buffers(remove_duplicate=False):
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in names:
            out.setdefault(f"{parts[-2]}.{parts[-1]}", buf)
    return out


def make_pair(
    model: nn.Module, ours: Any, theirs: peft.PeftConfig, seed: int = 0, frozen: tuple[str, ...] = ()
) -> tuple[ft.TunerParams, nn.Module]:
    """(functuner params holding PEFT's randomly initialised tensors, the PeftModel); ``model`` is untouched.

    ``frozen``: names of PEFT's shared frozen buffers that functuner keeps in the params (VeRA's projections);
    ours must equal PEFT's exactly (drawn from the same key), not copied.
    """
    p = ft.init(model, ours, generator=seed)
    pm = peft.get_peft_model(copy.deepcopy(model), theirs).eval()
    theirs_t: dict[str, torch.Tensor] = dict(adapter_params(pm))
    if frozen:
        bufs = peft_buffers(pm, frozen)
        for k, v in bufs.items():
            torch.testing.assert_close(p[k], v, atol=0, rtol=0, msg=lambda m, k=k: f"frozen {k}: {m}")
        theirs_t.update(bufs)
    assert {k: tuple(v.shape) for k, v in p.items()} == {k: tuple(v.shape) for k, v in theirs_t.items()}
    return p.replace({k: theirs_t[k].detach().clone() for k in p}), pm


def assert_parity(
    model: nn.Module, inputs: dict[str, torch.Tensor], p: ft.TunerParams, pm: nn.Module, *, peft_grads: bool = True
) -> None:
    """Forward, gradients, merged forward and unmerge agree with PEFT (see the module docstring).

    ``peft_grads=False`` skips the gradient comparison, for the one case where PEFT's hand-written backward
    is wrong (LoHa's CP kernel; the test checks that and runs ``gradcheck`` on ours instead).
    """
    base = out_of(model(**inputs)).detach()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    ours = out_of(ft.apply(model, p.replace(leaves), kwargs=inputs))
    theirs = out_of(pm(**inputs))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    assert (ours.detach() - base).abs().max() > 1e-3, "the adapter must change the output, or parity is vacuous"

    weights = torch.linspace(-1, 1, ours.numel()).reshape(ours.shape)
    g_all = torch.autograd.grad((ours * weights).sum(), list(leaves.values()), allow_unused=True)
    peft_t = adapter_params(pm)
    for k, g in zip(leaves, g_all, strict=True):  # PEFT's frozen tensors (VeRA's projections) get no gradient here
        assert k in peft_t or g is None or not g.any(), f"frozen {k} got a gradient"
    trained = [k for k in leaves if k in peft_t]
    g_ours = [g for k, g in zip(leaves, g_all, strict=True) if k in peft_t]
    g_theirs = torch.autograd.grad((theirs * weights).sum(), [peft_t[k] for k in trained])
    for k, a, b in zip(trained, g_ours, g_theirs, strict=True):
        if not peft_grads:
            break
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"grad of {k}: {m}")

    merged = ft.merge(model, p)
    merged_out = out_of(torch.func.functional_call(model, merged, (), inputs))
    unloaded = copy.deepcopy(pm).merge_and_unload().eval()
    torch.testing.assert_close(merged_out, out_of(unloaded(**inputs)), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(merged_out, ours.detach(), atol=ATOL, rtol=RTOL)
    state = {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }
    ours_merged_weights = {k: v for k, v in merged.items() if v is not state.get(k)}
    theirs_state = unloaded.state_dict()
    for k, v in ours_merged_weights.items():
        torch.testing.assert_close(v, theirs_state[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"merged {k}: {m}")
    restored = ft.unmerge(model, p, merged)
    for k in ours_merged_weights:
        if ".modules_to_save." not in k and k in state and k.rsplit(".", 1)[0] not in _saved_modules(p):
            torch.testing.assert_close(restored[k], state[k].detach(), atol=1e-4, rtol=1e-4)


def _saved_modules(p: ft.TunerParams) -> set[str]:
    return {k.partition(".modules_to_save.")[0] for k in p if ".modules_to_save." in k}


def check_peft_round_trip(
    tmp_path: Path, model: nn.Module, x: dict[str, Any], p: ft.TunerParams, peft_config: Any, peft_type: str
) -> ft.TunerParams:
    """Both ways with real PEFT: PEFT loads ``save(p, format="peft")`` with our outputs; we load PEFT's own save
    (of a model built from ``peft_config``) with PEFT's outputs.  Returns what we loaded from PEFT's save."""
    name = p.adapter_name
    ft.save(p, tmp_path / "ours", format="peft")
    folder = tmp_path / "ours" if name == "default" else tmp_path / "ours" / name
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == peft_type
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder, adapter_name=name).eval()
    torch.testing.assert_close(out_of(pm(**x)), out_of(ft.apply(model, p, kwargs=x)), atol=1e-5, rtol=1e-5)

    theirs = peft.get_peft_model(copy.deepcopy(model), peft_config).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = ft.load(tmp_path / "theirs", model)
    assert isinstance(back.config, type(p.config))
    torch.testing.assert_close(out_of(ft.apply(model, back, kwargs=x)), out_of(theirs(**x)), atol=1e-5, rtol=1e-5)
    return back


def check_swift_round_trip_grad_and_vmap(tmp_path: Path, model: nn.Module, p1: ft.TunerParams) -> None:
    """SWIFT-layout save/load is exact; ``torch.func.grad`` equals autograd; ``vmap`` over two stacked params
    equals two calls (``model`` takes a (4, 12) input)."""
    ft.save(p1, tmp_path)
    back = ft.load(tmp_path, model)
    assert back.config == p1.config and all(torch.equal(back[k], p1[k]) for k in p1)
    p2 = ft.init(model, p1.config, generator=2)
    x = torch.randn(4, 12)

    def loss(params: ft.TunerParams) -> torch.Tensor:
        return ft.apply(model, params, (x,)).square().mean()

    grads = torch.func.grad(loss)(p1)
    leaves = p1.map(lambda t: t.detach().requires_grad_(True))
    for g, e in zip(grads.values(), torch.autograd.grad(loss(leaves), list(leaves.values())), strict=True):
        torch.testing.assert_close(g, e)
    stacked = ft.tree_map(lambda a, b: torch.stack([a, b]), p1, p2)
    outs = torch.func.vmap(lambda params: ft.apply(model, params, (x,)))(stacked)
    torch.testing.assert_close(outs[0], ft.apply(model, p1, (x,)))
    torch.testing.assert_close(outs[1], ft.apply(model, p2, (x,)))
