"""The five tuners (LongLoRA, ReFT, LLaMA-Pro, SCEdit, Res-Tuning) through the stateful SWIFT shim:
deactivate -> base outputs exactly, reactivate -> the same active outputs, save_pretrained ->
from_pretrained into a fresh model -> identical outputs and state dict, SWIFT's key names on disk."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from conftest import tiny_llama, tiny_vit
from safetensors.torch import load_file

import functuner as ft
from functuner import Swift, SwiftModel

_spec = importlib.util.spec_from_file_location(
    "make_tuner_fixtures2", pathlib.Path(__file__).parents[1] / "fixtures" / "make_tuner_fixtures2.py"
)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)


def _unet():
    torch.manual_seed(0)
    return _mod.ToyUNet().eval()


IDS = torch.arange(16).view(2, 8)
IMG = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
CASES = {
    "longlora": (
        tiny_llama,
        lambda: ft.LongLoRAConfig(r=2, target_modules=["q_proj"]),
        IDS,
        ["model.layers.0.self_attn.q_proj.lora_A.default.weight", "model.norm.weight"],
    ),
    "reft": (
        tiny_llama,
        lambda: ft.ReftConfig(model_type="llama", layers=[1], r=2),
        IDS,
        ["model.layers.1.reft_default.rotate_layer"],
    ),
    "llamapro": (
        tiny_llama,
        lambda: ft.LLaMAProConfig(model_type="llama", num_new_blocks=2),
        IDS,
        ["model.layers.1.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"],
    ),
    "scetuning": (
        _unet,
        lambda: ft.SCETuningConfig(dims=[8, 8], target_modules=["up.0", "up.1"]),
        IMG,
        ["up.1.scetuner_default.tuner_op.ln2.weight"],
    ),
    "restuning": (
        lambda: tiny_vit(image_size=8),
        lambda: ft.ResTuningConfig(
            dims=32,
            root_modules=r"vit\.embeddings",
            root_modules_hook="output",
            stem_modules=r"vit\.layers\.\d+",
            target_modules=r"vit\.layernorm",
            tuner_cfg="res_adapter",
        ),
        IMG,
        ["restuning_default.bypass_blocks.1.vertical_tuner.tuner.ln1.weight"],
    ),
}


def _out(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_shim_activation_and_checkpoint_round_trip(name, tmp_path):
    make, config, x, disk_keys = CASES[name]
    model = make()
    base = _out(model, x)
    sm = Swift.prepare_model(model, config())
    adapter = sm.adapters["default"]
    gen = torch.Generator().manual_seed(1)

    def perturb(keys):
        with torch.no_grad():
            for k in sorted(keys):
                adapter.tensors[k].add_(torch.randn(adapter.tensors[k].shape, generator=gen) * 0.1)

    # LLaMA-Pro's tensors are the model's own inserted layers (SWIFT's form): all of them are the adapter's
    own_layers = name == "llamapro"
    perturb(set(adapter.tensors) - (set() if own_layers else adapter.shared))
    active = _out(sm, x)
    assert not torch.allclose(active, base)
    sm.deactivate_adapter("default")
    assert torch.equal(_out(sm, x), base)
    sm.activate_adapter("default")
    assert torch.equal(_out(sm, x), active)
    # LongLoRA's embedder/normalizer are the model's own parameters (trained in place, as in SWIFT)
    assert bool(adapter.shared) == (name in ("longlora", "llamapro"))
    perturb(set() if own_layers else adapter.shared)
    active = _out(sm, x)
    sm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "default" / "adapter_model.safetensors")
    assert set(disk_keys) <= set(saved)
    # trainable like the saved one: torch.matmul folds batch dims differently when a weight requires grad
    # (about 4e-8 apart in fp32), so compare like with like
    loaded = SwiftModel.from_pretrained(make(), str(tmp_path), inference_mode=False)
    assert torch.equal(_out(loaded, x), active)
    a, b = sm.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_tuners_compose_functionally():
    """LoRA + LLaMA-Pro + ReFT on one model: identity-initialised tuners change nothing exactly, trained ones add up."""
    model = tiny_llama()
    ids = IDS
    lora = ft.init(model, ft.LoRAConfig(r=2, target_modules=["q_proj"]), generator=0)  # B = 0
    pro = ft.init(model, ft.LLaMAProConfig(model_type="llama", num_new_blocks=2), generator=0)  # zero projections
    reft = ft.init(model, ft.ReftConfig(model_type="llama", layers=[0], r=2), generator=0)
    alone = ft.apply(model, reft, (ids,)).logits
    assert torch.equal(ft.apply(model, [lora, pro, reft], (ids,)).logits, alone)
    gen = torch.Generator().manual_seed(3)
    pro = pro.map(lambda t: t + 0.05 * torch.randn(t.shape, generator=gen))
    both = ft.apply(model, [reft, pro], (ids,)).logits
    assert not torch.allclose(both, alone) and not torch.allclose(both, ft.apply(model, pro, (ids,)).logits)
    grads = torch.func.grad(lambda ps: ft.apply(model, ps, (ids,), {"labels": ids}).loss)([lora, pro, reft])
    assert [set(g) for g in grads] == [set(lora), set(pro), set(reft)]
    assert torch.equal(model(ids).logits, tiny_llama()(ids).logits)  # the model itself never changed
