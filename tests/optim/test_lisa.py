"""LISA: the pure schedule, the functional form, and the eager callback against the reference algorithm.

The reference (LMFlow's ``LISATrainer`` / ``DynamicLayerActivationCallback``, ms-swift's ``LISACallback``)
samples with ``np.random.choice(range(L), n, replace=False)`` from NumPy's global generator, which a
pure ``(step, seed)`` schedule cannot reproduce layer for layer.  So the tests check (1) the same
distribution (uniform over n-subsets, both samplers through the same chi-square test), and (2) the same
update rule: the reference's optimizer rebuild, transcribed below from LMFlow's ``LISATrainer`` (drop
the deactivated layers' optimizer state, flip ``requires_grad``, refill the body-layer groups), driven
by the same layer sequence, gives the same weights as our callback, and as our functional loop.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

import functuner as ft
from functuner.errors import ConfigError, TargetError
from functuner.optim import (
    LISACallback,
    LISAConfig,
    LISASchedule,
    adamw,
    apply_updates,
    lisa_active_layers,
    resync_state,
)

LAYERS = 4
STEPS = 8


def _batches(n: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (2, 8), generator=g) for _ in range(n)]


def _model() -> torch.nn.Module:
    m = tiny_llama(num_hidden_layers=LAYERS).train()
    m.requires_grad_(True)
    return m


@settings(max_examples=60, deadline=None)
@given(
    num_layers=st.integers(1, 40),
    data=st.data(),
    interval=st.integers(1, 50),
    step=st.integers(0, 10_000),
    seed=st.integers(0, 2**31),
)
def test_schedule_is_a_pure_function_constant_within_a_period(num_layers, data, interval, step, seed) -> None:
    n = data.draw(st.integers(1, num_layers))
    kw = dict(num_layers=num_layers, n_layers=n, step_interval=interval, seed=seed)
    layers = lisa_active_layers(step, **kw)
    assert layers == lisa_active_layers(step, **kw)  # pure
    assert len(layers) == n and len(set(layers)) == n and list(layers) == sorted(layers)
    assert all(0 <= i < num_layers for i in layers)
    start = step - step % interval
    assert lisa_active_layers(start, **kw) == layers == lisa_active_layers(start + interval - 1, **kw)


def _chi_square_uniform(draws: list[tuple[int, ...]], num_layers: int, n: int) -> float:
    subsets = list(itertools.combinations(range(num_layers), n))
    counts = {s: 0 for s in subsets}
    for d in draws:
        counts[tuple(sorted(d))] += 1
    expected = len(draws) / len(subsets)
    return sum((c - expected) ** 2 / expected for c in counts.values())


def test_same_distribution_as_reference_sampler() -> None:
    num_layers, n, periods = 6, 2, 3000  # 15 subsets: chi-square with 14 degrees of freedom
    ours = [
        lisa_active_layers(p * 20, num_layers=num_layers, n_layers=n, step_interval=20, seed=11) for p in range(periods)
    ]
    np.random.seed(11)
    ref = [tuple(np.random.choice(range(num_layers), n, replace=False).tolist()) for _ in range(periods)]
    critical = 36.12  # chi-square(14) at p = 0.001
    assert _chi_square_uniform(ref, num_layers, n) < critical
    assert _chi_square_uniform(ours, num_layers, n) < critical
    # the per-layer inclusion rate is n / L for both
    for draws in (ours, ref):
        rates = [sum(i in d for d in draws) / periods for i in range(num_layers)]
        assert all(math.isclose(r, n / num_layers, abs_tol=0.03) for r in rates)
    # different seeds give different schedules
    other = [
        lisa_active_layers(p * 20, num_layers=num_layers, n_layers=n, step_interval=20, seed=12) for p in range(50)
    ]
    assert other != ours[:50]


def test_trainable_pytree() -> None:
    model = _model()
    sched = LISASchedule.from_model(model, LISAConfig(n_layers=2, step_interval=3, seed=1))
    assert sched.layers_attribute == "model.layers" and sched.num_layers == LAYERS
    params = {n: p.detach() for n, p in model.named_parameters()}
    for step in range(7):
        active = sched.active_layers(step)
        tr = sched.trainable(params, step)
        want = [n for n in params if not n.startswith("model.layers.") or int(n.split(".")[2]) in active]
        assert list(tr) == want
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(tr)
    tp = ft.TunerParams(params, config=None)
    assert isinstance(sched.trainable(tp, 0), ft.TunerParams)
    with pytest.raises(TargetError, match="params lacks"):
        sched.trainable({"lm_head.weight": params["lm_head.weight"]}, 0)


def test_resync_state_keeps_surviving_entries() -> None:
    tx = adamw(1e-3)
    a = {"x": torch.ones(2), "y": torch.ones(3)}
    state = tx.init(a)
    _, state = tx.update({"x": torch.ones(2), "y": torch.ones(3)}, state)
    new = resync_state(tx, state, {"y": torch.ones(3), "z": torch.ones(4)})
    assert list(new) == ["y", "z"]
    assert new["y"] is state["y"] and new["z"].step == 0 and torch.equal(new["z"].exp_avg, torch.zeros(4))
    assert list(resync_state(tx, None, a)) == ["x", "y"]


def _reference_run(
    model: torch.nn.Module, layer_seq: list[tuple[int, ...]], interval: int, make_opt
) -> dict[str, torch.Tensor]:
    """LMFlow's LISATrainer update rule (transcribed): four groups, rebuilt at each switch."""
    layers = model.model.layers
    decay = {n for n, _ in model.named_parameters() if "norm" not in n and "bias" not in n}

    def body_names(active):
        return {f"model.layers.{i}.{n}" for i in active for n, _ in layers[i].named_parameters()}

    def switch(active):
        for layer in layers:
            layer.requires_grad_(False)
        for i in active:
            layers[i].requires_grad_(True)

    active = layer_seq[0]
    switch(active)
    names = body_names(active)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n not in names and n in decay and p.requires_grad], "weight_decay": 0.1},
        {"params": [p for n, p in named if n not in names and n not in decay and p.requires_grad], "weight_decay": 0.0},
        {"params": [p for n, p in named if n in names and n in decay], "weight_decay": 0.1},
        {"params": [p for n, p in named if n in names and n not in decay], "weight_decay": 0.0},
    ]
    opt = make_opt(groups)
    for step, ids in enumerate(_batches()):
        if step != 0 and step % interval == 0:
            for i in active:
                for p in layers[i].parameters():
                    opt.state.pop(p, None)
            active = layer_seq[step // interval]
            switch(active)
            names = body_names(active)
            opt.param_groups[2]["params"] = [p for n, p in named if n in names and n in decay and p.requires_grad]
            opt.param_groups[3]["params"] = [p for n, p in named if n in names and n not in decay and p.requires_grad]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_callback_and_functional_loop_match_reference_update_rule() -> None:
    cfg = LISAConfig(n_layers=2, step_interval=2, seed=4)
    base = _model()
    sched = LISASchedule.from_model(base, cfg)
    layer_seq = [sched.active_layers(p * cfg.step_interval) for p in range(STEPS // cfg.step_interval)]
    assert len(set(layer_seq)) > 1  # the schedule does switch in this run
    want = _reference_run(copy.deepcopy(base), layer_seq, cfg.step_interval, lambda g: torch.optim.AdamW(g, lr=1e-2))

    # eager: our callback's switch() in a hand-written loop, optimizer grouped by decay
    model = copy.deepcopy(base)
    cb = LISACallback(model, cfg)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if "norm" not in n], "weight_decay": 0.1},
            {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    for step, ids in enumerate(_batches()):
        cb.switch(step, opt)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        present = {id(p) for g in opt.param_groups for p in g["params"]}
        assert set(map(id, opt.state)) <= present
        assert present == {id(p) for p in model.parameters() if p.requires_grad}
    for n, t in model.named_parameters():
        torch.testing.assert_close(t.detach(), want[n], rtol=1e-5, atol=2e-6, msg=lambda m, n=n: f"{n}: {m}")

    # functional: the trainable pytree, resync_state at switches, torch.func.grad; against the reference rule
    # with galore_torch's AdamW (the rule of functuner's adamw transform)
    import galore_torch  # in the test extra: a missing reference fails, never skips

    want = _reference_run(
        copy.deepcopy(base),
        layer_seq,
        cfg.step_interval,
        lambda g: galore_torch.GaLoreAdamW(g, lr=1e-2, no_deprecation_warning=True),
    )
    model = copy.deepcopy(base)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    tx = adamw(1e-2, weight_decay=0.1)
    tx_norm = adamw(1e-2)
    state = None
    for step, ids in enumerate(_batches()):
        trainable = sched.trainable(params, step)
        state = sched.sync_state(tx, state, trainable, step)

        def loss_fn(tr, ids=ids, frozen=params):
            return torch.func.functional_call(model, {**frozen, **tr}, (), {"input_ids": ids, "labels": ids}).loss

        grads = torch.func.grad(loss_fn)(trainable)
        decayed = {n: g for n, g in grads.items() if "norm" not in n}
        plain = {n: g for n, g in grads.items() if "norm" in n}
        upd_d, new_d = tx.update(decayed, {n: state[n] for n in decayed}, trainable)
        upd_p, new_p = tx_norm.update(plain, {n: state[n] for n in plain}, trainable)
        state = {**new_d, **new_p}
        params = apply_updates(params, {**upd_d, **upd_p})
    # torch.func's gradients differ from autograd's in the last bits, and Adam's normalization amplifies that
    # where a gradient is near eps: 1e-4 is 0.1% of the distance the weights travel here (8 steps of lr 1e-2)
    for n in want:
        torch.testing.assert_close(params[n], want[n], rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="LISAConfig.n_layers"):
        LISAConfig(n_layers=0)
    with pytest.raises(ConfigError, match="LISAConfig.step_interval"):
        LISAConfig(step_interval=0)
    with pytest.raises(ConfigError, match=r"n_layers=5 must lie in \[1, 4\]"):
        LISASchedule.from_model(_model(), LISAConfig(n_layers=5))
    with pytest.raises(TargetError, match="layers_attribute='model.blocks'"):
        LISASchedule.from_model(_model(), LISAConfig(layers_attribute="model.blocks"))
    with pytest.raises(TargetError, match="expected nn.ModuleList"):
        LISASchedule.from_model(_model(), LISAConfig(layers_attribute="model.norm"))
    with pytest.raises(TargetError, match="no nn.ModuleList"):
        LISASchedule.from_model(torch.nn.Linear(2, 2), LISAConfig(n_layers=1))


def test_switch_keeps_group_keys_with_galore() -> None:
    from functuner.optim import GaLoreConfig, create_galore_optimizer

    model = _model()
    cfg = LISAConfig(n_layers=1, step_interval=1, seed=0)
    cb = LISACallback(model, cfg)
    opt = create_galore_optimizer(model, GaLoreConfig(rank=2, target_modules=["q_proj"]), lr=1e-3, weight_decay=0.1)
    step = next(s for s in range(1, 50) if cb.schedule.active_layers(s) != cb.active)
    assert cb.switch(step, opt)
    (i,) = cb.active
    layer = model.model.layers[i]
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert group_of[id(layer.self_attn.q_proj.weight)]["rank"] == 2
    assert (
        "rank" not in group_of[id(layer.mlp.up_proj.weight)]
        and group_of[id(layer.mlp.up_proj.weight)]["weight_decay"] == 0.1
    )
    assert group_of[id(layer.input_layernorm.weight)]["weight_decay"] == 0.0
    state_before = dict(opt.state)
    assert not cb.switch(step, opt)  # a second call for the same step changes nothing
    assert dict(opt.state) == state_before
