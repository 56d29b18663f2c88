"""Res-Tuning on a tiny ViT (res_adapter, scale_channel) and a UNet-shaped toy (gate, zero, upsample with conv,
group adapter, scalar weight): init, grads, bad configs.

Parity with SWIFT's own ResTuning (outputs, deactivation, keys, loading SWIFT's files): rows restuning and
restuning4d of tests/tuners/test_swift_parity.py.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch
from models import RESTUNING_VIT, ToyUNet, tiny_vit
from safetensors.torch import load_file

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, TargetError

FIX = pathlib.Path(__file__).parents[1] / "fixtures"
_spec = importlib.util.spec_from_file_location("make_tuner_fixtures2", FIX / "make_tuner_fixtures2.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)  # RESTUNING_4D: the config SWIFT's side used


def _vit_case():
    data = load_file(FIX / "tuners2" / "restuning.safetensors")
    model = tiny_vit(**RESTUNING_VIT)
    model.load_state_dict({k[6:]: v for k, v in data.items() if k.startswith("base::")})
    config = ft.ResTuningConfig.from_dict(json.loads((FIX / "tuners2" / "restuning_config.json").read_text()))
    adapter = {k[len("adapter::") :]: v for k, v in data.items() if k.startswith("adapter::")}
    return model, config, data, adapter


def _unet_case():
    data = load_file(FIX / "tuners2" / "restuning4d.safetensors")
    model = ToyUNet()
    model.load_state_dict({k[6:]: v for k, v in data.items() if k.startswith("base::")})
    adapter = {k[len("adapter::") :]: v for k, v in data.items() if k.startswith("adapter::")}
    return model, ft.ResTuningConfig(**_mod.RESTUNING_4D), data, adapter


def test_vit_init_has_the_scale_channel_vertical_tuner():
    # (keys, outputs, deactivation against SWIFT's: test_swift_parity.py, row restuning)
    model, config, data, adapter = _vit_case()
    p = ft.init(model, config, generator=0)
    assert "restuning_default.bypass_blocks.1.vertical_tuner.tuner.scaling" in p


def test_unet_toy_upsample_conv_starts_at_zero():
    # (keys and outputs for every tuner kind against SWIFT's: test_swift_parity.py, row restuning4d)
    model, config, data, adapter = _unet_case()
    p = ft.init(model, config, generator=0)
    assert torch.equal(p["restuning_default.bypass_blocks.0.aux_tuner.tuner.conv.weight"], torch.zeros(8, 8, 3, 3))


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
    with pytest.raises(ConfigError, match="tuner_cfg"):  # an unset required field fails at init (as in SWIFT)
        ft.init(model, ft.ResTuningConfig(dims=16, stem_modules="x", target_modules="y"), generator=0)
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
