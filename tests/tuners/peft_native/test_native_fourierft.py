"""Native FourierFT against real PEFT: parity rows (see ``native_peft_helpers``), checkpoints both ways, torch.func, shim.

Rows: PEFT's FourierFT rows of ``tests/test_custom_models.py`` (huggingface/peft@5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40:
"Vanilla MLP 1/2/3/5/6/7 FourierFT" on PEFT's MLP, ``n_frequency=10`` or ``n_frequency_pattern``) plus a transformers
Llama built from a config and GPT-2 (``Conv1D``).  PEFT's rows set ``init_weights=True`` (identity start); here the
spectrum is PEFT's random default (``init_weights=False``) so that parity is not vacuous.
"""

from __future__ import annotations

import peft
import pytest
import torch
from native_peft_helpers import (
    MODELS,
    assert_parity,
    check_peft_round_trip,
    check_swift_round_trip_grad_and_vmap,
    make_pair,
    mlp,
)

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, UnsupportedModuleError
from functuner.tuners.fourierft import FourierFTConfig

ROWS = {
    "peft-mlp-1-regex": ("peft_mlp", {"n_frequency": 10, "target_modules": "lin0"}),
    "peft-mlp-2": ("peft_mlp", {"n_frequency": 10, "target_modules": ["lin0"]}),
    "peft-mlp-3": ("peft_mlp", {"n_frequency": 10, "target_modules": ["lin1"]}),
    "peft-mlp-5-mts": ("peft_mlp", {"n_frequency": 10, "target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    "peft-mlp-6-mts": (
        "peft_mlp",
        {"n_frequency": 10, "target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"]},
    ),
    "peft-mlp-7-pattern": (
        "peft_mlp",
        {
            "n_frequency_pattern": {"lin0": 5, "lin1": 10},
            "target_modules": ["lin0", "lin1"],
            "modules_to_save": ["lin1"],
        },
    ),
    "llama": (
        "llama",
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "n_frequency": 24, "n_frequency_pattern": {"v_proj": 8}},
    ),
    "gpt2-conv1d": ("gpt2", {"target_modules": ["c_attn", "mlp.c_proj"], "n_frequency": 24, "scaling": 30.0}),
}


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")  # PEFT's own note on Conv1D
@pytest.mark.parametrize("row", list(ROWS))
def test_fourierft_parity_with_peft(row: str) -> None:
    model_name, kwargs = ROWS[row]
    build, inputs = MODELS[model_name]
    model = build()
    p, pm = make_pair(model, FourierFTConfig(**kwargs), peft.FourierFTConfig(**kwargs))
    assert_parity(model, inputs(), p, pm)


@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_peft_loads_our_save_and_we_load_peft_save(adapter_name: str, tmp_path) -> None:
    build, inputs = MODELS["llama"]
    model, x = build(), inputs()
    cfg = {"target_modules": ["q_proj", "v_proj"], "n_frequency": 16, "random_loc_seed": 3}
    p = ft.init(model, FourierFTConfig(**cfg), generator=3, adapter_name=adapter_name)
    check_peft_round_trip(tmp_path, model, x, p, peft.FourierFTConfig(**cfg), "FOURIERFT")


def test_swift_round_trip_peft_config_init_grad_and_vmap(tmp_path) -> None:
    model = mlp()
    p1 = ft.init(model, peft.FourierFTConfig(target_modules=["lin1", "lin2"], n_frequency=12), generator=1)
    assert isinstance(p1.config, FourierFTConfig)
    check_swift_round_trip_grad_and_vmap(tmp_path, model, p1)


def test_errors_name_the_problem() -> None:
    model = mlp()
    with pytest.raises(ConfigError, match=r"n_frequency=500 for module 'lin2' exceeds its 8 x 16"):
        ft.init(model, FourierFTConfig(target_modules=["lin2"], n_frequency=500), generator=0)
    with pytest.raises(ConfigError, match="bias='lora_only'"):
        FourierFTConfig(target_modules=["lin1"], bias="lora_only")
    with pytest.raises(UnsupportedModuleError, match=r"'0' of type Embedding"):
        ft.init(torch.nn.Sequential(torch.nn.Embedding(4, 3)), FourierFTConfig(target_modules=["0"]), generator=0)
    p = ft.init(model, FourierFTConfig(target_modules=["lin1"], n_frequency=4), generator=0)
    with pytest.raises(ParamsMismatchError, match=r"lin1\.fourierft_spectrum\.default.*\(5,\).*\(4,\)"):
        ft.validate(model, p.replace({"lin1.fourierft_spectrum.default": torch.ones(5)}))


def test_shim_merges_and_unmerges_exactly_and_peft_configs_still_go_to_peft() -> None:
    x = torch.randn(3, 12)
    cfg = FourierFTConfig(target_modules=["lin1", "lin2"], n_frequency=12)
    sm = ft.Swift.prepare_model(mlp(), cfg)
    assert isinstance(sm, ft.SwiftModel)
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    out = sm(x)
    assert (out - mlp()(x)).abs().max() > 1e-3
    ft.Swift.merge(sm)
    torch.testing.assert_close(sm(x), out, atol=1e-5, rtol=1e-5)
    ft.Swift.unmerge(sm)
    assert all(torch.equal(v, before[k]) for k, v in sm.state_dict().items())
    pm = ft.Swift.prepare_model(mlp(), peft.FourierFTConfig(target_modules=["lin1"], n_frequency=12))
    assert isinstance(pm, peft.PeftModel)
