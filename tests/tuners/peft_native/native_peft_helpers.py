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
from collections.abc import Callable
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
}


def out_of(o: Any) -> torch.Tensor:
    return o if isinstance(o, torch.Tensor) else o["logits"]


def adapter_params(pm: nn.Module) -> dict[str, torch.nn.Parameter]:
    """PEFT's trainable tensors, keyed by functuner's names (``base_model.model.`` dropped)."""
    prefix = "base_model.model."
    return {n[len(prefix) :]: p for n, p in pm.named_parameters() if p.requires_grad}


def make_pair(model: nn.Module, ours: Any, theirs: peft.PeftConfig, seed: int = 0) -> tuple[ft.TunerParams, nn.Module]:
    """(functuner params holding PEFT's randomly initialised tensors, the PeftModel); ``model`` is untouched."""
    p = ft.init(model, ours, generator=seed)
    pm = peft.get_peft_model(copy.deepcopy(model), theirs).eval()
    theirs_t = adapter_params(pm)
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
    g_ours = torch.autograd.grad((ours * weights).sum(), list(leaves.values()))
    peft_t = adapter_params(pm)
    g_theirs = torch.autograd.grad((theirs * weights).sum(), [peft_t[k] for k in leaves])
    for k, a, b in zip(leaves, g_ours, g_theirs, strict=True):
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
