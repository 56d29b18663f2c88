"""MergedLinear LoRA (SWIFT's ``use_merged_linear=True`` + ``enable_lora``): functuner vs a hand-computed reference,
vs ms-swift 4.6's own layer (outputs, delta weights, merged outputs, trainable names recorded by
``tests/fixtures/make_merged_linear_fixture.py`` in ms-swift's venv), merge/unmerge, ``torch.func``, the shim's
SWIFT checkpoints, the exact plain-LoRA conversion read back by the real PEFT, and the typed refusals.

The live side-by-side run against ms-swift (config JSON, saved keys, optimizer groups, loading each other's
checkpoints) is the ``merged_linear`` case of ``tests/swift_interop/scenarios.py`` (``.ci/run``).
"""

from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import functuner as ft
from functuner.errors import CheckpointError, ConfigError, ParamsMismatchError, TargetError
from functuner.tuners.lora import merged_linear as ml
from tests.models import checksum, tiny_glm

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "merged_linear", "swift.safetensors")
QV = {"r": 2, "lora_alpha": 4, "target_modules": ["query_key_value"], "use_merged_linear": True}
ENABLE = [True, False, True]
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(21))


def _cfg(**kw):
    return ft.LoRAConfig(**{**QV, "enable_lora": ENABLE, **kw})


def _perturbed(model, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ft.init(model, cfg, generator=seed).map(lambda t: t + 0.2 * torch.randn(t.shape, generator=g))


def _by_hand(W, A, B, enable, s):
    """The delta weight entry by entry from the definition: chunk j, the g-th enabled one, gets s B_g A_g."""
    k, n = len(enable), sum(enable)
    c, r = W.shape[0] // k, A.shape[0] // n
    delta = torch.zeros(W.shape, dtype=torch.float64)
    g = 0
    for j, on in enumerate(enable):
        if on:
            Bg, Ag = B[g * c : (g + 1) * c].double(), A[g * r : (g + 1) * r].double()
            for row in range(c):
                for col in range(W.shape[1]):
                    delta[j * c + row, col] = s * sum(Bg[row, i] * Ag[i, col] for i in range(r))
            g += 1
    return delta


@pytest.mark.parametrize("enable", [[True, False, True], [False, True, False], [True, True, True], [True, False]])
def test_forward_and_merge_match_the_hand_computed_delta(enable):
    torch.manual_seed(0)
    out = 6 if len(enable) == 3 else 8
    layer = torch.nn.Sequential(torch.nn.Linear(5, out))
    cfg = ft.LoRAConfig(r=2, lora_alpha=3, target_modules=["0"], use_merged_linear=True, enable_lora=enable)
    params = _perturbed(layer, cfg)
    A, B = params["0.lora_A"], params["0.lora_B"]
    assert A.shape == (2 * sum(enable), 5) and B.shape == (out // len(enable) * sum(enable), 2)
    want_delta = _by_hand(layer[0].weight, A, B, enable, 1.5)
    torch.testing.assert_close(ml.delta_weight(A, B, tuple(enable), 1.5).double(), want_delta, atol=1e-6, rtol=0)
    x = torch.randn(3, 4, 5)
    want = x.double() @ (layer[0].weight.double() + want_delta).T + layer[0].bias.double()
    torch.testing.assert_close(ft.apply(layer, params, (x,)).double(), want, atol=1e-5, rtol=0)
    merged = ft.merge(layer, params)
    torch.testing.assert_close(merged["0.weight"].double(), layer[0].weight.double() + want_delta, atol=1e-6, rtol=0)
    assert torch.equal(merged["0.weight"], (layer[0].weight.float() + ml.delta_weight(A, B, tuple(enable), 1.5)))
    back = ft.unmerge(layer, params, merged)["0.weight"]  # one rounding away (keep the originals for exactness)
    torch.testing.assert_close(back, layer[0].weight, atol=1e-6, rtol=0)


def _fixture():
    with safe_open(FIXTURE, "pt") as f:
        meta = f.metadata()
    return load_file(FIXTURE), meta


@pytest.mark.parametrize("case", ["qv", "k_only", "all_rank_pattern"])
def test_matches_ms_swift(case):
    """ms-swift 4.6's MergedLinear with the same tensors: outputs, per-layer delta, merged outputs, names."""
    ref, meta = _fixture()
    kwargs = json.loads(meta[f"{case}.kwargs"])
    model = tiny_glm()
    assert checksum(model) == float(meta["base_checksum"])
    params = ft.init(model, ft.LoRAConfig(**kwargs), generator=0)
    theirs = {k[len(case) + 1 :]: v for k, v in ref.items() if k.startswith(f"{case}.") and ".lora_" in k}
    assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in theirs.items()}
    params = ft.TunerParams(theirs, ft.LoRAConfig(**kwargs), "default")
    torch.testing.assert_close(ft.apply(model, params, (ref["ids"],)), ref[f"{case}.output"], atol=1e-6, rtol=1e-6)
    for site in ml.sites(params, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "test"):
        delta = ml.delta_weight(params[site.a], params[site.b], site.enable, site.scaling)
        torch.testing.assert_close(delta, ref[f"{case}.{site.name}.delta"], atol=1e-7, rtol=1e-6)
    merged = torch.func.functional_call(model, ft.merge(model, params), (ref["ids"],))
    torch.testing.assert_close(merged, ref[f"{case}.merged_output"], atol=1e-6, rtol=1e-6)
    sm = ft.Swift.prepare_model(tiny_glm(), ft.LoRAConfig(**kwargs))
    names = sorted(n for n, p in sm.base_model.named_parameters() if p.requires_grad)
    assert names == json.loads(meta[f"{case}.trainable"])
    # ms-swift 4.6 writes no tensor file for this layer (documented); functuner writes SWIFT's names
    assert "default/adapter_model.safetensors" not in json.loads(meta[f"{case}.files"])


def test_shim_checkpoint_round_trip_and_exact_merge(tmp_path):
    cfg = _cfg()
    params = _perturbed(tiny_glm(), cfg)
    sm = ft.Swift.prepare_model(tiny_glm(), cfg)
    sm.load_state_dict(dict(params), adapter_name="default")
    want = ft.apply(tiny_glm(), params, (IDS,))
    torch.testing.assert_close(sm(IDS), want, atol=0, rtol=0)
    sm.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "default" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(params.keys())  # SWIFT's in-memory names: <module>.lora_A / lora_B
    with open(tmp_path / "default" / "adapter_config.json") as f:
        data = json.load(f)
    assert data["use_merged_linear"] is True and data["enable_lora"] == ENABLE and data["swift_type"] == "LORA"
    loaded = ft.Swift.from_pretrained(tiny_glm(), str(tmp_path), is_trainable=True)
    torch.testing.assert_close(loaded(IDS), want, atol=0, rtol=0)
    assert all(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    before = {n: p.detach().clone() for n, p in loaded.base_model.named_parameters()}
    ft.Swift.merge(loaded)  # SWIFT 4.6 adds the delta without marking the layer merged (counted twice); not here
    torch.testing.assert_close(loaded(IDS), want, atol=1e-5, rtol=1e-5)
    ft.Swift.unmerge(loaded)
    assert all(torch.equal(p, before[n]) for n, p in loaded.base_model.named_parameters())
    again = ft.load(tmp_path, tiny_glm())  # the functional reader: the same params back
    assert again.config == cfg and all(torch.equal(again[k], params[k]) for k in params.keys())


def test_grad_and_vmap():
    model, cfg = tiny_glm(), _cfg(lora_dropout=0.0)
    params = _perturbed(model, cfg)

    def loss(p):
        return ft.apply(model, p, (IDS,)).pow(2).mean()

    grads = torch.func.grad(loss)(params)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    loss(ft.TunerParams(leaves, cfg, "default")).backward()
    for k, v in leaves.items():
        torch.testing.assert_close(grads[k], v.grad, atol=1e-6, rtol=1e-5)
    scales = torch.tensor([0.0, 1.0, 2.0])
    got = torch.func.vmap(lambda s: ft.apply(model, params.map(lambda t: t * s), (IDS,)))(scales)
    for i, s in enumerate(scales):
        torch.testing.assert_close(got[i], ft.apply(model, params.map(lambda t, s=s: t * s), (IDS,)))


def test_dropout_follows_the_generator():
    model, cfg = tiny_glm().train(), _cfg(lora_dropout=0.5)
    params = _perturbed(model, cfg)
    assert ml.needs_generator(model, params) and not ml.needs_generator(tiny_glm(), params)
    runs = [ft.apply(model, params, (IDS,), generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_plain_lora_conversion_is_exact_and_peft_reads_it(tmp_path):
    model, cfg = tiny_glm(), _cfg(rank_pattern={"layers.1.query_key_value": 3}, alpha_pattern={"layers.0.qu.*": 2})
    params = _perturbed(model, cfg)
    plain = ml.to_plain_lora(params)
    assert plain.config.r == 4 and plain.config.lora_alpha == 8 and not plain.config.use_merged_linear
    assert plain.config.rank_pattern == {"layers.1.query_key_value": 6}
    for site in ml.sites(params, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "test"):
        A = plain[f"{site.name}.lora_A.default.weight"]
        B = plain[f"{site.name}.lora_B.default.weight"]
        s = plain.config.scaling_for(site.name)
        assert s == site.scaling
        assert torch.equal(B @ A * s, ml.delta_weight(params[site.a], params[site.b], site.enable, site.scaling))
    ours = ft.apply(model, params, (IDS,))
    torch.testing.assert_close(ft.apply(model, plain, (IDS,)), ours, atol=1e-6, rtol=1e-6)
    out = ft.save(plain, tmp_path / "peft", format="peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    torch.testing.assert_close(pm(IDS), ours, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"use_rslora": True}, "use_rslora"),
        ({"init_lora_weights": "gaussian"}, "init_lora_weights"),
        ({"bias": "all"}, "bias"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"enable_lora": [False, False, False]}, "enable_lora"),
        ({"enable_lora": [1, 0, 1]}, "enable_lora"),
        ({"use_merged_linear": False}, "enable_lora"),
    ],
)
def test_config_refusals_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kwargs)


def test_refusals_are_typed(tmp_path):
    with pytest.raises(ConfigError, match="needs enable_lora"):
        ft.init(tiny_glm(), ft.LoRAConfig(**QV), generator=0)
    with pytest.raises(TargetError, match="nn.Linear"):
        ft.init(tiny_glm(), _cfg(target_modules=["embed"]), generator=0)
    with pytest.raises(ConfigError, match="not divisible"):
        ft.init(tiny_glm(), _cfg(target_modules=["dense"], enable_lora=[True, False, True]), generator=0)
    params = _perturbed(tiny_glm(), _cfg())
    with pytest.raises(CheckpointError, match="use_merged_linear.*to_plain_lora"):
        ft.save(params, tmp_path / "peft", format="peft")
    with pytest.raises(ConfigError, match="use_merged_linear"):
        ft.tuner_for(params.config).combine([params, params], [0.5, 0.5], combination_type="linear")
    reason = ft.tuner_for(params.config).per_sample.unsupported(tiny_glm(), params)
    assert reason is not None and "use_merged_linear" in reason
    with pytest.raises(ParamsMismatchError, match="lora_A"):  # a rank that does not fit the layer
        ft.validate(tiny_glm(), ft.TunerParams(dict(_perturbed(tiny_glm(), _cfg(r=3))), _cfg(), "default"))
    assert not os.path.exists(tmp_path / "peft" / "adapter_model.safetensors")


def test_per_sample_runs_through_the_sub_batch_path():
    """No stacked fast path (``per_sample`` names the field), but the shim's general per-sample path runs it."""
    cfg = _cfg()
    params = _perturbed(tiny_glm(), cfg)
    sm = ft.Swift.prepare_model(tiny_glm(), cfg)
    sm.load_state_dict(dict(params), adapter_name="default")
    got = sm(IDS, adapter_names=["default", "__base__"])
    torch.testing.assert_close(got[0], ft.apply(tiny_glm(), params, (IDS,))[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], tiny_glm()(IDS)[1], atol=1e-6, rtol=1e-6)


def test_one_adapter_per_merged_layer_and_nothing_changes_on_refusal():
    """SWIFT's names carry no adapter name, so a second adapter on the same layer is refused before any change."""
    sm = ft.Swift.prepare_model(tiny_glm(), _cfg())
    before = sorted(n for n, _ in sm.named_parameters())
    with pytest.raises(ConfigError, match="already holds another adapter's 'lora_A'"):
        ft.Swift.prepare_model(sm, {"second": _cfg()})
    with pytest.raises(ParamsMismatchError, match="lora_A"):
        ft.Swift.prepare_model(sm, {"plain": ft.LoRAConfig(r=2, target_modules=["query_key_value"])})
    assert sorted(n for n, _ in sm.named_parameters()) == before and list(sm.adapters) == ["default"]
    ok = ft.Swift.prepare_model(sm, {"other": _cfg(target_modules=["dense"], enable_lora=[True])})
    assert "base_model.layers.0.dense.lora_A" in dict(ok.named_parameters())


def test_merge_from_weights_alone_and_streaming_plan_agree_with_the_model_merge():
    model, cfg = tiny_glm(), _cfg()
    params = _perturbed(model, cfg)
    from_model = ft.merge(model, params)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    from_weights = ft.merge(state, params)
    plan = ft.tuner_for(cfg).plan_shard_merge(
        dict(params), cfg, "default", {k: tuple(v.shape) for k, v in state.items()}, False, "test"
    )
    assert sorted(plan.merges) == ["layers.0.query_key_value.weight", "layers.1.query_key_value.weight"]
    for key, fn in plan.merges.items():
        assert torch.equal(from_weights[key], from_model[key])
        assert torch.equal(fn(state[key]).to(state[key].dtype), from_model[key])
    assert all(torch.equal(from_model[k], state[k]) for k in state if k not in plan.merges)


def test_longlora_refuses_merged_linear():
    cfg = ft.LongLoRAConfig(**QV, enable_lora=ENABLE)
    with pytest.raises(ConfigError, match="use_merged_linear"):
        ft.init(tiny_glm(), cfg, generator=0)
