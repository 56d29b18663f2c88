"""functuner.tuners.lora.combine vs real PEFT ``add_weighted_adapter`` on tiny transformers models, plus properties."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import functuner as ft
from functuner import LoRAConfig, TunerParams
from functuner.errors import AdapterNameError, ConfigError
from functuner.tuners.lora.combine import COMBINATION_TYPES, adapter_deltas, add_weighted_adapter
from tests.conftest import tiny_gpt2, tiny_llama

PREFIX = "base_model.model."
TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _peft_params(pm, name: str, cfg: LoRAConfig) -> TunerParams:
    """The in-memory tensors of PEFT adapter ``name`` as functuner params (same tensors' values, cloned)."""
    out = {}
    for k, v in pm.state_dict().items():
        if not k.startswith(PREFIX):
            continue
        k = k[len(PREFIX) :]
        if any(
            f".{part}.{name}" in k
            for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
        ):
            out[k] = v.detach().clone()
    return TunerParams(out, cfg, name)


def _build(specs, model_fn=tiny_llama, use_dora=False):
    """A PEFT model with random adapters ``specs = [(name, r, alpha, targets, use_rslora)]`` and our params."""
    torch.manual_seed(1)
    model = model_fn()
    pm = None
    ours = {}
    for name, r, alpha, targets, rslora in specs:
        kw = dict(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, use_dora=use_dora)
        pcfg = peft.LoraConfig(init_lora_weights=False, **kw)
        if pm is None:
            pm = peft.get_peft_model(model, pcfg, adapter_name=name)
        else:
            pm.add_adapter(name, pcfg)
        ours[name] = _peft_params(pm, name, LoRAConfig(init_lora_weights=False, **kw))
    pm.eval()
    return pm, ours


def _peft_deltas(pm, name):
    """PEFT's own ``get_delta_weight`` per adapted module, in Linear orientation, 2-D."""
    out = {}
    for mname, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "get_delta_weight") and (
            name in getattr(mod, "lora_A", {}) or name in getattr(mod, "lora_embedding_A", {})
        ):
            d = mod.get_delta_weight(name).detach()
            if name in mod.lora_embedding_A or getattr(mod, "fan_in_fan_out", False):
                d = d.T
            out[mname] = d.reshape(d.shape[0], -1)
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


SPECS2 = [("a", 4, 8, TARGETS, False), ("b", 4, 16, TARGETS, False)]
DETERMINISTIC_FACTOR = ["linear", "ties", "magnitude_prune"]
SVD_TYPES = ["svd", "ties_svd", "magnitude_prune_svd"]


@pytest.fixture(scope="module")
def two():
    return _build(SPECS2)


def _peft_combine(pm, new, adapters, weights, ctype, **kw):
    pm.base_model.add_weighted_adapter(adapters, weights, new, combination_type=ctype, **kw)
    return pm


@pytest.mark.parametrize("ctype", DETERMINISTIC_FACTOR + ["cat"])
def test_factor_types_match_peft_tensors(two, ctype):
    pm0, ours = two
    pm = copy.deepcopy(pm0)
    kw = {} if ctype in ("linear", "cat") else {"density": 0.5}
    _peft_combine(pm, "c", ["a", "b"], [0.7, -1.3], ctype, **kw)
    got = add_weighted_adapter(ours, [0.7, -1.3], "c", ctype, **kw)
    want = _peft_params(pm, "c", got.config)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert got.config.r == pm.peft_config["c"].r and got.config.lora_alpha == pm.peft_config["c"].lora_alpha


@pytest.mark.parametrize("ctype", SVD_TYPES)
def test_svd_types_match_peft_delta(two, ctype):
    pm0, ours = two
    pm = copy.deepcopy(pm0)
    kw = {} if ctype == "svd" else {"density": 0.6}
    _peft_combine(pm, "c", ["a", "b"], [1.5, 0.5], ctype, svd_rank=6, **kw)
    got = add_weighted_adapter(ours, [1.5, 0.5], "c", ctype, svd_rank=6, **kw)
    want = _peft_deltas(pm, "c")
    mine = adapter_deltas(got)
    assert set(mine) == set(want) and len(want) == 5
    for k in want:
        assert _rel(mine[k], want[k]) < 1e-5, k


def test_svd_clamp_and_reduced_matrices_match_peft(two):
    pm0, ours = two
    pm = copy.deepcopy(pm0)
    kw = dict(svd_rank=3, svd_clamp=0.9, svd_full_matrices=False)
    _peft_combine(pm, "c", ["a", "b"], [1.0, 2.0], "svd", **kw)
    got = add_weighted_adapter(ours, [1.0, 2.0], "c", "svd", **kw)
    want, mine = _peft_deltas(pm, "c"), adapter_deltas(got)
    for k in want:
        assert _rel(mine[k], want[k]) < 1e-5, k


@pytest.mark.parametrize("ctype", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_matches_peft_given_the_same_random_stream(two, ctype):
    """PEFT draws its masks from the global RNG right after initialising the new adapter (which draws too).

    We observe (not replace) PEFT's ``inject_adapter`` to read the global RNG state at the moment the mask
    draws begin; a generator in that state must reproduce PEFT's result exactly.
    """
    pm0, ours = two
    pm = copy.deepcopy(pm0)
    real_inject = pm.base_model.inject_adapter
    states = []

    def observed_inject(*args, **kwargs):
        out = real_inject(*args, **kwargs)
        states.append(torch.get_rng_state())
        return out

    pm.base_model.inject_adapter = observed_inject
    torch.manual_seed(1234)
    _peft_combine(pm, "c", ["a", "b"], [0.8, 1.1], ctype, density=0.4, majority_sign_method="frequency")
    assert len(states) == 1
    gen = torch.Generator()
    gen.set_state(states[0])
    got = add_weighted_adapter(
        ours, [0.8, 1.1], "c", ctype, density=0.4, majority_sign_method="frequency", generator=gen
    )
    want = _peft_deltas(pm, "c")
    mine = adapter_deltas(got)
    for k in want:
        assert _rel(mine[k], want[k]) < 1e-5, k
    gen.set_state(states[0])
    again = add_weighted_adapter(
        ours, [0.8, 1.1], "c", ctype, density=0.4, majority_sign_method="frequency", generator=gen
    )
    assert again == got  # reproducible from the generator alone
    assert add_weighted_adapter(ours, [0.8, 1.1], "c", ctype, density=0.4, generator=7) == add_weighted_adapter(
        ours, [0.8, 1.1], "c", ctype, density=0.4, generator=7
    )
    assert add_weighted_adapter(ours, [0.8, 1.1], "c", ctype, density=0.4, generator=99) != got


def test_cat_with_mixed_ranks_and_targets_matches_peft():
    pm, ours = _build([("a", 2, 4, ["q_proj", "v_proj"], False), ("b", 6, 3, ["v_proj", "o_proj"], False)])
    pm.base_model.add_weighted_adapter(["a", "b"], [2.0, 0.5], "c", combination_type="cat")
    got = add_weighted_adapter(ours, [2.0, 0.5], "c", "cat")
    want = _peft_params(pm, "c", got.config)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert set(got.config.target_modules) == {"q_proj", "v_proj", "o_proj"} and got.config.r == 8


def test_svd_on_gpt2_conv1d_matches_peft():
    pm, ours = _build([("a", 4, 8, ["c_attn"], False), ("b", 2, 8, ["c_attn"], False)], model_fn=tiny_gpt2)
    pm.base_model.add_weighted_adapter(["a", "b"], [1.0, -0.5], "c", combination_type="svd")
    got = add_weighted_adapter(ours, [1.0, -0.5], "c", "svd")
    want, mine = _peft_deltas(pm, "c"), adapter_deltas(got)
    assert len(want) == 2
    for k in want:
        assert _rel(mine[k], want[k]) < 1e-5, k


def test_dora_combination_matches_peft_delta_and_magnitude():
    pm, ours = _build([("a", 4, 8, ["q_proj"], False), ("b", 4, 8, ["q_proj"], False)], use_dora=True)
    # the new adapter copies adapter a's config; with init_lora_weights=True PEFT starts it at B = 0, so its
    # magnitude is the base weight's row norm (with False it would depend on throwaway random factors)
    pm.peft_config["a"].init_lora_weights = True
    model = tiny_llama()  # the same base weights PEFT wrapped (tiny_llama seeds itself)
    pm.base_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "c", combination_type="linear")
    got = add_weighted_adapter(ours, [1.0, 1.0], "c", "linear", model=model)
    want = _peft_params(pm, "c", got.config)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="model="):
        add_weighted_adapter(ours, [1.0, 1.0], "c", "linear")


def test_rslora_result_has_unit_scaling_where_peft_overscales():
    pm, ours = _build([("a", 4, 8, ["q_proj"], True), ("b", 4, 16, ["q_proj"], True)])
    got = add_weighted_adapter(ours, [1.0, 1.0], "c", "cat")
    exact = {k: _peft_deltas(pm, "a")[k] + _peft_deltas(pm, "b")[k] for k in _peft_deltas(pm, "a")}
    mine = adapter_deltas(got)
    for k in exact:
        assert _rel(mine[k], exact[k]) < 1e-5
    pm.base_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "c", combination_type="cat")
    peft_delta = _peft_deltas(pm, "c")
    k = next(iter(exact))
    # PEFT 0.21.2 keeps use_rslora with lora_alpha = r = 8, so its scaling is sqrt(8), not 1
    assert _rel(peft_delta[k], exact[k] * 8**0.5) < 1e-5


def test_single_adapter_is_linear_like_peft(two):
    pm0, ours = two
    pm = copy.deepcopy(pm0)
    _peft_combine(pm, "c", ["b"], [0.5], "svd")
    got = add_weighted_adapter(ours, [0.5], "c", "svd", names=["b"])
    want = _peft_params(pm, "c", got.config)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
def test_errors(two):
    _, ours = two
    ours_mixed = {"a": ours["a"], "r2": _build([("r2", 2, 4, TARGETS, False)])[1]["r2"]}
    with pytest.raises(ConfigError, match="equal ranks"):
        add_weighted_adapter(ours_mixed, [1.0, 1.0], "c", "linear")
    with pytest.raises(ConfigError, match="equal ranks"):
        add_weighted_adapter(ours_mixed, [1.0, 1.0], "c", "dare_ties", density=0.5, generator=0)
    assert add_weighted_adapter(ours_mixed, [1.0, 1.0], "c", "cat").config.r == 6
    with pytest.raises(AdapterNameError, match="nope"):
        add_weighted_adapter(ours, [1.0], "c", "linear", names=["nope"])
    with pytest.raises(ConfigError, match="empty"):
        add_weighted_adapter([], [], "c", "linear")
    with pytest.raises(ConfigError, match="2 adapter.*1 weight"):
        add_weighted_adapter(ours, [1.0], "c", "linear")
    with pytest.raises(ConfigError, match="density"):
        add_weighted_adapter(ours, [1.0, 1.0], "c", "ties")
    with pytest.raises(ConfigError, match="combination_type"):
        add_weighted_adapter(ours, [1.0, 1.0], "c", "average")
    with pytest.raises(TypeError, match="generator"):
        add_weighted_adapter(ours, [1.0, 1.0], "c", "dare_linear", density=0.5)
    with pytest.raises(ConfigError, match="svd_rank"):
        add_weighted_adapter(ours, [1.0, 1.0], "c", "svd", svd_rank=1000)
    with pytest.raises(AdapterNameError):
        add_weighted_adapter(ours, [1.0, 1.0], "bad.name", "linear")
    assert set(COMBINATION_TYPES) == {
        "svd",
        "linear",
        "cat",
        "ties",
        "ties_svd",
        "dare_ties",
        "dare_linear",
        "dare_ties_svd",
        "dare_linear_svd",
        "magnitude_prune",
        "magnitude_prune_svd",
    }


def test_inputs_are_not_changed(two):
    _, ours = two
    before = {n: {k: v.clone() for k, v in p.items()} for n, p in ours.items()}
    for ctype in COMBINATION_TYPES:
        add_weighted_adapter(ours, [0.3, 0.9], "c", ctype, density=0.5, generator=0)
    for n, p in ours.items():
        for k, v in p.items():
            assert torch.equal(v, before[n][k])


# ---------------------------------------------------------------------------
# properties (hypothesis)
# ---------------------------------------------------------------------------
def _random_lora(seed: int, r: int, name: str) -> TunerParams:
    g = torch.Generator().manual_seed(seed)
    cfg = LoRAConfig(r=r, lora_alpha=2 * r, target_modules=["q"], init_lora_weights=False)
    return TunerParams(
        {
            f"m.q.lora_A.{name}.weight": torch.randn(r, 12, generator=g),
            f"m.q.lora_B.{name}.weight": torch.randn(10, r, generator=g),
        },
        cfg,
        name,
    )


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 6), ctype=st.sampled_from(["linear", "cat", "svd"]))
def test_one_adapter_at_weight_one_is_identity(seed, r, ctype):
    p = _random_lora(seed, r, "x")
    got = adapter_deltas(add_weighted_adapter([p], [1.0], "y", ctype))["m.q"]
    want = adapter_deltas(p)["m.q"]
    assert _rel(got, want) < 1e-5


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), w1=st.floats(-3, 3), w2=st.floats(-3, 3), c=st.floats(0.1, 4))
def test_cat_delta_is_linear_and_linear_is_homogeneous(seed, w1, w2, c):
    p, q = _random_lora(seed, 3, "p"), _random_lora(seed + 1, 3, "q")
    dp, dq = adapter_deltas(p)["m.q"], adapter_deltas(q)["m.q"]
    cat = adapter_deltas(add_weighted_adapter([p, q], [w1, w2], "y", "cat"))["m.q"]
    torch.testing.assert_close(cat, w1 * dp + w2 * dq, rtol=1e-4, atol=1e-4)
    lin = adapter_deltas(add_weighted_adapter([p, q], [w1, w2], "y", "linear"))["m.q"]
    lin_c = adapter_deltas(add_weighted_adapter([p, q], [c * w1, c * w2], "y", "linear"))["m.q"]
    torch.testing.assert_close(lin_c, c * lin, rtol=1e-4, atol=1e-4)
    # full-rank svd of the weighted sum is exact task arithmetic
    svd = adapter_deltas(add_weighted_adapter([p, q], [w1, w2], "y", "svd", svd_rank=6))["m.q"]
    torch.testing.assert_close(svd, w1 * dp + w2 * dq, rtol=1e-4, atol=1e-4)


def test_linear_keeps_peft_cross_terms():
    """'linear' weights A and B by sqrt(w s) each, so identical adapters give (sum sqrt w)^2, not sum w (as PEFT)."""
    p = _random_lora(7, 4, "p")
    q = TunerParams({k.replace(".p.", ".q."): v for k, v in p.items()}, p.config, "q")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = adapter_deltas(add_weighted_adapter([p, q], [0.25, 0.5], "y", "linear"))["m.q"]
    factor = (0.25**0.5 + 0.5**0.5) ** 2
    torch.testing.assert_close(got, factor * adapter_deltas(p)["m.q"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("module", "config", "match"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), {"r": 4}, "grouped convolution"),
        (nn.Linear(4, 4), {"r": 4, "lora_bias": True}, "lora_bias=True"),
    ],
    ids=["grouped-conv", "lora-bias"],
)
@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_refuses_adapters_it_cannot_combine_up_front(module, config, match, combination_type) -> None:
    # these would combine silently wrong (grouped B is not B @ A) or lose a tensor: refused with the reason
    model = nn.Sequential(module)
    cfg = LoRAConfig(target_modules=["0"], **config)
    a = ft.init(model, cfg, generator=0, adapter_name="a")
    b = ft.init(model, cfg, generator=1, adapter_name="b")
    with pytest.raises(ConfigError, match=match):
        add_weighted_adapter({"a": a, "b": b}, [0.5, 0.5], "c", combination_type, model=model)
