"""Activation checkpointing with the functional ``apply``.

The recomputation in ``backward`` runs after ``apply`` has returned; without
``checkpoint_context_fn`` it would see no routes and recompute base-model
activations (torch then fails on a saved-tensor count mismatch, or worse).
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import tiny_llama

import functuner as ft


def _transformers_checkpointing(model, reentrant: bool) -> None:
    """transformers' own activation checkpointing (``activation_checkpointing_enable`` since 5.x; before, the
    now deprecated ``gradient_checkpointing_enable``)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def _loss(model, p, x):
    return ft.apply(model, p, (x,), {"labels": x}).loss


def _eager_grads(model, p, x, scale=1.0):
    leaves = ft.TunerParams({k: v.detach().clone().requires_grad_() for k, v in p.items()}, p.config, p.adapter_name)
    return leaves, _loss(model, leaves, x) * scale


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama().train()
    ckpt = copy.deepcopy(model)
    ft.gradient_checkpointing_enable(ckpt)  # no deprecation warning: uses activation_checkpointing_enable
    cfg = ft.LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    p = ft.init(model, cfg, generator=0)
    q = ft.init(model, cfg, generator=1)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    return model, ckpt, p, q, x


def test_checkpointed_grads_equal_plain(setup) -> None:
    model, ckpt, p, _, x = setup
    ref = torch.func.grad(lambda p: _loss(model, p, x))(p)
    loss, grads = ft.value_and_grad(lambda p: _loss(ckpt, p, x))(p)
    assert torch.allclose(loss, _loss(model, p, x))
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], atol=1e-6, rtol=1e-5)


def test_two_applies_in_one_backward_each_recompute_with_their_own_params(setup) -> None:
    model, ckpt, p, q, x = setup
    P, lp = _eager_grads(ckpt, p, x)
    Q, lq = _eager_grads(ckpt, q, x, scale=2.0)
    (lp + lq).backward()
    gp = torch.func.grad(lambda p: _loss(model, p, x))(p)
    gq = torch.func.grad(lambda q: 2.0 * _loss(model, q, x))(q)
    for k in gp:
        torch.testing.assert_close(P[k].grad, gp[k], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(Q[k].grad, gq[k], atol=1e-6, rtol=1e-5)


def test_reentrant_refused(setup) -> None:
    _, ckpt, *_ = setup
    with pytest.raises(ValueError, match="use_reentrant"):
        ft.gradient_checkpointing_enable(copy.deepcopy(ckpt), use_reentrant=True)


def test_plain_transformers_checkpointing_is_refused_with_the_fix(setup) -> None:
    model, _, p, _, x = setup
    for reentrant in (False, True):
        plain = copy.deepcopy(model)
        _transformers_checkpointing(plain, reentrant)
        before = {k: v.clone() for k, v in plain.state_dict().items()}
        with pytest.raises(ft.errors.ConfigError, match="gradient_checkpointing_enable"):
            _loss(plain, p, x)
        assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
        with torch.no_grad():  # inference needs no recomputation: allowed
            _loss(plain, p, x)
