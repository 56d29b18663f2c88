"""PEFT's checkpoint layout for native (IA)³ / LoHa / LoKr: PEFT loads our saves and we load PEFT's, equal outputs.

Each tuner's ``peft`` hook is its ``PEFT_FORMAT`` with ``shim_reads=False``: ``functuner.save(format="peft")`` and
``functuner.load`` use it, while ``Swift.from_pretrained`` still hands PEFT directories of these types to ``peft``
(pinned by ``tests/io/test_peft_passthrough.py`` and by the last test here).
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from native_peft_helpers import MODELS, out_of
from safetensors.torch import load_file

import functuner as ft
from functuner.errors import CheckpointError
from functuner.tuners.ia3 import IA3Config
from functuner.tuners.loha import LoHaConfig
from functuner.tuners.lokr import LoKrConfig

ROWS = {
    "ia3-mlp-modules_to_save": (
        "mlp",
        IA3Config,
        peft.IA3Config,
        {
            "target_modules": ["lin1", "lin2"],
            "feedforward_modules": ["lin2"],
            "modules_to_save": ["head"],
            "init_ia3_weights": False,
        },
    ),
    "loha-conv-effective": (
        "conv",
        LoHaConfig,
        peft.LoHaConfig,
        {"target_modules": ["c1", "c2"], "r": 2, "use_effective_conv2d": True, "init_weights": False},
    ),
    "lokr-llama": (
        "llama",
        LoKrConfig,
        peft.LoKrConfig,
        {"target_modules": ["q_proj", "v_proj"], "r": 2, "rank_pattern": {"v_proj": 1}, "init_weights": False},
    ),
}


@pytest.mark.parametrize("adapter_name", ["default", "other"])
@pytest.mark.parametrize("row", list(ROWS))
def test_peft_loads_our_save(row: str, adapter_name: str, tmp_path) -> None:
    model_name, ours_cls, _, kwargs = ROWS[row]
    build, inputs = MODELS[model_name]
    model, x = build(), inputs()
    p = ft.init(model, ours_cls(**kwargs), generator=3, adapter_name=adapter_name)
    ft.save(p, tmp_path, format="peft")
    folder = tmp_path if adapter_name == "default" else tmp_path / adapter_name
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == p.config.peft_type
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder, adapter_name=adapter_name).eval()
    torch.testing.assert_close(out_of(pm(**x)), out_of(ft.apply(model, p, kwargs=x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row", list(ROWS))
def test_we_load_peft_save(row: str, tmp_path) -> None:
    model_name, ours_cls, theirs_cls, kwargs = ROWS[row]
    build, inputs = MODELS[model_name]
    model, x = build(), inputs()
    pm = peft.get_peft_model(copy.deepcopy(model), theirs_cls(**kwargs)).eval()
    pm.save_pretrained(tmp_path)
    p = ft.load(tmp_path, model)
    assert isinstance(p.config, ours_cls) and p.adapter_name == "default"
    on_disk = load_file(tmp_path / "adapter_model.safetensors")
    assert len(p) == len(on_disk)
    torch.testing.assert_close(out_of(ft.apply(model, p, kwargs=x)), out_of(pm(**x)), atol=1e-5, rtol=1e-5)


def test_keys_round_trip_and_foreign_keys_are_refused() -> None:
    build, _ = MODELS["mlp"]
    model = build()
    p = ft.init(model, LoHaConfig(target_modules=["lin1"], r=2), generator=0, adapter_name="a1")
    disk = ft.to_peft_state_dict(p)
    assert sorted(disk) == [f"base_model.model.lin1.hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b")]
    back = ft.from_peft_state_dict(disk, "a1", config=p.config)
    assert set(back) == set(p) and all(back[k] is p[k] for k in p)
    with pytest.raises(CheckpointError, match="lokr_w1"):
        ft.from_peft_state_dict({"base_model.model.lin1.lokr_w1": torch.ones(2, 2)}, config=p.config)


@pytest.mark.parametrize("row", list(ROWS))
def test_swift_format_round_trip(row: str, tmp_path) -> None:
    model_name, ours_cls, _, kwargs = ROWS[row]
    build, inputs = MODELS[model_name]
    model = build()
    p = ft.init(model, ours_cls(**kwargs), generator=4, adapter_name="mine")
    ft.save(p, tmp_path)
    back = ft.load(tmp_path, model)
    assert (back.config, back.adapter_name, set(back)) == (p.config, "mine", set(p))
    assert all(torch.equal(back[k], p[k]) for k in p)


def test_adapter_renaming_and_targets_come_from_key_naming() -> None:
    from functuner.io.keys import adapter_modules, rename_adapter

    build, _ = MODELS["mlp"]
    p = ft.init(build(), LoKrConfig(target_modules=["lin1", "lin2"], r=1, modules_to_save=["head"]), generator=0)
    renamed = rename_adapter(p, "default", "x")
    assert sorted(renamed) == sorted(k.replace(".default", ".x") for k in p)
    assert adapter_modules(p, p.config, "default") == ["lin1", "lin2"]


def test_hooks_are_registered_and_the_shim_still_passes_peft_directories_to_peft(tmp_path) -> None:
    from functuner.tuners import REGISTRY, ia3, loha, lokr

    for mod in (ia3, loha, lokr):
        assert REGISTRY[mod.tuner.swift_type].peft is mod.PEFT_FORMAT and not mod.PEFT_FORMAT.shim_reads
    build, inputs = MODELS["mlp"]
    model, x = build(), inputs()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoHaConfig(target_modules=["lin1"], r=2, init_weights=False))
    pm.save_pretrained(tmp_path)
    loaded = ft.Swift.from_pretrained(copy.deepcopy(model), tmp_path)
    assert isinstance(loaded, peft.PeftModel)
    p = ft.load(tmp_path, model)
    assert isinstance(p.config, LoHaConfig)
    torch.testing.assert_close(out_of(ft.apply(model, p, kwargs=x)), out_of(loaded.eval()(**x)), atol=1e-5, rtol=1e-5)
