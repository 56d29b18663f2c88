"""Res-Tuning, compared with SWIFT's own ResTuning (fixtures from the real ms-swift): a tiny ViT (res_adapter,
scale_channel) and a UNet-shaped toy (gate, zero, upsample with conv, group adapter, scalar weight)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch
import transformers
from safetensors.torch import load_file

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, TargetError

FIX = pathlib.Path(__file__).parents[1] / "fixtures"
_spec = importlib.util.spec_from_file_location("make_tuner_fixtures2", FIX / "make_tuner_fixtures2.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)


def _vit_case():
    data = load_file(FIX / "tuners2" / "restuning.safetensors")
    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = transformers.ViTForImageClassification(cfg).eval()
    model.load_state_dict({k[6:]: v for k, v in data.items() if k.startswith("base::")})
    config = ft.ResTuningConfig.from_dict(json.loads((FIX / "tuners2" / "restuning_config.json").read_text()))
    adapter = {k[len("adapter::") :]: v for k, v in data.items() if k.startswith("adapter::")}
    return model, config, data, adapter


def _unet_case():
    data = load_file(FIX / "tuners2" / "restuning4d.safetensors")
    model = _mod.ToyUNet()
    model.load_state_dict({k[6:]: v for k, v in data.items() if k.startswith("base::")})
    adapter = {k[len("adapter::") :]: v for k, v in data.items() if k.startswith("adapter::")}
    return model, ft.ResTuningConfig(**_mod.RESTUNING_4D), data, adapter


def test_vit_matches_swift_keys_and_outputs():
    model, config, data, adapter = _vit_case()
    x = data["x"]
    p = ft.init(model, config, generator=0)
    assert sorted(p) == sorted(adapter)
    assert "restuning_default.bypass_blocks.1.vertical_tuner.tuner.scaling" in p
    base = model(x).logits
    assert torch.equal(base, data["base_out"])
    trained = ft.TunerParams(adapter, config)
    out = ft.apply(model, trained, (x,)).logits
    torch.testing.assert_close(out, data["tuned_out"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, base)
    assert torch.equal(model(x).logits, base)  # deactivated: base again
    assert torch.equal(ft.apply(model, trained, (x,)).logits, out)


def test_unet_toy_matches_swift_for_every_tuner_kind():
    model, config, data, adapter = _unet_case()
    p = ft.init(model, config, generator=0)
    assert sorted(p) == sorted(adapter)
    assert torch.equal(p["restuning_default.bypass_blocks.0.aux_tuner.tuner.conv.weight"], torch.zeros(8, 8, 3, 3))
    trained = ft.TunerParams(adapter, config)
    torch.testing.assert_close(ft.apply(model, trained, (data["x"],)), data["tuned_out"], rtol=1e-5, atol=1e-6)


def test_grads_reach_only_the_bypass_and_not_the_backbone():
    model, config, data, adapter = _vit_case()
    trained = ft.TunerParams(adapter, config)
    grads = torch.func.grad(lambda q: ft.apply(model, q, (data["x"],)).logits.square().mean())(trained)
    assert set(grads) == set(trained) and all(g.abs().sum() > 0 for g in grads.values())
    assert all(q.grad is None for q in model.parameters())
    # probes are detached as in SWIFT: backbone parameters get no gradient through the bypass
    model.zero_grad()
    ft.apply(model, trained, (data["x"],)).logits.square().mean().backward()
    assert all(q.grad is None for n, q in model.named_parameters() if n.startswith("vit.layers"))
    assert model.vit.layernorm.weight.grad is not None


def test_bad_configs_raise_clearly_and_change_nothing():
    model, config, data, adapter = _vit_case()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="target_modules_hook"):
        ft.ResTuningConfig(
            dims=16, stem_modules="x", target_modules="y", target_modules_hook="middle", tuner_cfg="res_adapter"
        )
    with pytest.raises(ConfigError, match="tuner_cfg"):
        ft.ResTuningConfig(dims=16, stem_modules="x", target_modules="y")
    with pytest.raises(TargetError, match="stem_modules"):
        ft.init(
            model,
            ft.ResTuningConfig(
                dims=16, stem_modules=r"nope\.\d+", target_modules=r"vit\.layernorm", tuner_cfg="res_adapter"
            ),
            generator=0,
        )
    with pytest.raises(ConfigError, match="dims has 3 entries"):
        ft.init(
            model,
            ft.ResTuningConfig(
                dims=[16, 16, 16],
                stem_modules=r"vit\.layers\.\d+",
                target_modules=r"vit\.layernorm",
                tuner_cfg="res_adapter",
            ),
            generator=0,
        )
    with pytest.raises(ConfigError, match="adapter_weight"):
        ft.init(
            model,
            ft.ResTuningConfig(
                dims=16,
                stem_modules=r"vit\.layers\.\d+",
                target_modules=r"vit\.layernorm",
                tuner_cfg={"lateral_cfg": {"res_adapter": {"adapter_weight": "scale_kv"}}},
            ),
            generator=0,
        )
    wrong_dim = ft.ResTuningConfig(
        dims=12,
        root_modules=r"vit\.embeddings",
        root_modules_hook="output",
        stem_modules=r"vit\.layers\.\d+",
        target_modules=r"vit\.layernorm",
        tuner_cfg="res_adapter",
    )
    with pytest.raises(ConfigError, match="dims=12"):
        ft.apply(model, ft.init(model, wrong_dim, generator=0), (data["x"],))
    trained = ft.TunerParams(adapter, config)
    key = "restuning_default.bypass_blocks.0.lateral_tuner.tuner.ln1.weight"
    with pytest.raises(ParamsMismatchError, match="ln1.weight"):
        ft.validate(model, trained.replace({key: torch.zeros(2, 2)}))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_loads_the_files_swift_saved(tmp_path):
    """SWIFT's adapter_config.json plus its tensors under SWIFT's key names load through the shim."""
    from safetensors.torch import save_file

    model, _, data, adapter = _vit_case()
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "adapter_config.json").write_text((FIX / "tuners2" / "restuning_config.json").read_text())
    save_file(adapter, tmp_path / "default" / "adapter_model.safetensors")
    loaded = ft.SwiftModel.from_pretrained(model, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(data["x"]).logits, data["tuned_out"], rtol=1e-5, atol=1e-6)
