"""The registry of quantized kinds: what each layer reports, refusals, backends that cannot run here, k-bit prep.

* every registered kind reports the true ``(out, in)`` shape and dequantizes to the float weight it was
  quantized from (within the format's step); re-quantizing the dequantized weight gives the same weight back;
* a quantized layer no kind handles (an integer weight on an ``nn.Linear``, a bitsandbytes layer that was
  never quantized) is refused with :class:`UnsupportedModuleError` naming the module and its type, before
  ``Swift.prepare_model`` changes anything;
* torchao's int4 weight-only layers need the ``mslk`` kernel package, which has no CPU build: refused by
  torchao itself here (docs/quantization.md says so);
* ``prepare_model_for_kbit_training`` against PEFT's on a bf16 base with 4-bit layers: the same dtypes,
  frozen parameters, input grads and gradient checkpointing; the plan is pure; the shim's flag runs it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functuner as ft
from functuner import LoRAConfig, Swift
from functuner.errors import UnsupportedModuleError
from functuner.quant import dense_weight, kbit_training_plan, kind_of, prepare_model_for_kbit_training, weight_shape
from tests.quant.quant_models import BACKENDS, TARGETS, float_llama, ids, quantized_llama

# max |dequantize(W_q) - W| / max |W| per layer for the float weights of tests/quant/quant_models.py
STEP = {"bnb4": 0.2, "bnb8": 0.01, "torchao8": 0.01, "quanto8": 0.01, "quanto4": 0.2, "hqq4": 0.2}
KIND = {
    "bnb4": "bitsandbytes-4bit",
    "bnb8": "bitsandbytes-8bit",
    "torchao8": "torchao-int8",
    "quanto8": "optimum-quanto",
    "quanto4": "optimum-quanto",
    "hqq4": "hqq",
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_kind_reports_shape_dequantizes_and_requantizes(backend: str) -> None:
    ref = {n: t.detach() for n, t in float_llama().named_parameters()}
    model = quantized_llama(backend)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        layer = model.get_submodule(name)
        kind = kind_of(layer)
        assert kind is not None and kind.name == KIND[backend]
        w = ref[f"{name}.weight"]
        assert weight_shape(layer) == tuple(w.shape)
        dense = dense_weight(layer)
        assert dense is not None and dense.dtype == torch.float32 and not dense.requires_grad
        assert (dense - w).abs().max() <= STEP[backend] * w.abs().max()
        assert kind.requantize is not None
        again = dense_weight(kind.requantize(layer, dense))  # quantizing a quantized weight moves it < one step
        assert again is not None and (again - dense).abs().max() <= STEP[backend] * w.abs().max()


class IntWeightNet(nn.Module):
    """An ``nn.Linear`` whose weight is int8 storage no registered kind describes (as GPTQ/AWQ-style kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.fc.weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int8), requires_grad=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_an_unregistered_quantized_layer_is_refused_before_any_change() -> None:
    model = IntWeightNet()
    before = {n: (t, t.requires_grad) for n, t in model.named_parameters()}
    with pytest.raises(UnsupportedModuleError, match=r"'fc'.*torch\.nn\.modules\.linear\.Linear.*int8"):
        ft.init(model, LoRAConfig(r=2, target_modules=["fc"]), generator=0)
    with pytest.raises(UnsupportedModuleError, match="'fc'"):
        Swift.prepare_model(model, LoRAConfig(r=2, target_modules=["fc", "head"]))
    assert {n: (t, t.requires_grad) for n, t in model.named_parameters()} == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_bitsandbytes_layer_that_was_never_quantized_is_refused() -> None:
    import bitsandbytes as bnb

    model = nn.Sequential(bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32))  # not moved to a device yet
    with pytest.raises(UnsupportedModuleError, match=r"'0'.*Linear4bit"):
        ft.init(model, LoRAConfig(r=2, target_modules=["0"]), generator=0)


def test_torchao_int4_needs_a_kernel_package_without_a_cpu_build() -> None:
    """The documented reason torchao int4 is not registered: torchao cannot build such a layer here."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    with pytest.raises(ImportError, match="mslk"):
        quantize_(nn.Sequential(nn.Linear(64, 64)), Int4WeightOnlyConfig(group_size=32))


def _bf16_bnb4_llama() -> nn.Module:
    model = quantized_llama("bnb4").to(torch.bfloat16)  # norms, embeddings and lm_head in bf16
    for m in model.modules():
        if kind_of(m) is not None:
            m.compute_dtype = torch.bfloat16
    return model


def _summary(model: nn.Module) -> dict[str, tuple[torch.dtype, bool]]:
    return {n: (t.dtype, t.requires_grad) for n, t in model.named_parameters()}


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def test_prepare_model_for_kbit_training_matches_peft() -> None:
    import peft

    with pytest.warns(FutureWarning, match="gradient_checkpointing_enable` is deprecated"):  # PEFT calls the old name
        theirs = peft.prepare_model_for_kbit_training(_bf16_bnb4_llama())
    model = _bf16_bnb4_llama()
    before = _summary(model)
    plan = kbit_training_plan(model)
    assert _summary(model) == before  # the plan is pure
    assert plan.quantized and plan.input_grads and plan.gradient_checkpointing
    assert "model.norm.weight" in plan.casts and "lm_head.weight" in plan.casts
    ours = prepare_model_for_kbit_training(model)
    assert ours is model
    assert _summary(ours) == _summary(theirs)
    assert _summary(ours)["model.norm.weight"] == (torch.float32, False)
    assert _checkpointing(ours) and _checkpointing(theirs)
    x = ids()
    assert ours.get_input_embeddings()(x).requires_grad and theirs.get_input_embeddings()(x).requires_grad


def test_shim_flag_prepares_a_quantized_base_and_it_trains() -> None:
    model = _bf16_bnb4_llama()
    sm = Swift.prepare_model(model, LoRAConfig(r=4, target_modules=TARGETS), prepare_kbit_training=True)
    assert model.get_parameter("model.norm.weight").dtype == torch.float32 and _checkpointing(model)
    sm.train()
    x = ids()
    loss = sm(input_ids=x, labels=x).loss
    loss.backward()
    grads = [t.grad for n, t in sm.named_parameters() if t.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# every native PEFT-method tuner other than LoRA/DoRA adapts float layers only: on a quantized base it is
# refused by name, before anything is read from the packed weight (raw RuntimeErrors before issue #19)
NATIVE_CONFIGS = {
    "IA3": lambda: ft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "LoHa": lambda: ft.LoHaConfig(r=2, target_modules=["q_proj"]),
    "LoKr": lambda: ft.LoKrConfig(r=2, target_modules=["q_proj"]),
}


@pytest.mark.parametrize("backend", ["bnb4", "torchao8"])
@pytest.mark.parametrize("tuner", list(NATIVE_CONFIGS))
def test_other_tuners_refuse_a_quantized_layer_by_name(tuner: str, backend: str) -> None:
    model = quantized_llama(backend)
    before = dict(model.named_parameters())  # (bnb's state_dict builds its quant-state tensors anew each call)
    for call in (
        lambda: ft.init(model, NATIVE_CONFIGS[tuner](), generator=0),
        lambda: Swift.prepare_model(model, NATIVE_CONFIGS[tuner]()),
    ):
        with pytest.raises(UnsupportedModuleError, match=rf"'model\.layers\.0\.self_attn\.q_proj'.*{tuner}Config"):
            call()
    after = dict(model.named_parameters())
    assert set(after) == set(before) and all(after[k] is v for k, v in before.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
