"""ReFT (LoReFT and the other pyreft intervention types), natively, against the paper's formulas.

SWIFT parity note: ms-swift's ReFT runs on pyreft (and pyvene), which only
ms-swift's CI venv has; ``tests/swift_interop/reft_scenario.py`` compares every
intervention type's outputs with it there.  SWIFT saves ReFT through pyreft's
``save_intervention`` as pickled ``.bin`` files, which functuner never reads.
Here every intervention is checked against its formula from the ReFT paper /
pyreft's docstrings, written out independently below.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_bert, tiny_llama

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError, TargetError
from functuner.tuners.reft import INTERVENTIONS, orthonormalize

TYPES = sorted(INTERVENTIONS)
_LLAMA = tiny_llama()  # read-only: functuner never writes to it


def _formula(kind, h, t):
    """The paper's formulas, by hand (linear activation)."""
    if "rotate_layer" in t:
        R = t["rotate_layer"].T  # (r, d) orthonormal rows
    if kind == "LoreftIntervention":
        return h + (h @ t["learned_source.weight"].T + t["learned_source.bias"] - h @ R.T) @ R
    if kind == "NoreftIntervention":
        P, c = t["proj_layer.weight"], t.get("proj_layer.bias", 0)
        return h + (h @ t["learned_source.weight"].T + t["learned_source.bias"] - (h @ P.T + c)) @ P
    if kind == "ConsreftIntervention":
        return h + (t["learned_source"] - h @ R.T) @ R
    if kind == "LobireftIntervention":
        return h + t["learned_source"] @ R
    if kind == "DireftIntervention":
        return h + (h @ t["learned_source.weight"].T + t["learned_source.bias"]) @ R
    if kind == "NodireftIntervention":
        return h + (h @ t["learned_source.weight"].T + t["learned_source.bias"]) @ t["proj_layer.weight"]
    raise AssertionError(kind)


def _record(module):
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    return seen, handle


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(TYPES), add_bias=st.booleans(), seed=st.integers(0, 50))
def test_layer_output_follows_formula(kind, add_bias, seed):
    model = _LLAMA
    cfg = ft.ReftConfig(model_type="llama", layers=[0], r=3, intervention_type=kind, args={"add_bias": add_bias})
    p = ft.init(model, cfg, generator=seed)
    ids = torch.arange(10).view(2, 5)
    seen, handle = _record(model.model.layers[0])
    try:
        base = model(ids).logits
        out = ft.apply(model, p, (ids,)).logits
    finally:
        handle.remove()
    t = {k.split(".reft_default.")[1]: v for k, v in p.items()}
    torch.testing.assert_close(seen[1], _formula(kind, seen[0], t), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, base)
    assert torch.equal(model(ids).logits, base)  # inactive: exactly the base model


def test_rest_of_network_sees_the_intervention_and_positions():
    model = tiny_llama()
    p = ft.init(model, ft.ReftConfig(layer_key="model.layers", layers=[0, 1], r=2), generator=0)
    ids = torch.arange(12).view(2, 6)
    locs = torch.tensor([[[2, 4], [3, 5]], [[3, 3], [4, 5]]])  # (batch, 2 interventions, 2 positions)
    seen, handle = _record(model.model.layers[1])
    try:
        model(ids)
        ft.apply(model, p, (ids,), {"intervention_locations": locs})
    finally:
        handle.remove()
    changed = (seen[0] - seen[1]).abs().amax(-1) > 0  # (batch, seq): layer 1 output positions that changed
    # layer 0's intervention changes every later position through attention, so compare only earlier positions
    assert not changed[0, :2].any() and changed[0, 2:].all()
    assert not changed[1, :3].any() and changed[1, 3:].all()
    # all positions when no locations are given
    out_all = ft.apply(model, p, (ids,)).logits
    out_loc = ft.apply(model, p, (ids,), {"intervention_locations": locs}).logits
    assert not torch.allclose(out_all, out_loc)


def test_bert_layers_found_without_layer_key_and_tuple_outputs():
    model = tiny_bert()
    p = ft.init(model, ft.ReftConfig(r=2, layers=[1]), generator=0)
    assert sorted(p) == [
        "encoder.layer.1.reft_default.learned_source.bias",
        "encoder.layer.1.reft_default.learned_source.weight",
        "encoder.layer.1.reft_default.rotate_layer",
    ]
    ids = torch.arange(8).view(1, 8)
    assert not torch.allclose(ft.apply(model, p, (ids,)).last_hidden_state, model(ids).last_hidden_state)


@settings(max_examples=15, deadline=None)
@given(d=st.integers(2, 12), r=st.integers(1, 12), seed=st.integers(0, 99))
def test_orthonormalize(d, r, seed):
    r = min(r, d)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, r, generator=gen, dtype=torch.float64)
    q = orthonormalize(w)
    torch.testing.assert_close(q.T @ q, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(orthonormalize(q), q, rtol=0, atol=1e-10)


def test_grad_only_to_tuner_params_and_dropout_needs_generator():
    model = tiny_llama().train()
    p = ft.init(model, ft.ReftConfig(model_type="llama", r=2, args='{"dropout": 0.1}'), generator=0)
    ids = torch.arange(12).view(2, 6)
    with pytest.raises(ConfigError, match="generator"):
        ft.apply(model, p, (ids,))

    def loss(params, seed):
        return ft.apply(model, params, (ids,), {"labels": ids}, generator=torch.Generator().manual_seed(seed)).loss

    grads = torch.func.grad(loss)(p, 0)
    assert set(grads) == set(p) and all(g.abs().sum() > 0 for g in grads.values())
    assert all(q.grad is None for q in model.parameters())
    assert loss(p, 3) == loss(p, 3) and loss(p, 3) != loss(p, 4)


def test_bad_configs_and_params_raise_clearly():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="intervention_type"):
        ft.ReftConfig(intervention_type="FooIntervention")
    with pytest.raises(ConfigError, match="JSON"):
        ft.ReftConfig(args="{not json")
    with pytest.raises(ConfigError, match="unknown key"):
        ft.ReftConfig(args={"rank": 3})
    with pytest.raises(ConfigError, match="act_fn"):
        ft.ReftConfig(args={"act_fn": "nope"})
    with pytest.raises(TargetError, match="out of range"):
        ft.init(model, ft.ReftConfig(model_type="llama", layers=[5]), generator=0)
    with pytest.raises(TargetError, match="layer_key"):
        ft.init(model, ft.ReftConfig(layer_key="model.blocks"), generator=0)
    with pytest.raises(ConfigError, match="hidden size"):
        ft.init(model, ft.ReftConfig(model_type="llama", r=64), generator=0)
    p = ft.init(model, ft.ReftConfig(model_type="llama", r=2), generator=0)
    bad = p.replace({"model.layers.0.reft_default.rotate_layer": torch.zeros(32, 3)})
    with pytest.raises(ParamsMismatchError, match="rotate_layer"):
        ft.validate(model, bad)
    with pytest.raises(ConfigError, match="intervention_locations"):
        ft.apply(model, p, (torch.arange(4).view(1, 4),), {"intervention_locations": torch.zeros(1, 4)})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert ft.merge is not None
    with pytest.raises(ConfigError, match="no merged form"):
        ft.merge(model, p)
