"""LoRA's data-driven inits (PiSSA, fast PiSSA, OLoRA, orthogonal, EVA, CorDA) against the real ``peft``.

Each init runs in PEFT and in functuner on the same model, seed and data:
deterministic inits give the same factors and the same residual base weights to
fp32 tolerance; randomized ones (fast PiSSA, orthogonal) draw from a generator
put in the state PEFT's global RNG is in when it draws, so they match exactly
too.  EVA's rank redistribution and components are compared with PEFT's
``initialize_lora_eva_weights``; CorDA with ``preprocess_corda``.  The
conversion of a trained PiSSA adapter to a plain LoRA delta is checked against
PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``.
The model is PEFT's toy ``MLP`` (``tests/test_custom_models.py`` at commit
5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40, ported in ``test_lora_peft_cases.py``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.eva import initialize_lora_eva_weights
from torch import nn

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners.lora.inits.data import corda_covariance
from tests.models import tiny_gpt2
from tests.tuners.lora.test_lora_peft_cases import MLP

X = torch.arange(90).view(9, 10)
ATOL = RTOL = 1e-5


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def _peft_factors(pm: peft.PeftModel, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layer = pm.base_model.model.get_submodule(name)
    return (
        layer.lora_A["default"].weight.detach(),
        layer.lora_B["default"].weight.detach(),
        layer.base_layer.weight.detach(),
    )


def _check_against_peft(model: nn.Module, pm: peft.PeftModel, res: ft.LoraInit, names: list[str]) -> None:
    for name in names:
        A, B, W = _peft_factors(pm, name)
        p = res.params
        torch.testing.assert_close(p[f"{name}.lora_A.default.weight"], A, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(p[f"{name}.lora_B.default.weight"], B, atol=ATOL, rtol=RTOL)
        if f"{name}.weight" in res.base_weights:
            torch.testing.assert_close(res.base_weights[f"{name}.weight"], W, atol=ATOL, rtol=RTOL)
        else:
            assert torch.equal(W, model.get_submodule(name).weight)


def _run_on(model: nn.Module, res: ft.LoraInit, x: Any) -> Any:
    """The adapter's forward on the residual base weights (a copy of the model gets them; the model is not written)."""
    clone = copy.deepcopy(model)
    clone.load_state_dict(res.base_weights, strict=False)
    return ft.apply(clone, res.params, (x,))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_equal_peft(init: str) -> None:
    model = _mlp()
    kwargs = {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 8, "init_lora_weights": init}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = ft.lora_init(model, ft.LoRAConfig(**kwargs), generator=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "lora_init wrote the model"
    assert set(res.base_weights) == {"lin0.weight", "lin1.weight"}
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).eval()
    _check_against_peft(model, pm, res, ["lin0", "lin1"])
    # at init the adapter on the residual base computes the base model, as in PEFT
    torch.testing.assert_close(_run_on(model, res, X), model(X), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_run_on(model, res, X), pm(X), atol=1e-5, rtol=1e-5)
    # functuner.init gives the same params (and never the residual, which only lora_init returns)
    p = ft.init(model, ft.LoRAConfig(**kwargs), generator=0)
    for k in p:
        assert torch.equal(p[k], res.params[k])
    assert ft.lora_residual_weights(model, p).keys() == res.base_weights.keys()


def test_pissa_on_gpt2_conv1d_equals_peft() -> None:
    model = tiny_gpt2()
    kwargs = {"target_modules": ["c_attn"], "r": 4, "init_lora_weights": "pissa", "fan_in_fan_out": True}
    res = ft.lora_init(model, ft.LoRAConfig(**kwargs), generator=0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).eval()
    _check_against_peft(model, pm, res, ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"])
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(_run_on(model, res, ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def _aligned_generator(seed: int, r: int, fan_in: int, fan_out: int) -> torch.Generator:
    """A generator in the state PEFT's global RNG is in when PEFT's init draws, for one adapted Linear:
    PEFT first builds ``lora_A = nn.Linear(in, r)`` and ``lora_B = nn.Linear(r, out)`` (one uniform draw each)."""
    g = torch.Generator().manual_seed(seed)
    torch.empty(r, fan_in).uniform_(generator=g)
    torch.empty(fan_out, r).uniform_(generator=g)
    return g


@pytest.mark.parametrize("init", ["pissa_niter_2", "orthogonal"])
def test_randomized_inits_equal_peft_from_the_same_random_stream(init: str) -> None:
    model = _mlp()
    kwargs = {"target_modules": ["lin0"], "r": 4, "lora_alpha": 8, "init_lora_weights": init}
    torch.manual_seed(123)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).eval()
    state = torch.get_rng_state()
    res = ft.lora_init(model, ft.LoRAConfig(**kwargs), generator=_aligned_generator(123, 4, 10, 20))
    assert torch.equal(state, torch.get_rng_state()), "the init used torch's global RNG"
    _check_against_peft(model, pm, res, ["lin0"])
    if init == "orthogonal":  # B A = 0: the base is unchanged and the model starts as the base model
        assert res.base_weights == {}
        p = res.params
        assert torch.allclose(p["lin0.lora_B.default.weight"] @ p["lin0.lora_A.default.weight"], torch.zeros(20, 10))
    else:  # fast SVD: the residual plus the adapter is the base weight, so the model starts as the base model
        assert set(res.base_weights) == {"lin0.weight"}
        torch.testing.assert_close(_run_on(model, res, X), model(X), atol=1e-4, rtol=1e-4)


def _inputs_of(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach()))
        for n in names
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_equals_peft(method: str) -> None:
    model = _mlp()
    kwargs: dict[str, Any] = {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 8, "init_lora_weights": "corda"}
    peft_cfg = peft.LoraConfig(**kwargs, corda_config=CordaConfig(corda_method=method))
    pmodel = copy.deepcopy(model)
    preprocess_corda(pmodel, peft_cfg, run_model=lambda: pmodel(X))
    pm = peft.get_peft_model(pmodel, peft_cfg).eval()
    covs = {n: corda_covariance([x]) for n, x in _inputs_of(model, ["lin0", "lin1"], X).items()}
    cfg = ft.LoRAConfig(**kwargs, corda_config={"corda_method": method})
    res = ft.lora_init(model, cfg, generator=0, data=covs)
    _check_against_peft(model, pm, res, ["lin0", "lin1"])
    torch.testing.assert_close(_run_on(model, res, X), model(X), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="covariance"):
        ft.init(model, cfg, generator=0)


def test_eva_equals_peft() -> None:
    model = _mlp()
    kwargs: dict[str, Any] = {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 8, "init_lora_weights": "eva"}
    eva = {"rho": 2.0, "use_label_mask": False}
    with pytest.warns(UserWarning, match="low_cpu_mem_usage"):  # PEFT's advice for large models
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs, eva_config=peft.EvaConfig(**eva)))
    initialize_lora_eva_weights(
        pm,
        dataloader=[X],
        forward_fn=lambda m, inputs: m(inputs),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=lambda layer_input, model_input, layer_name: layer_input[0].float(),
        show_progress_bar=False,
    )
    pm.eval()
    acts = _inputs_of(model, ["lin0", "lin1"], X)
    res = ft.lora_init(model, ft.LoRAConfig(**kwargs, eva_config=eva), generator=0, data=acts)
    pcfg = pm.peft_config["default"]
    assert res.params.config.rank_pattern == pcfg.rank_pattern
    assert res.params.config.alpha_pattern == pytest.approx(pcfg.alpha_pattern)
    assert res.base_weights == {}
    for name in ["lin0", "lin1"]:
        if name not in res.params.config.target_modules:
            continue
        A = pm.base_model.model.get_submodule(name).lora_A["default"].weight.detach()
        ours = res.params[f"{name}.lora_A.default.weight"]
        # PEFT fits incrementally with a randomized SVD: same components up to sign and fp32 round-off
        torch.testing.assert_close(ours.abs(), A.abs(), atol=1e-4, rtol=1e-3)
        torch.testing.assert_close((ours @ A.T).abs(), torch.eye(A.shape[0]), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(ft.apply(model, res.params, (X,)), model(X), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ft.apply(model, res.params, (X,)), pm(X), atol=1e-6, rtol=1e-6)


def test_pissa_converted_to_plain_lora_equals_peft(tmp_path: Path) -> None:
    model = _mlp()
    kwargs = {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 8, "init_lora_weights": "pissa"}
    # PEFT: initial adapter saved with init_lora_weights=True, "training", then the conversion on save
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).eval()
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(tmp_path / "init"))
    pm.peft_config["default"].init_lora_weights = "pissa"
    res = ft.lora_init(model, ft.LoRAConfig(**kwargs), generator=0)
    g = torch.Generator().manual_seed(1)
    trained = res.params.map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g))
    peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(trained))
    with pytest.warns(UserWarning, match="PiSSA changes the base weights"):  # PEFT loads the initial adapter beside
        pm.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "converted")).eval()
    plain = ft.lora_to_plain(trained, res.params)
    assert plain.config.r == 4 and plain.config.lora_alpha == 16 and plain.config.init_lora_weights is True
    ours = ft.apply(model, plain, (X,))  # on the original base weights
    torch.testing.assert_close(ours, theirs(X), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, _run_on(model, res._replace(params=trained), X), atol=1e-5, rtol=1e-5)
    # exported in PEFT's format and read back by PEFT on the original model
    out = ft.save(plain, tmp_path / "ours", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    torch.testing.assert_close(again(X), ours, atol=1e-5, rtol=1e-5)


def test_shim_applies_the_residual_as_peft() -> None:
    model = _mlp()
    kwargs = {"target_modules": ["lin0"], "r": 2, "lora_alpha": 8, "init_lora_weights": "olora"}
    sm = ft.Swift.prepare_model(copy.deepcopy(model), ft.LoRAConfig(**kwargs))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).eval()
    torch.testing.assert_close(sm.model.lin0.weight, pm.base_model.model.lin0.base_layer.weight, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(sm(X), model(X), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sm(X), pm(X), atol=1e-5, rtol=1e-5)


def test_refusals_are_typed() -> None:
    model = _mlp()
    with pytest.raises(ConfigError, match="loftq"):
        ft.LoRAConfig(init_lora_weights="loftq")
    with pytest.raises(ConfigError, match="init_lora_weights"):
        ft.LoRAConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ConfigError, match="even rank"):
        ft.init(model, ft.LoRAConfig(target_modules=["lin0"], r=3, init_lora_weights="orthogonal"), generator=0)
    emb = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ConfigError, match="Linear"):
        ft.init(emb, ft.LoRAConfig(target_modules=["0"], init_lora_weights="pissa"), generator=0)
    with pytest.raises(ConfigError, match="no activations"):
        ft.lora_init(model, ft.LoRAConfig(target_modules=["lin0"], init_lora_weights="eva"), generator=0, data={})
    with pytest.raises(ConfigError, match="takes no data"):
        ft.lora_init(model, ft.LoRAConfig(target_modules=["lin0"]), generator=0, data={"lin0": X})
    with pytest.raises(ConfigError, match="corda_method"):
        cfg = ft.LoRAConfig(target_modules=["lin0"], init_lora_weights="corda", corda_config={"corda_method": "x"})
        ft.lora_init(model, cfg, generator=0, data={"lin0": torch.eye(10)})


def test_pissa_checkpoints_both_ways_and_the_shim_loads_them_as_peft(tmp_path: Path) -> None:
    """A PiSSA adapter on disk (init_lora_weights="pissa" in its config): PEFT and the shim both redo the
    decomposition of the original base on load (the residual), then put the saved factors on it."""
    model = _mlp()
    kwargs = {"target_modules": ["lin0"], "r": 2, "lora_alpha": 8, "init_lora_weights": "pissa"}
    res = ft.lora_init(model, ft.LoRAConfig(**kwargs), generator=0)
    g = torch.Generator().manual_seed(2)
    trained = res.params.map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g))
    expected = _run_on(model, res._replace(params=trained), X)
    out = ft.save(trained, tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    torch.testing.assert_close(theirs(X), expected, atol=1e-5, rtol=1e-5)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).eval()
    peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(trained))
    pm.save_pretrained(str(tmp_path / "by_peft"))
    back = ft.load(tmp_path / "by_peft", model)
    for k in trained:
        torch.testing.assert_close(back[k], trained[k], atol=0, rtol=0)
    sm = ft.Swift.from_pretrained(copy.deepcopy(model), str(out))
    torch.testing.assert_close(sm(X), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sm.model.lin0.weight, res.base_weights["lin0.weight"], atol=1e-6, rtol=1e-6)
