"""Adapter tuner (SWIFT's AdapterConfig): init, grads, method slots, threads, bad configs.

Parity with the real ms-swift 4.6 (outputs, deactivation, checkpoints, shim): tests/tuners/test_swift_parity.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _swift_tuner_fixtures import load_case
from hypothesis import given, settings
from hypothesis import strategies as st
from models import logits, tiny_bert, tiny_llama

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, TargetError
from functuner.tuners.adapter import AdapterConfig, activation, adapter_mlp

CASES = [("adapter_llama", tiny_llama), ("adapter_bert_method", tiny_bert)]


def swift_params(case, name: str = "default") -> ft.TunerParams:
    files = case.adapters[name]
    return ft.TunerParams(files.state, AdapterConfig.from_dict(files.config), name)


@pytest.mark.parametrize(("case_name", "build"), CASES)
def test_init_is_deterministic_per_generator_and_changes_the_output(case_name, build):
    # (init's keys and shapes against SWIFT's: test_swift_parity.py::test_init_gives_swifts_keys_and_shapes)
    model = build()
    case = load_case(case_name, model)
    cfg = AdapterConfig.from_dict(case.adapters["default"].config)
    params = ft.init(model, cfg, generator=0)
    assert ft.init(model, cfg, generator=0) == params
    assert ft.init(model, cfg, generator=1) != params
    x = case.io["input_0"]
    assert not torch.equal(logits(ft.apply(model, params, (x,))), logits(model(x)))


def test_grad_flows_only_to_adapter_params_and_matches_autograd():
    model = tiny_llama()
    case = load_case("adapter_llama", model)
    params = swift_params(case)
    x = case.io["input_0"]

    def loss(p):
        return logits(ft.apply(model, p, (x,))).pow(2).mean()

    grads = torch.func.grad(loss)(params)
    assert isinstance(grads, ft.TunerParams) and set(grads) == set(params)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters())
    leaves = params.map(lambda t: t.detach().clone().requires_grad_(True))
    loss(leaves).backward()
    for k in params:
        torch.testing.assert_close(grads[k], leaves[k].grad, rtol=1e-5, atol=1e-7)


def test_method_slot_feed_forward_chunk_survives_deepcopy():
    model = tiny_bert()
    case = load_case("adapter_bert_method", model)
    params = swift_params(case)
    x = case.io["input_0"]
    base = logits(model(x))
    out = logits(ft.apply(model, params, (x,)))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    # the copy's slot runs the copy's own weights, never the original's
    assert torch.equal(logits(twin(x)), logits(twin(x)))
    assert not torch.allclose(logits(ft.apply(twin, params, (x,))), out)
    assert torch.equal(logits(ft.apply(model, params, (x,))), out)
    assert torch.equal(logits(model(x)), base)


def test_tuple_output_hidden_pos_adapts_that_entry_only():
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    cfg = AdapterConfig(dim=32, target_modules=r"model\.layers\.0\.self_attn", hidden_pos=0, adapter_length=4)
    params = ft.init(model, cfg, generator=3)
    seen = {}

    def grab(module, args, kwargs, out):
        seen["out"] = out

    x = torch.randint(0, 64, (1, 5))
    h = attn.register_forward_hook(grab, with_kwargs=True)
    try:
        model(x)
        base_out = seen["out"]
        ft.apply(model, params, (x,))
        adapted = seen["out"]
    finally:
        h.remove()
    w = [
        params[f"model.layers.0.self_attn.adapter_default.{n}"]
        for n in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
    ]
    assert isinstance(adapted, tuple) and len(adapted) == len(base_out)
    torch.testing.assert_close(adapted[0], adapter_mlp(base_out[0], *w, activation("gelu")))
    assert adapted[1] is base_out[1] or (adapted[1] is None and base_out[1] is None)


# -- bad configs: a clear typed error before anything changes -----------------------------------------------
def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(len(m._forward_hooks), len(m._forward_pre_hooks), dict(m.__dict__).keys()) for m in model.modules()],
    )


def test_method_the_module_lacks_is_refused_before_anything_changes():
    model = tiny_bert()
    before = _snapshot(model)
    with pytest.raises(ConfigError, match="method_name='no_such_method'.*encoder.layer.0"):
        ft.init(
            model,
            AdapterConfig(dim=32, target_modules=r".*layer\.\d+$", method_name="no_such_method", adapter_length=4),
            generator=0,
        )
    after = _snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1] == after[1]


def test_hidden_pos_out_of_range_and_dim_mismatch_name_the_field():
    model = tiny_llama()
    x = torch.randint(0, 64, (1, 5))
    base = logits(model(x))
    bad_pos = AdapterConfig(dim=32, target_modules=r"model\.layers\.0\.self_attn", hidden_pos=5, adapter_length=4)
    with pytest.raises(ConfigError, match="hidden_pos=5 is out of range"):
        ft.apply(model, ft.init(model, bad_pos, generator=0), (x,))
    bad_dim = AdapterConfig(dim=16, target_modules=["mlp"], adapter_length=4)
    with pytest.raises(ConfigError, match="dim=16 does not match"):
        ft.apply(model, ft.init(model, bad_dim, generator=0), (x,))
    assert torch.equal(logits(model(x)), base)


@pytest.mark.parametrize(
    "kwargs", [dict(dim=None), dict(dim=0), dict(adapter_length=0), dict(act_layer="nope"), dict(hidden_pos=1.5)]
)
def test_invalid_fields_raise_config_error(kwargs):
    # a set bad value fails at construction, an unset required field (dim=None) at init (as in SWIFT)
    fields = dict(dim=32, target_modules=["mlp"], adapter_length=4) | kwargs
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ft.init(tiny_llama(), AdapterConfig(**fields), generator=0)


def test_no_match_and_mismatched_params():
    model = tiny_llama()
    with pytest.raises(TargetError, match="matched no module"):
        ft.init(model, AdapterConfig(dim=32, target_modules=["nothing_like_this"]), generator=0)
    params = ft.init(model, AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=4), generator=0)
    key = "model.layers.0.mlp.adapter_default.linear1.weight"
    wrong = ft.TunerParams({**params, key: torch.zeros(5, 32)}, params.config)
    with pytest.raises(ParamsMismatchError, match="linear1.weight"):
        ft.validate(model, wrong)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_zero_up_projection_is_the_identity(batch, dim, length, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, 3, dim, generator=g)
    w1, b1 = torch.randn(length, dim, generator=g), torch.randn(length, generator=g)
    out = adapter_mlp(h, w1, b1, torch.zeros(dim, length), torch.zeros(dim), activation("gelu"))
    assert torch.equal(out, h)


def test_method_slot_keeps_threads_apart():
    import threading

    model = tiny_bert()
    case = load_case("adapter_bert_method", model)
    mine = swift_params(case)
    other = mine.map(lambda t: t * 2.0)
    x = case.io["input_0"]
    base = logits(model(x))
    want = {id(mine): logits(ft.apply(model, mine, (x,))), id(other): logits(ft.apply(model, other, (x,)))}
    wrong = []

    def run(p):
        for _ in range(15):
            with torch.no_grad():
                if not torch.equal(logits(ft.apply(model, p, (x,))), want[id(p)]):
                    wrong.append(1)
                if not torch.equal(logits(model(x)), base):
                    wrong.append(1)

    threads = [threading.Thread(target=run, args=(p,)) for p in (mine, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_shim_refuses_a_bad_config_before_touching_the_model():
    model = tiny_bert()
    keys_before = set(model.state_dict())
    with pytest.raises(ConfigError, match="method_name='nope'"):
        ft.Swift.prepare_model(model, AdapterConfig(dim=32, target_modules=r".*layer\.\d+$", method_name="nope"))
    assert set(model.state_dict()) == keys_before
    assert all(p.requires_grad for p in model.parameters())


def test_model_output_entry_by_key():
    model = tiny_bert()
    cfg = AdapterConfig(dim=32, target_modules=["encoder"], hidden_pos="last_hidden_state", adapter_length=4)
    params = ft.init(model, cfg, generator=2)
    x = torch.randint(0, 64, (2, 5))
    enc = model.encoder
    seen = {}
    h = enc.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    try:
        model(x)
    finally:
        h.remove()
    w = [
        params[f"encoder.adapter_default.{n}"]
        for n in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
    ]
    want = adapter_mlp(seen["out"].last_hidden_state, *w, activation("gelu"))
    out = ft.apply(model, params, (x,))
    torch.testing.assert_close(out.last_hidden_state, want)
    with pytest.raises(ConfigError, match="hidden_pos=0.*give a key"):
        ft.apply(model, ft.init(model, cfg.__class__(**{**cfg.to_dict(), "hidden_pos": 0}), generator=2), (x,))


@pytest.mark.parametrize(
    "config",
    [
        AdapterConfig(dim=32, target_modules=r".*layer\.\d+$", method_name="feed_forward_chunk", adapter_length=4),
        ft.PromptConfig(dim=32, target_modules=r".*layer\.\d+$", embedding_pos=0, prompt_length=2),
        ft.SideConfig(dim=32, target_modules=r".*layer\.0$", side_module_name="mlp"),
        ft.PartConfig(target_modules=r".*layer\.0\.output\.dense"),
    ],
    ids=lambda c: type(c).__name__,
)
def test_per_sample_grads_under_vmap_equal_a_loop(config):
    model = tiny_bert()
    params = ft.init(model, config, generator=0)
    x = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(0))

    def loss(p, xi):
        return logits(ft.apply(model, p, (xi,))).pow(2).mean()

    per_sample = ft.per_sample_grads(loss, params, x)
    for i in range(x.shape[0]):
        one = torch.func.grad(loss)(params, x[i : i + 1])
        for k in params:
            torch.testing.assert_close(per_sample[k][i], one[k], rtol=1e-4, atol=1e-6)


def test_shallow_copy_gets_its_own_method_slot():
    model = tiny_bert()
    case = load_case("adapter_bert_method", model)
    params = swift_params(case)
    x = case.io["input_0"]
    out = logits(ft.apply(model, params, (x,)))
    layer = model.encoder.layer[0]
    twin = copy.copy(layer)  # shares the instance dict entries, including the source's slot
    from functuner.tuners._swift_hooks import ensure_method_slot

    slot = ensure_method_slot(twin, "feed_forward_chunk")
    assert slot.module is twin and slot.original.__self__ is twin
    assert layer.__dict__["feed_forward_chunk"].module is layer
    assert torch.equal(logits(ft.apply(model, params, (x,))), out)
