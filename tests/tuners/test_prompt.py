"""Prompt tuner (SWIFT's PromptConfig): sequence growth, masks, grads, deactivation, bad configs.

Parity with the real ms-swift 4.6 (outputs, deactivation, checkpoints, shim): tests/tuners/test_swift_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from _swift_tuner_fixtures import SWIFT_OUTPUT_TOL, load_case
from hypothesis import given, settings
from hypothesis import strategies as st
from models import logits, tiny_bert, tiny_vit
from torch import nn

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError
from functuner.tuners.prompt import PromptConfig


def swift_params(case, name: str = "default") -> ft.TunerParams:
    files = case.adapters[name]
    return ft.TunerParams(files.state, PromptConfig.from_dict(files.config), name)


def test_deactivated_extract_embedding_is_the_base_model_unlike_swift():
    # SWIFT keeps slicing the output of a deactivated extract_embedding prompt (its fixture shows the drift);
    # functuner's deactivated tuner is simply absent.
    model = tiny_vit()
    case = load_case("prompt_vit_extract", model)
    x = case.io["input_0"]
    assert not torch.equal(case.io["output_deactivated"], case.io["base_output"])  # both recorded by SWIFT
    base = logits(model(x))
    torch.testing.assert_close(base, case.io["base_output"], **SWIFT_OUTPUT_TOL)  # recorded on another CPU
    ft.apply(model, swift_params(case), (x,))
    assert torch.equal(logits(model(x)), base)


def test_init_grows_the_sequence_by_the_prompt_length():
    # (init's keys and shapes against SWIFT's: test_swift_parity.py::test_init_gives_swifts_keys_and_shapes)
    model = tiny_bert()
    case = load_case("prompt_bert", model)
    cfg = PromptConfig.from_dict(case.adapters["default"].config)
    params = ft.init(model, cfg, generator=0)
    x = case.io["input_0"]
    out = logits(ft.apply(model, params, (x,)))
    assert out.shape == (x.shape[0], x.shape[1] + cfg.prompt_length, 32)


def test_grad_flows_only_to_prompt_tokens_and_matches_autograd():
    model = tiny_bert()
    case = load_case("prompt_bert", model)
    params = swift_params(case)
    x = case.io["input_0"]

    def loss(p):
        return logits(ft.apply(model, p, (x,))).pow(2).mean()

    grads = torch.func.grad(loss)(params)
    assert set(grads) == set(params) and all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters())
    leaves = params.map(lambda t: t.detach().clone().requires_grad_(True))
    loss(leaves).backward()
    for k in params:
        torch.testing.assert_close(grads[k], leaves[k].grad, rtol=1e-5, atol=1e-8)


class _MaskedLayer(nn.Module):
    """A layer whose output shows exactly what it received: hidden states and mask."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, hidden, mask=None):
        return hidden * self.scale, mask


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_MaskedLayer(), _MaskedLayer()])

    def forward(self, hidden, mask):
        seen = []
        for layer in self.layers:
            hidden, m = layer(hidden, mask=mask)
            seen.append(m)
        return hidden, seen


@pytest.mark.parametrize("attach_front", [True, False])
def test_attention_mask_by_keyword_and_deep_prompt_replacement(attach_front):
    model = _Stack()
    cfg = PromptConfig(
        dim=4,
        target_modules=r"layers\.\d",
        embedding_pos=0,
        attention_mask_pos="mask",
        attention_mask_value=-7.0,
        prompt_length=2,
        attach_front=attach_front,
    )
    params = ft.init(model, cfg, generator=0)
    hidden, mask = torch.randn(3, 5, 4), torch.ones(3, 1, 5)
    out, masks = ft.apply(model, params, (hidden, mask))
    p0, p1 = params["layers.0.prompt_default.prompt_token"], params["layers.1.prompt_default.prompt_token"]
    # layer 0 attaches its tokens, layer 1 replaces them with its own
    want = (
        torch.cat((p1.expand(3, -1, -1), hidden), 1) if attach_front else torch.cat((hidden, p1.expand(3, -1, -1)), 1)
    )
    torch.testing.assert_close(out, want)
    assert not torch.equal(p0, p1)
    pad = torch.full((3, 1, 2), -7.0)
    want_mask = torch.cat((pad, mask), -1) if attach_front else torch.cat((mask, pad), -1)
    for m in masks:
        torch.testing.assert_close(m, want_mask)
    assert torch.equal(model(hidden, mask)[0], hidden)


# -- bad configs ------------------------------------------------------------------------------------------------
def test_positions_out_of_range_are_refused_at_init():
    model = tiny_bert()
    hooks_before = [len(m._forward_pre_hooks) for m in model.modules()]
    with pytest.raises(ConfigError, match="embedding_pos=9 is out of range"):
        ft.init(model, PromptConfig(dim=32, target_modules=r".*layer\.\d+$", embedding_pos=9), generator=0)
    with pytest.raises(ConfigError, match="does not end in a layer number"):
        ft.init(model, PromptConfig(dim=32, target_modules=r".*layer\.\d+\.output", embedding_pos=0), generator=0)
    assert [len(m._forward_pre_hooks) for m in model.modules()] == hooks_before
    # BertLayer.forward takes **kwargs, so a keyword passes the signature check; its absence shows at call time
    params = ft.init(
        model,
        PromptConfig(dim=32, target_modules=r".*layer\.\d+$", embedding_pos=0, attention_mask_pos="no_mask"),
        generator=0,
    )
    with pytest.raises(ConfigError, match="attention_mask_pos='no_mask'"):
        ft.apply(model, params, (torch.randint(0, 64, (1, 4)),))


def test_dim_mismatch_names_the_field_and_leaves_model_untouched():
    model = tiny_bert()
    x = torch.randint(0, 64, (1, 4))
    base = logits(model(x))
    params = ft.init(model, PromptConfig(dim=16, target_modules=r".*layer\.\d+$", embedding_pos=0), generator=0)
    with pytest.raises(ConfigError, match="dim=16 does not match"):
        ft.apply(model, params, (x,))
    assert torch.equal(logits(model(x)), base)
    with pytest.raises(ParamsMismatchError, match="prompt_length=16"):
        ft.validate(model, ft.TunerParams({k: v[:, :3] for k, v in params.items()}, params.config))


@pytest.mark.parametrize(
    "kwargs", [dict(dim=None), dict(prompt_length=0), dict(embedding_pos=None), dict(attention_mask_pos=1.0)]
)
def test_invalid_fields_raise_config_error(kwargs):
    # a set bad value fails at construction, an unset required field (None) at init (as in SWIFT)
    fields = dict(dim=32, target_modules=r".*layer\.\d+$", embedding_pos=0) | kwargs
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ft.init(tiny_bert(), PromptConfig(**fields), generator=0)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), st.booleans(), st.floats(-10, 10))
def test_output_keeps_the_input_tokens_in_place(batch, seq, length, front, value):
    model = _Stack()
    cfg = PromptConfig(
        dim=4,
        target_modules=r"layers\.0",
        embedding_pos=0,
        attention_mask_pos="mask",
        attention_mask_value=value,
        prompt_length=length,
        attach_front=front,
    )
    params = ft.init(model, cfg, generator=1)
    hidden, mask = torch.randn(batch, seq, 4), torch.zeros(batch, seq)
    out, masks = ft.apply(model, params, (hidden, mask))
    kept = out[:, length:] if front else out[:, :seq]
    assert torch.equal(kept, hidden)
    assert masks[0].shape == (batch, seq + length)
    extra = masks[0][:, :length] if front else masks[0][:, seq:]
    assert torch.all(extra == torch.tensor(value, dtype=torch.float32))
