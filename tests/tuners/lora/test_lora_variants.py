"""PEFT's LoRA variants (KaSA, MiCA, VeLoRA, BD-LoRA, MonteCLoRA) against real peft, beyond the ported table.

The table (``test_lora_peft_cases.py``) compares eval forwards, gradients in
eval mode, merges and PEFT-format round trips.  Here: the training-mode math
(VeLoRA's compressed-activation gradient, MonteCLoRA's perturbed ``A``), the
inits (MiCA's SVD, BD-LoRA's block factors, KaSA's base truncation), a
directory PEFT saved loaded by functuner's functional API and by the shim, and
the typed refusals where PEFT refuses too.  Models have no dropout of their
own, so PEFT and functuner see the same training-mode forward.
"""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch
from peft import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig
from torch import nn

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners.lora import monteclora as mc
from functuner.tuners.lora.mixed import stack_adapters
from functuner.tuners.lora.variants import kasa_dropped

ATOL = RTOL = 1e-5


class Net(nn.Module):
    """PEFT's MLP without its dropout (training-mode forwards must be deterministic on both sides)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _model() -> Net:
    torch.manual_seed(0)
    return Net()


def _x(seed: int = 3) -> torch.Tensor:
    return torch.randn(6, 10, generator=torch.Generator().manual_seed(seed))


def _pair(kwargs: dict[str, Any], train: bool = False) -> tuple[Net, peft.PeftModel, ft.TunerParams]:
    """A model, PEFT's model for ``kwargs`` and functuner params holding PEFT's initial tensors."""
    model = _model()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**{"init_lora_weights": False, **kwargs}))
    cfg = ft.LoRAConfig.from_dict({**kwargs, "init_lora_weights": kwargs.get("init_lora_weights", False)})
    state = peft.get_peft_model_state_dict(pm)
    tensors = ft.from_peft_state_dict(state, "default", config=cfg)
    params = ft.TunerParams({k: v.detach().clone() for k, v in tensors.items()}, cfg, "default")
    pm.train(train)
    model.train(train)
    return model, pm, params


def _grads_theirs(pm: peft.PeftModel, params: ft.TunerParams) -> dict[str, torch.Tensor]:
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in pm.named_parameters()}
    grads.update({n: torch.zeros_like(b) for n, b in pm.named_buffers() if n not in grads})
    state = peft.get_peft_model_state_dict(pm, state_dict=grads)
    return ft.from_peft_state_dict(state, "default", config=params.config)


def _grads_ours(model: nn.Module, params: ft.TunerParams, x: torch.Tensor, **kw: Any) -> dict[str, torch.Tensor]:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    out = ft.apply(model, params.replace(leaves), (x,), **kw)
    g = torch.autograd.grad(out.square().sum(), list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if gi is None else gi for (k, v), gi in zip(leaves.items(), g, strict=True)}


def _compare_step(model: nn.Module, pm: peft.PeftModel, params: ft.TunerParams, x: torch.Tensor, **kw: Any) -> None:
    ours = _grads_ours(model, params, x, **kw)
    pm.zero_grad()
    pm(x).square().sum().backward()
    theirs = _grads_theirs(pm, params)
    assert set(ours) == set(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=ATOL, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------
# KaSA
# ---------------------------------------------------------------------------
def test_kasa_trains_and_truncates_like_peft() -> None:
    model, pm, p = _pair({"target_modules": ["lin0", "lin1"], "kasa_config": KasaConfig(), "r": 2}, train=True)
    x = _x()
    torch.testing.assert_close(ft.apply(model, p, (x,)), pm(x), atol=ATOL, rtol=RTOL)
    _compare_step(model, pm, p, x)
    # the merged base is PEFT's truncated weight plus s B diag(d) A; the model itself is never written
    before = model.lin0.weight.detach().clone()
    merged = ft.merge(model, p)
    theirs = copy.deepcopy(pm).merge_and_unload()
    torch.testing.assert_close(merged["lin0.weight"], theirs.lin0.weight, atol=1e-5, rtol=1e-4)
    assert torch.equal(model.lin0.weight, before)


def test_kasa_fresh_init_is_the_truncated_base_as_in_peft() -> None:
    model = _model()
    kw = {"target_modules": ["lin0"], "kasa_config": KasaConfig(), "r": 3}
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw)).eval()
    p = ft.init(model.eval(), ft.LoRAConfig(**kw), generator=0)
    assert p["lin0.lora_diag.default"].shape == (3,) and not p["lin0.lora_B.default.weight"].any()
    x = _x()
    torch.testing.assert_close(ft.apply(model, p, (x,)), pm(x), atol=ATOL, rtol=RTOL)
    assert not torch.allclose(ft.apply(model, p, (x,)), model(x), atol=1e-4)  # the base lost 3 components


def test_kasa_svd_is_cached_per_weight_version() -> None:
    w = torch.randn(6, 5)
    first = kasa_dropped(w, 2)
    assert kasa_dropped(w, 2) is first
    w.mul_(2.0)  # an in-place change bumps the version: computed again
    again = kasa_dropped(w, 2)
    assert again is not first
    torch.testing.assert_close(again[0] @ again[1], 2 * (first[0] @ first[1]), atol=1e-5, rtol=1e-5)


def test_kasa_refusals_match_peft() -> None:
    model = _model()
    kw = {"target_modules": ["lin1"], "kasa_config": KasaConfig(), "r": 4}  # r == min(20, 4): nothing kept
    with pytest.raises(ValueError, match="smaller than"):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    with pytest.raises(ConfigError, match="KaSA on 'lin1'"):
        ft.init(model, ft.LoRAConfig(**kw), generator=0)
    with pytest.raises(ConfigError, match="cannot be combined"):
        ft.LoRAConfig(target_modules=["lin0"], kasa_config=KasaConfig(), use_dora=True)


# ---------------------------------------------------------------------------
# MiCA
# ---------------------------------------------------------------------------
def test_mica_init_matches_peft_and_b_stays_frozen() -> None:
    model = _model()
    kw = {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    ours = ft.init(model, ft.LoRAConfig(**kw), generator=0)
    theirs = ft.from_peft_state_dict(peft.get_peft_model_state_dict(pm), "default", config=ours.config)
    assert set(ours) == set(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5)
    # B is frozen (PEFT: requires_grad=False): zero gradient, so an SGD step with momentum leaves it unchanged
    p = ours.map(lambda t: t.detach().clone().requires_grad_(True))
    opt = torch.optim.SGD(list(p.values()), lr=0.1, momentum=0.9)
    b0 = p["lin0.lora_B.default.weight"].detach().clone()
    for _ in range(2):
        opt.zero_grad()
        ft.apply(model, p, (_x(),)).square().sum().backward()
        opt.step()
    assert torch.equal(p["lin0.lora_B.default.weight"], b0)
    assert p["lin0.lora_A.default.weight"].abs().sum() > 0


def test_mica_on_embedding_matches_peft() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 6))
    kw = {"target_modules": ["0"], "init_lora_weights": "mica", "r": 3}
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    ours = ft.init(model, ft.LoRAConfig(**kw), generator=0)
    theirs = ft.from_peft_state_dict(peft.get_peft_model_state_dict(pm), "default", config=ours.config)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# VeLoRA
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("init_type", ["random", "batch_average", "batch_average_once"])
def test_velora_training_gradients_match_peft(init_type: str) -> None:
    kw = {"target_modules": ["lin0", "lin1"], "velora_config": VeloraConfig(num_groups=3, init_type=init_type)}
    model, pm, p = _pair(kw, train=True)
    x = _x()
    _compare_step(model, pm, p, x, generator=torch.Generator().manual_seed(0))
    # the compressed gradient of A is not LoRA's exact one (eval mode computes the exact gradient)
    exact = _grads_ours(model.eval(), p, x)
    model.train()
    approx = _grads_ours(model, p, x)
    assert not torch.allclose(exact["lin0.lora_A.default.weight"], approx["lin0.lora_A.default.weight"], atol=1e-4)
    if init_type == "batch_average_once":
        # PEFT keeps the first batch's projection; functuner does once it is stored in the params
        proj = {
            f"{m}.lora_velora_embed.default": getattr(pm.base_model.model, m).lora_velora_embed["default"].clone()
            for m in ("lin0", "lin1")
        }
        p2 = p.replace({**dict(p.items()), **proj})
        _compare_step(model, pm, p2, _x(seed=4))


def test_velora_random_projection_is_drawn_from_the_generator() -> None:
    cfg = ft.LoRAConfig(target_modules=["lin0"], velora_config={"num_groups": 4, "init_type": "random"})
    a = ft.init(_model(), cfg, generator=1)["lin0.lora_velora_embed.default"]
    b = ft.init(_model(), cfg, generator=1)["lin0.lora_velora_embed.default"]
    assert a.shape == (3,) and torch.equal(a, b)
    torch.testing.assert_close(a.norm(), torch.tensor(1.0))


# ---------------------------------------------------------------------------
# BD-LoRA
# ---------------------------------------------------------------------------
def test_bdlora_init_and_training_match_peft() -> None:
    bd = BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2)
    kw = {"target_modules": ["lin0", "lin1"], "use_bdlora": bd, "r": 4}
    model, pm, p = _pair(kw, train=True)
    fresh = ft.init(model, ft.LoRAConfig(**kw), generator=0)
    assert fresh["lin0.lora_A.default.weight"].shape == (4, 5)  # (r, in / nblocks)
    assert fresh["lin1.lora_B.default.weight"].shape == (4, 2) and not fresh["lin1.lora_B.default.weight"].any()
    p = p.replace({**dict(p.items()), "lin1.lora_B.default.weight": torch.randn(4, 2)})
    with torch.no_grad():
        pm.base_model.model.lin1.lora_B["default"].weight.copy_(p["lin1.lora_B.default.weight"])
    x = _x()
    torch.testing.assert_close(ft.apply(model, p, (x,)), pm(x), atol=ATOL, rtol=RTOL)
    _compare_step(model, pm, p, x)


def test_bdlora_refusals_match_peft() -> None:
    model = _model()
    strict = {"target_modules": ["lin0", "lin1"], "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"])}
    with pytest.raises(ValueError, match="neither"):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**strict))
    with pytest.raises(ConfigError, match="matches neither"):
        ft.init(model, ft.LoRAConfig(**strict), generator=0)
    odd = {"target_modules": ["lin0"], "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], nblocks=3)}
    with pytest.raises(ValueError):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**odd))
    with pytest.raises(ConfigError, match="nblocks=3"):
        ft.init(model, ft.LoRAConfig(**odd), generator=0)


# ---------------------------------------------------------------------------
# MonteCLoRA
# ---------------------------------------------------------------------------
def test_monteclora_training_step_matches_peft_for_its_own_draws() -> None:
    """PEFT samples from the global random state into a pre-filled buffer; its next draws are read from that
    buffer and fed to functuner's formula, which must give PEFT's sample and PEFT's training-mode layer output."""
    kw = {"target_modules": ["lin0"], "monteclora_config": MontecloraConfig(num_samples=3)}
    model, pm, p = _pair(kw, train=True)
    layer = pm.base_model.model.lin0
    sampler = layer.lora_monteclora_sampler["default"]
    draws = sampler.sampler.buffer[sampler.sampler.index]
    z = (draws["z_mvn"].clone(), draws["z_wishart"].clone(), draws["z_dirichlet"].clone())
    x = _x()
    theirs = layer(x)  # consumes exactly these draws
    noise, weights = mc.sample(sampler.std_prior, sampler.expert_weights_prior, *z, 1e-4)
    torch.testing.assert_close(weights, sampler.expert_weights, atol=1e-6, rtol=1e-5)
    A = mc.perturbed_a(p["lin0.lora_A.default.weight"], noise, weights)
    base = model.lin0(x)
    ours = base + (x @ A.T) @ p["lin0.lora_B.default.weight"].T * layer.scaling["default"]
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


def test_monteclora_forward_is_pure_and_trains_the_priors() -> None:
    kw = {"target_modules": ["lin0"], "monteclora_config": MontecloraConfig(num_samples=2, sample_scaler=0.1)}
    model, pm, p = _pair(kw, train=True)
    x = _x()
    with pytest.raises(ConfigError, match="generator"):
        ft.apply(model, p, (x,))
    one = ft.apply(model, p, (x,), generator=torch.Generator().manual_seed(5))
    two = ft.apply(model, p, (x,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(one, two)
    model.eval()
    plain = ft.apply(model, p, (x,))
    assert not torch.allclose(one, plain, atol=1e-5)
    torch.testing.assert_close(plain, pm.eval()(x), atol=ATOL, rtol=RTOL)
    model.train()
    g = _grads_ours(model, p, x, generator=torch.Generator().manual_seed(5))
    for leaf in ("std_prior", "expert_weights_prior"):
        assert g[f"lin0.lora_monteclora_sampler.default.{leaf}"].abs().sum() > 0, leaf


def test_monteclora_wishart_draws_have_the_wishart_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([mc.draw(3, 2, 1, gen)[1] for _ in range(3000)])
    torch.testing.assert_close(draws.mean(0), 3 * torch.eye(3), atol=0.2, rtol=0)  # E[W(p, I)] = p I


# ---------------------------------------------------------------------------
# PEFT's directories, functional and shim; paths that refuse variants
# ---------------------------------------------------------------------------
VARIANTS = {
    "kasa": {"target_modules": ["lin0"], "kasa_config": KasaConfig(), "r": 2},
    "mica": {"target_modules": ["lin0", "lin1"], "init_lora_weights": "mica", "r": 2},
    "velora": {"target_modules": ["lin0"], "velora_config": VeloraConfig(num_groups=2, init_type="random")},
    "bdlora": {
        "target_modules": ["lin0", "lin1"],
        "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
        "r": 4,
    },
    "monteclora": {"target_modules": ["lin0"], "monteclora_config": MontecloraConfig(num_samples=2)},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_peft_directory_loads_functional_and_shim(name: str, tmp_path: Any) -> None:
    model, pm, _ = _pair(VARIANTS[name])
    with torch.no_grad():  # non-zero factors everywhere (MiCA's A, a block-diagonal B start at zero)
        gen = torch.Generator().manual_seed(2)
        for n, prm in pm.named_parameters():
            if ".lora_" in n:
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.3)
    pm.save_pretrained(str(tmp_path))
    x = _x()
    want = pm.eval()(x)
    params = ft.load(str(tmp_path), model.eval())
    torch.testing.assert_close(ft.apply(model, params, (x,)), want, atol=ATOL, rtol=RTOL)
    sm = ft.Swift.from_pretrained(copy.deepcopy(model), str(tmp_path))
    torch.testing.assert_close(sm(x), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_per_sample_and_combination_refuse_variants(name: str) -> None:
    model = _model()
    p = ft.init(model, ft.LoRAConfig.from_dict(VARIANTS[name]), generator=0)
    with pytest.raises(ConfigError, match="variant"):
        stack_adapters(model, {"a": p})
    combine = ft.tuner_for(p.config).combine
    assert combine is not None
    if name == "mica":  # MiCA combines (its forward is LoRA's), as PEFT does: tests/tuners/test_combine_all.py
        assert combine([p, p], [0.5, 0.5], "c", "linear").config.init_lora_weights == "mica"
        return
    with pytest.raises(ConfigError, match="cannot combine"):
        combine([p, p], [0.5, 0.5], "c", "linear")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_swift_format_round_trip_and_streaming_merge(name: str, tmp_path: Any) -> None:
    from safetensors.torch import load_file, save_file

    from functuner.io.merge_shards import merge_checkpoint

    model = _model()
    p = ft.init(model, ft.LoRAConfig.from_dict({**VARIANTS[name], "init_lora_weights": False}), generator=0)
    if name == "mica":
        p = ft.init(model, ft.LoRAConfig.from_dict(VARIANTS[name]), generator=0)
        p = p.replace({k: v + 0.1 if ".lora_A." in k else v for k, v in p.items()})
    back = ft.load(ft.save(p, tmp_path / "swift"), model)  # SWIFT's format (the default)
    assert set(back) == set(p) and all(torch.equal(back[k], p[k]) for k in p)
    # the CLI's streaming merge of a safetensors checkpoint gives functuner.merge's weights
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
    out = tmp_path / "merged"
    out.mkdir()
    merge_checkpoint(base, out, dict(p.items()), p.config, "default")
    streamed = load_file(str(out / "model.safetensors"))
    for k, v in ft.merge(model, p).items():
        torch.testing.assert_close(streamed[k], v, atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", ["kasa", "mica", "velora", "bdlora"])
def test_shim_training_step_equals_functional(name: str) -> None:
    """``Swift.prepare_model`` trains the variant as the functional API does (same loss, same gradients)."""
    model = _model()
    sm = ft.Swift.prepare_model(copy.deepcopy(model), ft.LoRAConfig.from_dict(VARIANTS[name]))
    sm.train()
    named = {n.removeprefix("base_model."): prm for n, prm in sm.named_parameters() if prm.requires_grad}
    params = ft.TunerParams(
        {k: v.detach().clone() for k, v in named.items()},
        ft.LoRAConfig.from_dict(VARIANTS[name]),
        "default",
    )
    x = _x()
    sm(x).square().sum().backward()
    ours = _grads_ours(model.train(), params, x, generator=torch.Generator().manual_seed(0))
    for k, prm in named.items():
        got = torch.zeros_like(prm) if prm.grad is None else prm.grad  # VeLoRA's projection: no gradient
        torch.testing.assert_close(got, ours[k], atol=ATOL, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
