"""Q-GaLore: quantization properties, projector parity with the authors' ``q_galore_torch``, training.

* stochastic rounding is unbiased (hypothesis, checked against the exact expectation's standard error);
* round-to-nearest quantization errs by at most half a step per group, for 2, 4 and 8 bits;
* the projector (int4, lazy refresh by cosine similarity) follows ``q_galore_torch``'s
  ``GaLoreProjector`` (q-galore-torch 1.0 = VITA-Group/Q-GaLore 5bd2f1c) step by step: same refresh steps,
  same gap growth, same low-rank gradient without quantization, within one int4 step with it;
* the weights stay int8 through training (eager and functional), and a tiny Llama trained with
  Q-GaLore reaches a loss close to GaLore's on the same data.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from q_galore_torch.q_galore_projector import GaLoreProjector  # in the test extra: never skipped

from functuner.errors import ConfigError, TargetError
from functuner.optim import (
    GaLoreAdamW,
    GaLoreConfig,
    QGaLoreLinear,
    QuantizedTensor,
    apply_quantized_updates,
    create_galore_optimizer,
    dequantize_model,
    dequantize_params,
    galore_adamw,
    galore_targets,
    quantize_model,
    quantize_params,
)
from functuner.optim.galore import project
from functuner.optim.qgalore import tree_nbytes
from functuner.optim.quant import codes_of, dequantize, quantize, stochastic_round

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
floats = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(floats, min_size=1, max_size=8), seed=st.integers(0, 2**31))
def test_stochastic_round_is_unbiased(values: list[float], seed: int) -> None:
    n = 20_000
    x = torch.tensor(values, dtype=torch.float64)
    draws = stochastic_round(x.expand(n, -1).contiguous(), torch.Generator().manual_seed(seed))
    low = torch.floor(x)
    assert bool(((draws == low) | (draws == low + 1)).all())  # only the two neighbours
    p = x - low
    se = torch.sqrt(p * (1 - p) / n)
    assert bool(((draws.mean(0) - x).abs() <= 6 * se + 1e-9).all())  # E[round(x)] = x


@settings(max_examples=30, deadline=None)
@given(values=st.lists(floats, min_size=2, max_size=16), seed=st.integers(0, 2**31))
def test_stochastic_quantization_is_unbiased(values: list[float], seed: int) -> None:
    # n copies of one group: one scale/minimum, n independent roundings
    n = 4000
    x = torch.tensor(values)
    q = quantize(
        x.repeat(n), bits=8, group_size=len(values), stochastic=True, generator=torch.Generator().manual_seed(seed)
    )
    deq = dequantize(q).view(n, -1).double()
    scale = float(q.scales[0])
    assert bool(((deq - x.double()).abs() <= scale * (1 + 1e-5) + 1e-6).all())  # within one step
    assert bool(((deq.mean(0) - x.double()).abs() <= 6 * scale * 0.5 / n**0.5 + 1e-5).all())


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    bits=st.sampled_from([2, 4, 8]),
    group=st.sampled_from([-1, 3, 16, 64]),
    seed=st.integers(0, 1000),
)
def test_nearest_quantization_error_is_half_a_step(rows: int, cols: int, bits: int, group: int, seed: int) -> None:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    q = quantize(x, bits=bits, group_size=group)
    codes = codes_of(q)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    size = group if group > 0 else cols
    steps = q.scales.repeat_interleave(size)[: x.numel()].view_as(x)
    err = (dequantize(q) - x).abs()
    assert bool((err <= steps * 0.5 + 1e-5).all())
    # packed storage: 8 // bits codes per byte
    assert q.codes.numel() == (x.numel() + 8 // bits - 1) // (8 // bits)
    assert q.codes.dtype == (torch.int8 if bits == 8 else torch.uint8)


def _ref_projector(cfg: GaLoreConfig) -> GaLoreProjector:
    return GaLoreProjector(
        cfg.rank,
        update_proj_gap=cfg.update_proj_gap,
        scale=cfg.galore_scale,
        proj_type="std",
        quant=cfg.proj_quant,
        group_size=cfg.proj_group_size,
        n_bit=cfg.proj_bits,
        cos_threshold=cfg.cos_threshold,
        gamma_proj=cfg.gamma_proj,
        queue_size=cfg.queue_size,
    )


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])  # right and left projection
@pytest.mark.parametrize("proj_quant", [False, True])
def test_projector_follows_q_galore_torch(shape: tuple[int, int], proj_quant: bool) -> None:
    cfg = GaLoreConfig(
        rank=4,
        update_proj_gap=2,
        quantize=True,
        proj_quant=proj_quant,
        proj_bits=4,
        proj_group_size=16,
        queue_size=2,
        cos_threshold=0.4,
        gamma_proj=2,
    )
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    tx = galore_adamw(1e-3, config=cfg, targets={"w"})
    state = tx.init({"w": torch.zeros(shape)})
    ref = _ref_projector(cfg)
    refreshes, ref_refreshes = [], []
    for step in range(20):
        grad = base + 0.05 * torch.randn(shape, generator=g)  # slowly varying: successive projectors agree
        count = ref.svd_count
        want = ref.project(grad, step)
        if ref.svd_count > count:
            ref_refreshes.append(step)
        old = state["w"].proj
        _, state = tx.update({"w": grad}, state)
        proj = state["w"].proj
        if proj is not old:
            refreshes.append(step)
        assert state["w"].gap == ref.update_proj_gap, step
        got = project(grad, proj)
        if not proj_quant:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert all(isinstance(m, QuantizedTensor) and m.bits == 4 for m in proj.mats)
            # both are within one int4 step of the float projector: the low-rank gradients agree closely
            assert (got - want).norm() <= 0.1 * want.norm()
    assert refreshes == ref_refreshes == [0, 2, 4, 8, 16]  # the gap doubled twice


def test_projector_int4_error_bound_and_bytes() -> None:
    cfg = GaLoreConfig(rank=8, quantize=True, proj_quant=True, proj_bits=4, proj_group_size=32)
    tx = galore_adamw(1e-3, config=cfg, targets={"w"})
    grad = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    _, state = tx.update({"w": grad}, tx.init({"w": torch.zeros(64, 48)}))
    (mat,) = state["w"].proj.mats
    assert isinstance(mat, QuantizedTensor) and mat.shape == (8, 48)
    dense = torch.linalg.svd(grad, full_matrices=False)[2][:8]
    steps = mat.scales.repeat_interleave(32).view(8, 48)
    assert bool(((dequantize(mat) - dense).abs() <= steps / 2 + 1e-6).all())
    assert bool((mat.scales <= (2.0 / 15) + 1e-6).all())  # entries of an orthonormal row lie in [-1, 1]
    assert mat.codes.numel() == 8 * 48 // 2  # two int4 codes per byte: 1/8 of the float32 projector's bytes


def test_eager_state_dict_round_trip_with_int4_projectors() -> None:
    # a float weight with quantized projectors: load_state_dict casts the state to the weight's dtype
    keys = dict(rank=4, update_proj_gap=3, scale=1.0, proj_type="std", quant=True, quant_n_bit=4, quant_group_size=16)
    keys.update(cos_threshold=0.4, gamma_proj=2, queue_size=2)
    grads = [torch.randn(12, 20, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    w1, w2 = torch.nn.Parameter(torch.zeros(12, 20)), torch.nn.Parameter(torch.zeros(12, 20))
    o1 = GaLoreAdamW([{"params": [w1], **keys}], lr=1e-2)
    o2 = GaLoreAdamW([{"params": [w2], **keys}], lr=1e-2)
    for i, g in enumerate(grads):
        for w, o in ((w1, o1), (w2, o2)):
            w.grad = g.clone()
            o.step()
        if i == 1:
            o2.load_state_dict(copy.deepcopy(o2.state_dict()))
            assert o2.state[w2]["projection"]["left"][0]["codes"].dtype == torch.float32  # cast by torch
    torch.testing.assert_close(w2, w1, rtol=0, atol=0)
    assert o1.state[w1]["gap"] == o2.state[w2]["gap"]


def _batch() -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> float:
    ids = _batch()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        for m in model.modules():
            if isinstance(m, QGaLoreLinear):
                assert m.weight.dtype == torch.int8 and m.float_grad is None
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_training_reaches_galore_loss_with_int8_weights() -> None:
    base = tiny_llama().train().requires_grad_(True)
    galore = GaLoreConfig(rank=8, update_proj_gap=5, target_modules=TARGETS)
    qcfg = dataclasses.replace(galore, quantize=True, proj_quant=True, proj_group_size=64, weight_group_size=64)
    steps = 12
    with torch.no_grad():
        start = float(base(input_ids=_batch(), labels=_batch()).loss)

    ref = copy.deepcopy(base)
    galore_loss = _train(ref, create_galore_optimizer(ref, galore, lr=1e-2), steps)

    model = copy.deepcopy(base)
    names = quantize_model(model, qcfg)
    assert len(names) == 14 and all(isinstance(model.get_submodule(n), QGaLoreLinear) for n in names)
    opt = create_galore_optimizer(model, qcfg, lr=1e-2, generator=0)
    q_loss = _train(model, opt, steps)
    # Q-GaLore makes (almost) the same progress as GaLore
    assert start - q_loss >= 0.9 * (start - galore_loss), (start, galore_loss, q_loss)
    # int8 weights: a quarter of float32's bytes (plus one scale and one minimum per 64 weights)
    q = model.get_submodule(names[0])
    assert q.weight.dtype == torch.int8 and q.weight.requires_grad is False
    # the state holds int4 projectors
    proj = opt.state[q.weight]["projection"]
    (mats,) = proj.values()
    assert mats[0]["bits"] == 4 and mats[0]["codes"].dtype == torch.uint8
    # back to nn.Linear: same function
    ids = _batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        dequantize_model(model)
        after = model(input_ids=ids).logits
    assert not any(isinstance(m, QGaLoreLinear) for m in model.modules())
    torch.testing.assert_close(after, before)

    # optimizer state round-trips (quantized projectors, lazy-refresh state)
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    assert opt.state[q.weight]["projection"].keys() == proj.keys()


def test_functional_loop_keeps_int8_leaves() -> None:
    model = tiny_llama()
    cfg = GaLoreConfig(rank=4, update_proj_gap=2, target_modules=TARGETS, quantize=True, proj_quant=True)
    targets = galore_targets(model, cfg)
    params = quantize_params({n: p.detach() for n, p in model.named_parameters()}, targets, group_size=64)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert tree_nbytes(params) < dense_bytes
    tx = galore_adamw(1e-2, config=cfg, targets=targets, weight_decay=0.01)
    state = tx.init(params)
    ids = _batch()

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, p, (), {"input_ids": ids, "labels": ids}).loss

    first = float(loss_fn(dequantize_params(params)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = torch.func.grad(loss_fn)(dequantize_params(params))
        updates, state = tx.update(grads, state, params)
        params = apply_quantized_updates(params, updates, generator=gen)
    assert all(isinstance(params[n], QuantizedTensor) and params[n].codes.dtype == torch.int8 for n in targets)
    assert float(loss_fn(dequantize_params(params))) < first
    # the same seed gives the same weights (the rounding draws only from the explicit generator)
    again = apply_quantized_updates(params, updates, generator=torch.Generator().manual_seed(5))
    twice = apply_quantized_updates(params, updates, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(again[n].codes, twice[n].codes) for n in targets)


def test_errors_are_typed_and_early() -> None:
    with pytest.raises(ConfigError, match="GaLoreConfig.proj_bits"):
        GaLoreConfig(proj_quant=True, proj_bits=3)
    with pytest.raises(ConfigError, match="GaLoreConfig.gamma_proj"):
        GaLoreConfig(quantize=True, gamma_proj=0.5)
    with pytest.raises(ConfigError, match="GaLoreConfig.queue_size"):
        GaLoreConfig(quantize=True, queue_size=0)
    model = tiny_llama()
    cfg = GaLoreConfig(rank=4, target_modules=TARGETS, quantize=True)
    with pytest.raises(ConfigError, match="quantize_model"):
        create_galore_optimizer(model, cfg)
    quantize_model(model, cfg)
    with pytest.raises(ConfigError, match="explicit generator"):
        create_galore_optimizer(model, cfg)
    params = quantize_params({"w": torch.randn(4, 4)}, {"w"})
    with pytest.raises(ConfigError, match="explicit generator"):
        apply_quantized_updates(params, {"w": torch.zeros(4, 4)}, generator=None)
    with pytest.raises(TargetError, match="2-D"):
        quantize_params({"b": torch.randn(4)}, {"b"})
    with pytest.raises(ConfigError, match="NaN"):
        quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TargetError, match="nn.Linear"):
        quantize_model(tiny_llama(), GaLoreConfig(target_modules=["embed_tokens"], quantize=True))
