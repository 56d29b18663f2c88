"""The native PEFT-method tuners in the shim: SWIFT's layout round trip, and what is refused (typed, nothing changed).

* ``SwiftModel.save_pretrained`` writes SWIFT's layout (``<adapter>/adapter_config.json`` with ``swift_type``),
  which ``Swift.from_pretrained`` and ``functuner.load`` read back with equal outputs;

* per-sample adapters in one batch (``adapter_names=``): VeRA, FourierFT, OFT, BOFT and AdaLoRA run per sample
  through the general sub-batch path (``Tuner.sub_batch``; PEFT has no mixed batch for them), each sample equal
  to its adapter alone (the full table against PEFT is ``tests/tuners/test_per_sample_all.py``);
* ``add_weighted_adapter``: PEFT combines none of these tuners (AdaLoRA's raises ``TypeError`` in PEFT), so the
  shim refuses with ``ConfigError``.
"""

from __future__ import annotations

import json

import pytest
import torch
from native_peft_helpers import mlp

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners.adalora import AdaLoraConfig
from functuner.tuners.boft import BOFTConfig
from functuner.tuners.fourierft import FourierFTConfig
from functuner.tuners.oft import OFTConfig
from functuner.tuners.vera import VeraConfig

CONFIGS = {
    "vera": VeraConfig(target_modules=["lin1"], r=4, init_weights=False),
    "fourierft": FourierFTConfig(target_modules=["lin1"], n_frequency=8),
    "oft": OFTConfig(target_modules=["lin1"], oft_block_size=4, init_weights=False),
    "boft": BOFTConfig(target_modules=["lin1"], boft_block_size=4, init_weights=False),
    "adalora": AdaLoraConfig(target_modules=["lin1"], init_r=4, total_step=5, init_lora_weights=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_sample_runs_and_combining_is_refused_by_name(name: str) -> None:
    cfg = CONFIGS[name]
    sm = ft.Swift.prepare_model(mlp(), {"a": cfg, "b": cfg}).eval()
    x = torch.randn(3, 12)
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    with torch.no_grad():
        mixed = sm(x, adapter_names=["a", "b", "__base__"])
        inner = sm.base_model
        for i, n in enumerate(["a", "b"]):
            alone = ft.apply(inner, sm.adapters[n].params, (x[i : i + 1],))
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed[2:], mlp()(x[2:]), atol=1e-5, rtol=1e-5)  # the base model
    with pytest.raises(ConfigError, match="add_weighted_adapter"):
        sm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "c")
    assert set(sm.adapters) == {"a", "b"}
    assert all(torch.equal(v, before[k]) for k, v in sm.state_dict().items())


def test_vera_projections_get_no_optimizer_updates_in_the_shim() -> None:
    sm = ft.Swift.prepare_model(mlp(), CONFIGS["vera"])
    groups = sm.create_optimizer_param_groups(lr=1e-2, weight_decay=0.1)
    names = {id(p): n for n, p in sm.named_parameters()}
    frozen = [g for g in groups if any(names[id(p)].split(".")[1] in ("vera_A", "vera_B") for p in g["params"])]
    assert len(frozen) == 1 and frozen[0]["lr"] == 0.0 and frozen[0]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in sm.named_parameters()}
    sm(torch.randn(4, 12)).square().mean().backward()
    opt.step()
    after = dict(sm.named_parameters())
    assert torch.equal(after["base_model.vera_A.default"], before["base_model.vera_A.default"])
    assert not torch.equal(
        after["base_model.lin1.vera_lambda_d.default"], before["base_model.lin1.vera_lambda_d.default"]
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shim_saves_swift_layout_that_both_readers_load(name: str, tmp_path) -> None:
    cfg = CONFIGS[name]
    sm = ft.Swift.prepare_model(mlp(), {"mine": cfg}).eval()
    x = torch.randn(3, 12)
    out = sm(x)
    sm.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert data["swift_type"] == cfg.swift_type and "peft_type" in data
    again = ft.Swift.from_pretrained(mlp(), str(tmp_path))
    assert isinstance(again, ft.SwiftModel)
    torch.testing.assert_close(again.eval()(x), out)
    p = ft.load(tmp_path, mlp())
    assert p.adapter_name == "mine" and p.config == cfg
    torch.testing.assert_close(ft.apply(mlp(), p, (x,)), out)
