"""NEFTune tuner (SWIFT's NEFTuneConfig): training-only noise from an explicit generator, within NEFTune's bound.

Parity with the real ms-swift 4.6 (the same noise for the same seed, functionally and through the shim's global
RNG; deactivation; checkpoints): row neftune_llama of tests/tuners/test_swift_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from _swift_tuner_fixtures import load_case
from hypothesis import given, settings
from hypothesis import strategies as st
from models import logits, tiny_llama
from torch import nn

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, TargetError
from functuner.tuners.adapter import AdapterConfig
from functuner.tuners.neftune import NEFTuneConfig, noise_bound


def _case():
    model = tiny_llama()
    case = load_case("neftune_llama", model)
    cfg = NEFTuneConfig.from_dict(case.adapters["default"].config)
    return model, case, ft.init(model, cfg, generator=0)


def test_noise_depends_on_the_generator_seed():
    # (the same noise as SWIFT's for SWIFT's seed, again for the same seed, and the base model without params:
    #  test_swift_parity.py::test_outputs_match_swift_and_deactivation_is_exact[neftune_llama])
    model, case, params = _case()
    assert len(params) == 0
    x, seed = case.io["input_0"], int(case.meta["noise_seed"])
    model.train()
    out = logits(ft.apply(model, params, (x,), generator=torch.Generator().manual_seed(seed)))
    other = logits(ft.apply(model, params, (x,), generator=torch.Generator().manual_seed(seed + 1)))
    assert not torch.allclose(other, out)


def test_training_mode_requires_a_generator_and_eval_mode_is_exact():
    model, case, params = _case()
    x = case.io["input_0"]
    base = logits(model(x))
    model.train()
    with pytest.raises(ConfigError, match="generator"):
        ft.apply(model, params, (x,))
    model.eval()
    assert torch.equal(logits(ft.apply(model, params, (x,))), base)
    merged = ft.merge(model, params)
    assert all(merged[k] is v for k, v in model.named_parameters())
    assert ft.unmerge(model, params, merged).keys() == merged.keys()


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
    model = tiny_llama()
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
