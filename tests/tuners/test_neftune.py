"""NEFTune tuner (SWIFT's NEFTuneConfig): the same noise as real SWIFT 4.6, training-only, explicit generator."""

from __future__ import annotations

import json

import pytest
import torch
from _swift_tuner_fixtures import builders, load_case, logits
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, TargetError
from functuner.io import checkpoint as ckpt
from functuner.tuners.adapter import AdapterConfig
from functuner.tuners.neftune import NEFTuneConfig, noise_bound


def _case():
    model = builders.tiny_llama()
    case = load_case("neftune_llama", model)
    cfg = NEFTuneConfig.from_dict(case.adapters["default"].config)
    return model, case, ft.init(model, cfg, generator=0)


def test_functional_noise_equals_swifts_with_the_same_seed():
    model, case, params = _case()
    assert len(params) == 0
    x, seed = case.io["input_0"], int(case.meta["noise_seed"])
    model.train()
    out = logits(ft.apply(model, params, (x,), generator=torch.Generator().manual_seed(seed)))
    torch.testing.assert_close(out, case.io["output"], rtol=0, atol=1e-6)
    again = logits(ft.apply(model, params, (x,), generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(again, out)
    other = logits(ft.apply(model, params, (x,), generator=torch.Generator().manual_seed(seed + 1)))
    assert not torch.allclose(other, out)
    assert torch.equal(logits(model(x)), case.io["base_output"])  # training mode, no params: the base model


def test_training_mode_requires_a_generator_and_eval_mode_is_exact():
    model, case, params = _case()
    x = case.io["input_0"]
    model.train()
    with pytest.raises(ConfigError, match="generator"):
        ft.apply(model, params, (x,))
    model.eval()
    assert torch.equal(logits(ft.apply(model, params, (x,))), case.io["base_output"])
    merged = ft.merge(model, params)
    assert all(merged[k] is v for k, v in model.named_parameters())
    assert ft.unmerge(model, params, merged).keys() == merged.keys()


def test_shim_uses_the_global_rng_like_swift(tmp_path):
    model, case, params = _case()
    x, seed = case.io["input_0"], int(case.meta["noise_seed"])
    sm = ft.Swift.from_pretrained(model, case.folder)  # SWIFT's own directory: a config and no tensors
    sm.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        torch.testing.assert_close(logits(sm(x)), case.io["output"], rtol=0, atol=1e-6)
        sm.deactivate_adapter("default")
        assert torch.equal(logits(sm(x)), case.io["base_output"])
    ckpt.write_swift_adapter(tmp_path, "default", params.config, params)
    written = json.loads((tmp_path / "default" / "adapter_config.json").read_text())
    assert written == case.adapters["default"].config
    assert not (tmp_path / "default" / "adapter_model.safetensors").exists()


def test_grad_through_noisy_embeddings_reaches_only_the_other_tuners_params():
    model, case, neft = _case()
    model.train()
    x = case.io["input_0"]
    ad = ft.init(model, AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=4), generator=0)

    def loss(p, seed):
        out = ft.apply(model, [neft, p], (x,), generator=torch.Generator().manual_seed(seed))
        return logits(out).pow(2).mean()

    grads = torch.func.grad(loss)(ad, 7)
    assert set(grads) == set(ad) and all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters())
    leaves = ad.map(lambda t: t.detach().clone().requires_grad_(True))
    loss(leaves, 7).backward()
    for k in ad:
        torch.testing.assert_close(grads[k], leaves[k].grad, rtol=1e-5, atol=1e-8)
    other = torch.func.grad(loss)(ad, 8)
    assert any(not torch.allclose(other[k], grads[k]) for k in ad)


def test_bad_configs_and_params():
    with pytest.raises(ConfigError, match="noise_alpha"):
        NEFTuneConfig(noise_alpha=-1.0)
    with pytest.raises(ConfigError, match="noise_alpha"):
        NEFTuneConfig(noise_alpha="5")
    with pytest.raises(TargetError, match="nn.Embedding"):
        ft.init(nn.Sequential(nn.Linear(4, 4)), NEFTuneConfig(), generator=0)
    model = builders.tiny_llama()
    with pytest.raises(ParamsMismatchError, match="must be empty"):
        ft.validate(model, ft.TunerParams({"x": torch.zeros(1)}, NEFTuneConfig()))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 16), st.floats(0.1, 20.0), st.integers(0, 2**31 - 1))
def test_noise_is_uniform_within_the_neftune_bound(batch, seq, dim, alpha, seed):
    emb = nn.Embedding(11, dim).train()
    params = ft.init(emb, NEFTuneConfig(noise_alpha=alpha), generator=0)
    ids = torch.randint(0, 11, (batch, seq), generator=torch.Generator().manual_seed(seed))
    noise = ft.apply(emb, params, (ids,), generator=torch.Generator().manual_seed(seed)) - emb(ids)
    bound = noise_bound(alpha, seq, dim)
    assert bound == pytest.approx(alpha / (seq * dim) ** 0.5, rel=1e-6)
    assert noise.abs().max() <= bound * (1 + 1e-6)
    assert noise.abs().max() > 0
