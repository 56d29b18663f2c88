"""The inference hot paths of LoRA's forward (performance round 2) compute what the general paths compute.

* plain LoRA on a linear layer without autograd adds ``s B A x`` in place into the module's fresh output
  (``functuner.tuners.lora.forward._linear_slot``): equal to the autograd path, the model untouched;
* per-sample adapters on wide linear layers use the concatenated factors of the adapters the batch uses
  (``functuner.tuners.lora.mixed._used_slot``): equal to each sample run alone, with and without autograd;
* LoRA on raw parameters replaces the module's forward (``functuner.core.routing.Replace``): the module
  runs once per call, and no slot is left behind by ``remove_slots``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import functuner as ft
from functuner.core.routing import MethodSlot, remove_slots
from functuner.tuners.lora import mixed
from functuner.tuners.lora.mixed import apply_mixed, stack_adapters


class _Mlp(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _mlp_and_adapters(names: tuple[str, ...] = ("a", "b")) -> tuple[nn.Module, dict[str, ft.TunerParams]]:
    torch.manual_seed(0)
    model = _Mlp().eval()
    cfg = ft.LoRAConfig(r=2, lora_alpha=6, target_modules=["up", "down"], init_lora_weights=False)
    return model, {n: ft.init(model, cfg, generator=i, adapter_name=n) for i, n in enumerate(names)}


def test_inference_linear_path_equals_autograd_path_and_leaves_the_model_alone() -> None:
    model, adapters = _mlp_and_adapters(("a",))
    p = adapters["a"]
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    base_before = model(x).detach()
    with_grad = ft.apply(model, p, (x,))
    assert with_grad.requires_grad  # the autograd path ran (LoRA factors require grad)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            fast = ft.apply(model, p, (x,))
        torch.testing.assert_close(fast, with_grad.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), base_before, rtol=0, atol=0)


@pytest.mark.parametrize("names", [["a", "__base__", "b", "a"], ["b", "b"]], ids=["mixed_with_base", "one_adapter"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_concatenated_per_sample_path_equals_each_sample_alone(names: list[str], grad: bool) -> None:
    model, adapters = _mlp_and_adapters()
    stack = stack_adapters(model, adapters)
    x = torch.randn(len(names), 4, 64, generator=torch.Generator().manual_seed(2))
    idx = mixed._as_index(stack, names)
    used = sorted(set(idx.tolist()) - {len(stack.names)})
    slots = [mixed._site_slot(site, idx, used) for site in stack.sites]
    assert all(s.func is mixed._used_slot for s in slots)  # the path under test is the one taken
    with torch.set_grad_enabled(grad):
        got = apply_mixed(model, stack, names, (x,))
    want = torch.cat(
        [
            model(x[i : i + 1]) if n == "__base__" else ft.apply(model, adapters[n], (x[i : i + 1],))
            for i, n in enumerate(names)
        ]
    )
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)


_EXPERT_CALLS: list[int] = []  # one entry per forward of any _Experts (the per-call clone included)


class _Experts(nn.Module):
    """A fused 3-D expert weight used by every token (as PEFT's ``target_parameters`` toy), counting its forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _EXPERT_CALLS.append(1)
        return torch.einsum("bi,eoi->bo", x, self.weight)


class _MoeToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = _Experts()

    def forward(self, x: torch.Tensor) -> Any:
        return self.experts(x)


def test_raw_parameter_lora_runs_the_module_once_and_equals_the_merged_weight() -> None:
    torch.manual_seed(0)
    model = _MoeToy()
    cfg = ft.LoRAConfig(r=2, lora_alpha=4, target_parameters=["experts.weight"], init_lora_weights=False)
    p = ft.init(model, cfg, generator=0)
    x = torch.randn(5, 6)
    before = len(_EXPERT_CALLS)
    got = ft.apply(model, p, (x,))
    assert len(_EXPERT_CALLS) - before == 1  # the base forward with W does not run first
    assert isinstance(model.experts.__dict__["forward"], MethodSlot)
    merged = ft.merge(model, p)["experts.weight"]
    torch.testing.assert_close(got, torch.einsum("bi,eoi->bo", x, merged), rtol=1e-5, atol=1e-5)
    dormant = model(x)  # no routes: the original forward
    torch.testing.assert_close(dormant, torch.einsum("bi,eoi->bo", x, model.experts.weight))
    remove_slots(model)
    assert "forward" not in model.experts.__dict__
