"""The shim's restructured adapters (functuner/shim/restructure.py): LLaMA-Pro as ms-swift 4.6 builds it.

ms-swift's ``Swift.prepare_model(model, LLaMAProConfig(...))`` (swift/tuners/llamapro.py, ms-swift 4.6.0:
``LLaMAPro.prepare_model``) inserts deep copies of layers with o_proj/down_proj zeroed into the layer list
and updates ``num_hidden_layers``.  Side by side with the real ms-swift (names, groups, saved files, the whole
expanded model): tests/swift_interop/scenarios.py, case ``llamapro``.  Here: the model the shim builds against
functuner's own functional ``llamapro.expand`` and the shim's all-or-nothing contract.
"""

from __future__ import annotations

import pathlib
import warnings

import pytest
import torch
from models import tiny_llama
from safetensors.torch import load_file, save_file

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, TargetError

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
NEW = ("model.layers.1.", "model.layers.3.")  # SWIFT's indices of the 2 new blocks in a 2-layer model


def _cfg(num_new_blocks: int = 2) -> ft.LLaMAProConfig:
    return ft.LLaMAProConfig(model_type="llama", num_new_blocks=num_new_blocks)


def _snapshot(model: torch.nn.Module) -> tuple[object, int, list[object], list[int]]:
    layers = model.model.layers
    return layers, model.config.num_hidden_layers, list(layers), [m.self_attn.layer_idx for m in layers]


def _trained(sm: ft.SwiftModel) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k in sorted(sm.adapters["default"].tensors):
            sm.adapters["default"].tensors[k].add_(
                0.05 * torch.randn(sm.adapters["default"].tensors[k].shape, generator=gen)
            )


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_prepare_model_inserts_swifts_layers():
    model = tiny_llama()
    base = _logits(model)
    originals = list(model.model.layers)
    sm = ft.Swift.prepare_model(model, _cfg())
    layers = model.model.layers
    assert len(layers) == 4 and model.config.num_hidden_layers == 4
    assert layers[0] is originals[0] and layers[2] is originals[1]  # the originals keep their objects
    assert [m.self_attn.layer_idx for m in layers] == [0, 1, 2, 3]
    for new, src in ((layers[1], originals[0]), (layers[3], originals[1])):
        assert torch.equal(new.self_attn.q_proj.weight, src.self_attn.q_proj.weight)
        assert not new.self_attn.o_proj.weight.any() and not new.mlp.down_proj.weight.any()
    trainable = sorted(n for n, p in sm.named_parameters() if p.requires_grad)
    want = sorted(f"base_model.{n}" for n, _ in model.named_parameters() if n.startswith(NEW))
    assert trainable == want and len(want) == 18
    assert (
        sm.adapters["default"].config.num_groups == 2
        and "inserted_layers" not in sm.adapters["default"].config.to_dict()
    )
    torch.testing.assert_close(_logits(sm), base, rtol=0, atol=1e-6)  # zeroed projections: the base model
    groups = sm.create_optimizer_param_groups(lr=1e-3, weight_decay=0.1)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(
        id(p) for n, p in sm.named_parameters() if p.requires_grad
    )


def test_the_shim_model_is_the_functional_expand_and_deactivation_gives_the_base():
    model = tiny_llama()
    base = _logits(model)
    params = ft.init(tiny_llama(), _cfg(), generator=0)
    params = params.map(lambda t: t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(2)))
    sm = ft.Swift.prepare_model(model, _cfg())
    sm.load_state_dict(ft.io.keys.to_swift_state_dict(dict(params)), adapter_name="default")  # SWIFT's names
    state, config = ft.tuners.llamapro.expand(tiny_llama(), params)
    assert config.num_hidden_layers == 4
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    active = _logits(sm)
    torch.testing.assert_close(active, ft.apply(tiny_llama(), params, (IDS,)).logits, rtol=1e-5, atol=1e-5)
    sm.deactivate_adapter("default")
    torch.testing.assert_close(_logits(sm), base, rtol=0, atol=1e-6)
    sm.activate_adapter("default")
    assert torch.equal(_logits(sm), active)
    cached = sm.generate(IDS, max_new_tokens=3, do_sample=False)  # the KV cache has a layer per inserted layer
    assert torch.equal(cached, sm.generate(IDS, max_new_tokens=3, do_sample=False, use_cache=False))


def test_save_and_load_are_swifts_files_into_the_expanded_model(tmp_path: pathlib.Path):
    sm = ft.Swift.prepare_model(tiny_llama(), _cfg())
    _trained(sm)
    out = _logits(sm)
    sm.save_pretrained(str(tmp_path))
    saved = load_file(tmp_path / "default" / "adapter_model.safetensors")
    assert {k.split(".")[2] for k in saved} == {"1", "3"} and len(saved) == 18
    assert all(torch.equal(v, sm.base_model.state_dict()[k]) for k, v in saved.items())
    loaded = ft.Swift.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    assert len(loaded.base_model.model.layers) == 4 and loaded.base_model.config.num_hidden_layers == 4
    torch.testing.assert_close(_logits(loaded), out, rtol=1e-5, atol=1e-6)
    assert sorted(n for n, p in loaded.named_parameters() if p.requires_grad) == sorted(
        n for n, p in sm.named_parameters() if p.requires_grad
    )  # loaded blocks stay trainable (a resume trains them; SWIFT leaves them frozen: docs/swift.md)
    again = tmp_path / "again"
    loaded.save_pretrained(str(again))
    resaved = load_file(again / "default" / "adapter_model.safetensors")
    assert resaved.keys() == saved.keys() and all(torch.equal(resaved[k], saved[k]) for k in saved)


def test_merge_leaves_the_expanded_model_as_swift_does():
    # ms-swift 4.6's Swift.merge/unmerge touch LoRA layers only and merge_and_unload unloads LoRA only: the
    # LLaMA-Pro adapter and its layers stay (swift/tuners/base.py, Swift.merge_and_unload)
    sm = ft.Swift.prepare_model(tiny_llama(), _cfg())
    _trained(sm)
    out = _logits(sm)
    ft.Swift.merge(sm)
    ft.Swift.unmerge(sm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ft.Swift.merge_and_unload(sm)
    assert any("LLAMAPRO" in str(w.message) or "default" in str(w.message) for w in caught)
    assert "default" in sm.adapters and len(sm.base_model.model.layers) == 4
    assert torch.equal(_logits(sm), out)


def test_a_failed_prepare_or_load_changes_nothing(tmp_path: pathlib.Path):
    model = tiny_llama()
    before = _snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def unchanged() -> None:
        now = _snapshot(model)
        assert now[0] is before[0] and now[1:] == before[1:]
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert all(p.requires_grad for p in model.parameters())

    with pytest.raises(ConfigError, match="does not divide"):
        ft.Swift.prepare_model(model, _cfg(num_new_blocks=3))
    unchanged()
    # another adapter of the same call fails after the layers were inserted: they are taken out again
    with pytest.raises(TargetError, match="no_such"):
        ft.Swift.prepare_model(model, {"pro": _cfg(), "bad": ft.LoRAConfig(r=2, target_modules=["no_such"])})
    unchanged()
    # a checkpoint whose tensors do not fit: the layers were inserted before the tensors are checked
    sm = ft.Swift.prepare_model(tiny_llama(), _cfg())
    sm.save_pretrained(str(tmp_path))
    path = tmp_path / "default" / "adapter_model.safetensors"
    broken = load_file(path)
    broken.pop("model.layers.3.mlp.up_proj.weight")
    save_file(broken, str(path))
    with pytest.raises(ParamsMismatchError, match="up_proj"):
        ft.Swift.from_pretrained(model, str(tmp_path))
    unchanged()
    # another adapter's tensors already in the layers: copying them into new blocks is refused
    lora = ft.Swift.prepare_model(model, ft.LoRAConfig(r=2, target_modules=["q_proj"]))
    names = sorted(n for n, _ in lora.named_parameters())
    with pytest.raises(ConfigError, match="add the LLaMA-Pro adapter first"):
        ft.Swift.prepare_model(lora, {"pro": _cfg()})
    assert len(model.model.layers) == 2 and sorted(n for n, _ in lora.named_parameters()) == names
    assert model.config.num_hidden_layers == 2
