"""Native OFT against real PEFT: parity rows (see ``native_peft_helpers``), checkpoints both ways, torch.func, shim.

Rows: PEFT's OFT rows of ``tests/test_custom_models.py`` (huggingface/peft@5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40:
"Vanilla MLP 1/2/5/6/7/8/9/10/11/12/13 OFT" and "Conv2d 1/3/4/5 OFT", on PEFT's toy models) plus a transformers Llama
built from a config (Neumann and exact Cayley).  Not covered natively: PEFT's "Embedding + transformers Conv1D" OFT
rows (``nn.Embedding`` is refused with ``UnsupportedModuleError``; the shim passes ``peft.OFTConfig`` to PEFT).
``init_weights=False`` everywhere so that parity is not vacuous (PEFT's rows start from the identity).
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
from functuner.tuners.oft import OFTConfig

NO_NEUMANN = {"use_cayley_neumann": False}
ROWS = {
    "peft-mlp-1-regex": ("peft_mlp", {"r": 2, "oft_block_size": 0, "target_modules": "lin0", **NO_NEUMANN}),
    "peft-mlp-2": ("peft_mlp", {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], **NO_NEUMANN}),
    "peft-mlp-5-mts": (
        "peft_mlp",
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "modules_to_save": ["lin1"], **NO_NEUMANN},
    ),
    "peft-mlp-6-module_dropout": (
        "peft_mlp",
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "module_dropout": 0.1, **NO_NEUMANN},
    ),
    "peft-mlp-7-coft": (
        "peft_mlp",
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "coft": True, "eps": 1e-2},
    ),
    "peft-mlp-8-share": (
        "peft_mlp",
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "block_share": True, **NO_NEUMANN},
    ),
    "peft-mlp-9-coft-share": (
        "peft_mlp",
        {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "coft": True, "eps": 1e-2, "block_share": True},
    ),
    "peft-mlp-10": ("peft_mlp", {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "use_cayley_neumann": True}),
    "peft-mlp-11": ("peft_mlp", {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], **NO_NEUMANN}),
    "peft-mlp-12": (
        "peft_mlp",
        {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "coft": True, "eps": 1e-2, "block_share": True},
    ),
    "peft-mlp-13": (
        "peft_mlp",
        {
            "r": 0,
            "oft_block_size": 2,
            "target_modules": ["lin0"],
            "coft": True,
            "eps": 1e-2,
            "block_share": True,
            **NO_NEUMANN,
        },
    ),
    "peft-conv2d-1": ("peft_conv2d", {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"]}),
    # PEFT's "Conv2d 3/5 OFT" use the default eps=6e-5, which keeps the rotation within 1e-3 of the identity; a
    # larger eps makes the parity check non-vacuous
    "peft-conv2d-3-coft": (
        "peft_conv2d",
        {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True, "eps": 0.5},
    ),
    "peft-conv2d-4-share": (
        "peft_conv2d",
        {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "block_share": True},
    ),
    "peft-conv2d-5": (
        "peft_conv2d",
        {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True, "block_share": True, "eps": 0.5},
    ),
    "llama-neumann": ("llama", {"oft_block_size": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "llama-exact": ("llama", {"r": 4, "oft_block_size": 0, "target_modules": ["k_proj", "up_proj"], **NO_NEUMANN}),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_oft_parity_with_peft(row: str) -> None:
    model_name, kwargs = ROWS[row]
    build, inputs = MODELS[model_name]
    model = build()
    p, pm = make_pair(model, OFTConfig(init_weights=False, **kwargs), peft.OFTConfig(init_weights=False, **kwargs))
    assert_parity(model, inputs(), p, pm)


@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_peft_loads_our_save_and_we_load_peft_save(adapter_name: str, tmp_path) -> None:
    build, inputs = MODELS["llama"]
    model, x = build(), inputs()
    cfg = {"oft_block_size": 8, "target_modules": ["q_proj", "v_proj"], "init_weights": False}
    p = ft.init(model, OFTConfig(**cfg), generator=3, adapter_name=adapter_name)
    check_peft_round_trip(tmp_path, model, x, p, peft.OFTConfig(**cfg), "OFT")


def test_swift_round_trip_peft_config_init_grad_and_vmap(tmp_path) -> None:
    model = mlp()
    p1 = ft.init(
        model, peft.OFTConfig(oft_block_size=4, target_modules=["lin1", "lin2"], init_weights=False), generator=1
    )
    assert isinstance(p1.config, OFTConfig)
    check_swift_round_trip_grad_and_vmap(tmp_path, model, p1)


def test_errors_and_adjustment_warnings_name_the_problem() -> None:
    model = mlp()
    with pytest.raises(ConfigError, match="exactly one of r"):
        OFTConfig(r=2, oft_block_size=4, target_modules=["lin1"])
    with pytest.warns(UserWarning, match=r"lin1: Invalid `oft_block_size` \(5\)! Adjusted `oft_block_size` to \(4\)"):
        p = ft.init(model, OFTConfig(oft_block_size=5, target_modules=["lin1"]), generator=0)
    assert p["lin1.oft_R.default.weight"].shape == (3, 6)
    with pytest.raises(UnsupportedModuleError, match=r"'0' of type Embedding"):
        ft.init(
            torch.nn.Sequential(torch.nn.Embedding(4, 4)),
            OFTConfig(oft_block_size=2, target_modules=["0"]),
            generator=0,
        )
    with pytest.raises(ParamsMismatchError, match=r"lin1\.oft_R\.default\.weight.*\(3, 5\).*\(3, 6\)"):
        ft.validate(model, p.replace({"lin1.oft_R.default.weight": torch.ones(3, 5)}))


def test_shim_merges_and_unmerges_and_peft_configs_still_go_to_peft() -> None:
    x = torch.randn(3, 12)
    cfg = OFTConfig(oft_block_size=4, target_modules=["lin1", "lin2"], init_weights=False)
    sm = ft.Swift.prepare_model(mlp(), cfg)
    assert isinstance(sm, ft.SwiftModel)
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    out = sm(x)
    assert (out - mlp()(x)).abs().max() > 1e-3
    ft.Swift.merge(sm)
    torch.testing.assert_close(sm(x), out, atol=1e-5, rtol=1e-5)
    ft.Swift.unmerge(sm)
    assert all(torch.equal(v, before[k]) for k, v in sm.state_dict().items())
    pm = ft.Swift.prepare_model(mlp(), peft.OFTConfig(oft_block_size=4, target_modules=["lin1"]))
    assert isinstance(pm, peft.PeftModel)
