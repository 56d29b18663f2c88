"""functuner.value_and_grad: same numbers as torch.func.grad_and_value, pure, composes with transforms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_gpt2, tiny_llama

import functuner as ft


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


LLAMA = _frozen(tiny_llama())
GPT2 = _frozen(tiny_gpt2())


def _loss(model):
    return lambda p, ids: ft.apply(model, p, (ids,), {"labels": ids}).loss


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), dora=st.booleans(), gpt2=st.booleans(), r=st.integers(1, 6))
def test_matches_torch_func(seed, dora, gpt2, r):
    model = GPT2 if gpt2 else LLAMA
    targets = ["c_attn", "c_fc"] if gpt2 else ["q_proj", "v_proj", "down_proj"]
    cfg = ft.LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, use_dora=dora)
    params = ft.init(model, cfg, generator=seed)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))
    before = {k: v.clone() for k, v in params.items()}
    value, grads = ft.value_and_grad(_loss(model))(params, ids)
    want_g, want_v = torch.func.grad_and_value(_loss(model))(params, ids)
    assert isinstance(grads, ft.TunerParams) and list(grads) == list(params)
    assert not value.requires_grad
    torch.testing.assert_close(value, want_v)
    for k in params:
        torch.testing.assert_close(grads[k], want_g[k], rtol=1e-4, atol=1e-6)
        assert torch.equal(params[k], before[k]) and not params[k].requires_grad  # inputs untouched


def test_has_aux_argnums_and_unused_leaves():
    cfg = ft.LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    params = ft.init(LLAMA, cfg, generator=0)
    extra = {"w": torch.tensor(2.0), "unused": torch.ones(3)}
    ids = torch.randint(0, 64, (1, 5))

    def f(ids, e, p):
        out = ft.apply(LLAMA, p, (ids,), {"labels": ids})
        return out.loss * e["w"], out.logits

    (value, logits), g = ft.value_and_grad(f, argnums=1, has_aux=True)(ids, extra, params)
    want, (want_v, want_logits) = torch.func.grad_and_value(f, argnums=1, has_aux=True)(ids, extra, params)
    torch.testing.assert_close(value, want_v)
    torch.testing.assert_close(logits, want_logits)
    assert not logits.requires_grad
    torch.testing.assert_close(g["w"], want["w"])
    assert torch.equal(g["unused"], torch.zeros(3))


def test_inside_vmap_falls_back_to_torch_func():
    cfg = ft.LoRAConfig(r=2, target_modules=["v_proj"], init_lora_weights=False)
    params = ft.init(LLAMA, cfg, generator=1)
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(3))

    def one(p, row):
        return ft.value_and_grad(_loss(LLAMA))(p, row.unsqueeze(0))[1]

    per_sample = torch.func.vmap(one, in_dims=(None, 0))(params, ids)
    want = ft.per_sample_grads(_loss(LLAMA), params, ids)
    for k in params:
        torch.testing.assert_close(per_sample[k], want[k], rtol=1e-4, atol=1e-6)


def test_rejects_non_scalar():
    cfg = ft.LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    params = ft.init(LLAMA, cfg, generator=0)
    ids = torch.randint(0, 64, (1, 5))
    with pytest.raises(ValueError, match="scalar"):
        ft.value_and_grad(lambda p, i: ft.apply(LLAMA, p, (i,)).logits)(params, ids)
