"""SCEdit on a UNet-shaped toy model: the adapter formula, grads, bad configs.

Parity with SWIFT's own SCETuning (keys, init and trained outputs, deactivation): rows scetuning:decoder and
scetuning:encoder of tests/tuners/test_swift_parity.py.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from models import ToyUNet
from safetensors.torch import load_file

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, TargetError
from functuner.tuners.scetuning import sce_adapter

FIX = pathlib.Path(__file__).parents[1] / "fixtures"
DATA = load_file(FIX / "tuners2" / "scetuning.safetensors")
CONFIGS = {
    "decoder": dict(dims=[8, 8], target_modules=["up.0", "up.1"], tuner_mode="decoder", down_ratio=0.5),
    "encoder": dict(dims=8, target_modules="down", tuner_mode="encoder", down_ratio=1.0),
}


def _model():
    model = ToyUNet()
    model.load_state_dict({k[len("base::") :]: v for k, v in DATA.items() if k.startswith("base::")})
    return model


def test_adapter_formula_on_tokens_and_images():
    g = torch.Generator().manual_seed(0)
    t = {
        "ln1.weight": torch.randn(3, 5, generator=g),
        "ln1.bias": torch.randn(3, generator=g),
        "ln2.weight": torch.randn(5, 3, generator=g),
        "ln2.bias": torch.randn(5, generator=g),
    }
    img = torch.randn(2, 5, 4, 3, generator=g)
    tokens = img.permute(0, 2, 3, 1)  # channel-last: the same numbers as tokens
    by_hand = (
        tokens
        + torch.nn.functional.gelu(tokens @ t["ln1.weight"].T + t["ln1.bias"]) @ t["ln2.weight"].T
        + t["ln2.bias"]
    )
    torch.testing.assert_close(sce_adapter(img, t).permute(0, 2, 3, 1), by_hand)
    torch.testing.assert_close(sce_adapter(tokens.reshape(2, 12, 5), t), by_hand.reshape(2, 12, 5))


def test_grads_only_to_tuner_params():
    model = _model()
    swift = {k.split("::", 1)[1]: v for k, v in DATA.items() if k.startswith("decoder::")}
    p = ft.TunerParams(swift, ft.SCETuningConfig(**CONFIGS["decoder"]))
    grads = torch.func.grad(lambda q: ft.apply(model, q, (DATA["x"],)).square().mean())(p)
    assert set(grads) == set(p) and all(g.abs().sum() > 0 for g in grads.values())
    assert all(q.grad is None for q in model.parameters())


def test_bad_configs_raise_clearly_and_change_nothing():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="tuner_mode"):
        ft.SCETuningConfig(dims=8, target_modules="up", tuner_mode="middle")
    with pytest.raises(ConfigError, match="dims"):
        ft.SCETuningConfig(dims=0, target_modules="up")
    with pytest.raises(TargetError, match="up.7"):
        ft.init(model, ft.SCETuningConfig(dims=8, target_modules=["up.7"]), generator=0)
    with pytest.raises(ConfigError, match="dims has 3 entries"):
        ft.init(model, ft.SCETuningConfig(dims=[8, 8, 8], target_modules=["up.0", "up.1"]), generator=0)
    with pytest.raises(TargetError, match="hint_modules"):
        ft.init(
            model, ft.SCETuningConfig(dims=8, target_modules=["up.0", "up.1"], hint_modules=["down.0"]), generator=0
        )
    p = ft.init(model, ft.SCETuningConfig(dims=16, target_modules="down", tuner_mode="encoder"), generator=0)
    with pytest.raises(ConfigError, match="has 8 channels, dims says 16"):
        ft.apply(model, p, (DATA["x"],))
    p = ft.init(model, ft.SCETuningConfig(**CONFIGS["decoder"]), generator=0)
    with pytest.raises(ParamsMismatchError, match="ln1.weight"):
        ft.validate(model, p.replace({"up.0.scetuner_default.tuner_op.ln1.weight": torch.zeros(2, 2)}))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
