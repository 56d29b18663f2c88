"""LoRA's module-level caches hold models, layers and configs weakly: deleting a model frees it."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

import functuner as ft
from functuner.tuners.longlora import LongLoRAConfig
from functuner.tuners.lora import layout as lora_layout
from functuner.tuners.lora.mixed import apply_mixed, stack_adapters
from tests.conftest import tiny_llama


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def _index_entries(model: nn.Module) -> int:
    return sum(1 for entry in lora_layout._COMPILE_INDEX.values() if entry[0]() is model)


def _use_everything(model: nn.Module) -> None:
    """init + apply (functional, per-sample, grads) with plain LoRA, DoRA and modules_to_save."""
    model.eval()
    x = torch.randn(3, 6)
    plain = ft.init(model, ft.LoRAConfig(r=2, target_modules=["0", "2"], init_lora_weights=False), generator=0)
    dora = ft.init(
        model,
        ft.LoRAConfig(r=3, target_modules=["0"], use_dora=True, modules_to_save=["2"]),
        generator=1,
        adapter_name="d",
    )
    ft.apply(model, plain, (x,))
    ft.apply(model, dora, (x,))
    ft.apply(model, [plain, dora], (x,))
    ft.value_and_grad(lambda p: ft.apply(model, p, (x,)).sum())(plain)
    other = ft.init(model, ft.LoRAConfig(r=4, target_modules=["2"]), generator=2, adapter_name="b")
    stack = stack_adapters(model, {"a": plain, "b": other})
    apply_mixed(model, stack, ["a", "__base__", "b"], (x,))
    apply_mixed(model, [plain], torch.tensor([0, -1, 0]), (x,))
    ft.merge(model, [plain, dora])


def test_deleted_model_and_its_layers_are_freed() -> None:
    model = _mlp()
    _use_everything(model)
    model_ref, layer_ref = weakref.ref(model), weakref.ref(model[0])
    assert _index_entries(model) >= 1  # the eager calls indexed their layouts for torch.compile
    model_id = id(model)
    del model
    gc.collect()
    assert model_ref() is None
    assert layer_ref() is None
    assert not any(key[0] == model_id for key in lora_layout._COMPILE_INDEX)


def test_deleted_transformers_model_is_freed() -> None:
    model = tiny_llama()
    params = ft.init(model, ft.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True), generator=0)
    ids = torch.tensor([[1, 2, 3, 4]])
    ft.apply(model, params, (ids,))
    model.eval()
    apply_mixed(model, [params], torch.tensor([0]), (ids,))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_many_configs_leave_no_entries_behind() -> None:
    """200 configs on one live model: the caches stay bounded (was: 200 index entries, kept after the model died)."""
    model = _mlp()
    x = torch.randn(2, 6)
    for r in range(1, 201):
        params = ft.init(model, ft.LoRAConfig(r=r % 7 + 1, lora_alpha=r, target_modules=["0"]), generator=r)
        ft.apply(model, params, (x,))
        del params
    gc.collect()
    assert len(lora_layout._LAYOUT_CACHE[model]) <= lora_layout._MAX_PER_MODEL
    assert 1 <= _index_entries(model) <= lora_layout._MAX_PER_MODEL
    ref, model_id = weakref.ref(model), id(model)
    del model
    gc.collect()
    assert ref() is None
    assert not any(key[0] == model_id for key in lora_layout._COMPILE_INDEX)


def test_longlora_reuses_one_lora_view_per_config() -> None:
    cfg = LongLoRAConfig(r=2, target_modules=["q_proj"], embedder_and_normalizer=None)
    assert cfg.lora_view() is cfg.lora_view()
    assert cfg.lora_view() == ft.LoRAConfig(r=2, target_modules=["q_proj"])
