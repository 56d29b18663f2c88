"""GaLore: the functional transform and the eager optimizer against the authors' ``galore_torch``.

Parity: the same tiny Llama, the same batches, the same seed; ``galore_torch.GaLoreAdamW`` (the
reference), our ``GaLoreAdamW`` (eager) and our ``galore_adamw`` transform (``torch.func.grad`` loop)
must give the same weights after several steps, for every ``proj_type``, across projector refreshes.
"""

from __future__ import annotations

import copy

import galore_torch  # in the test extra: a missing reference fails, never skips
import pytest
import torch
from conftest import tiny_llama
from galore_torch.galore_projector import GaLoreProjector
from hypothesis import given, settings
from hypothesis import strategies as st

import functuner as ft
from functuner.errors import ConfigError, TargetError
from functuner.optim import (
    GaLoreAdamW,
    GaLoreConfig,
    adamw,
    apply_updates,
    create_galore_optimizer,
    galore_adamw,
    galore_param_groups,
    galore_targets,
)
from functuner.optim.galore import (
    PROJ_TYPES,
    compute_projection,
    low_rank_shape,
    project,
    project_back,
    projection_side,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 5


def _batches(n: int = STEPS, vocab: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, vocab, (2, 8), generator=g) for _ in range(n)]


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _run_eager(
    model: torch.nn.Module, opt: torch.optim.Optimizer, record: list[dict[str, torch.Tensor]] | None = None
) -> dict[str, torch.Tensor]:
    for ids in _batches():
        opt.zero_grad(set_to_none=True)
        _loss(model, ids).backward()
        if record is not None:
            record.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _reference_groups(model: torch.nn.Module, cfg: GaLoreConfig) -> list[dict]:
    targets = set(galore_targets(model, cfg))
    gal = [p for n, p in model.named_parameters() if n in targets]
    rest = [p for n, p in model.named_parameters() if n not in targets]
    keys = dict(rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.galore_scale, proj_type=cfg.proj_type)
    return [{"params": rest}, {"params": gal, **keys}]


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 2e-6) -> None:
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def _trainable(model: torch.nn.Module) -> torch.nn.Module:
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_eager_and_functional_match_galore_torch(proj_type: str) -> None:
    cfg = GaLoreConfig(rank=4, update_proj_gap=2, galore_scale=0.25, proj_type=proj_type, target_modules=TARGETS)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    base = _trainable(tiny_llama())

    ref_model = copy.deepcopy(base)
    ref = galore_torch.GaLoreAdamW(_reference_groups(ref_model, cfg), no_deprecation_warning=True, **hp)
    ref_grads: list[dict[str, torch.Tensor]] = []
    want = _run_eager(ref_model, ref, ref_grads)

    ours_model = copy.deepcopy(base)
    got_eager = _run_eager(ours_model, GaLoreAdamW(_reference_groups(ours_model, cfg), **hp))
    _assert_same(got_eager, want)

    # the functional transform, fed the reference's gradients: the same update rule, step for step
    model = copy.deepcopy(base)
    tx = galore_adamw(
        hp["lr"],
        config=cfg,
        targets=galore_targets(model, cfg),
        betas=hp["betas"],
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
    )
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = tx.init(params)
    for grads in ref_grads:
        updates, state = tx.update(grads, state, params)
        params = apply_updates(params, updates)
    _assert_same(params, want)

    if proj_type == "std":  # and end to end in a torch.func loop (its own gradients)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = tx.init(params)

        def loss_fn(p: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(model, p, (), {"input_ids": ids, "labels": ids}).loss

        for ids in _batches():
            grads = torch.func.grad(loss_fn)(params, ids)
            updates, state = tx.update(grads, state, params)
            params = apply_updates(params, updates)
        _assert_same(params, want, atol=1e-5)
    # every weight moved, and the target weights' Adam moments are low-rank
    assert all(not torch.equal(params[n], base.state_dict()[n]) for n in params)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert state[q].exp_avg.numel() < params[q].numel()
    assert state[q].exp_avg.shape == ref.state[dict(ref_model.named_parameters())[q]]["exp_avg"].shape


def test_state_is_low_rank_and_refreshes_every_gap() -> None:
    model = _trainable(tiny_llama())
    cfg = GaLoreConfig(rank=4, update_proj_gap=3, target_modules=TARGETS)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    tx = galore_adamw(1e-3, config=cfg, targets=galore_targets(model, cfg))
    state = tx.init(params)
    name = "model.layers.0.mlp.down_proj.weight"  # 32 x 64: m < n, std projects on the left
    assert projection_side(params[name].shape, "std") == "left"
    assert state[name].exp_avg.shape == (4, 64)
    projs = []
    for step in range(7):
        grads = {n: torch.randn_like(t) for n, t in params.items()}
        old = state
        updates, state = tx.update(grads, state, params)
        projs.append(state[name].proj.mats[0])
        assert state[name].step == step + 1
        assert old[name].step == step  # the old state is untouched (pure)
    refreshed = [i for i in range(1, 7) if projs[i] is not projs[i - 1]]
    assert refreshed == [3, 6]
    mats = projs[-1]
    torch.testing.assert_close(mats.t() @ mats, torch.eye(4), atol=1e-5, rtol=0)


def test_tunerparams_in_tunerparams_out() -> None:
    model = tiny_llama()
    params = ft.init(model, ft.LoRAConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), generator=0)
    cfg = GaLoreConfig(rank=2, update_proj_gap=1)
    tx = galore_adamw(1e-3, config=cfg, targets=lambda name, t: "lora_B" in name)
    state = tx.init(params)
    grads = params.map(torch.ones_like)
    updates, state = tx.update(grads, state, params)
    assert isinstance(updates, ft.TunerParams) and updates.config == params.config
    new = apply_updates(params, updates)
    assert isinstance(new, ft.TunerParams) and list(new) == list(params)
    b = next(n for n in params if "lora_B" in n)
    a = next(n for n in params if "lora_A" in n)
    assert state[b].proj is not None and state[a].proj is None


def test_plain_adamw_matches_reference_without_rank() -> None:
    base = _trainable(tiny_llama())
    ref_model = copy.deepcopy(base)
    want = _run_eager(ref_model, galore_torch.GaLoreAdamW(ref_model.parameters(), lr=1e-2, no_deprecation_warning=True))
    model = copy.deepcopy(base)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    tx = adamw(1e-2)
    state = tx.init(params)
    for ids in _batches():
        grads = torch.func.grad(
            lambda p, ids: torch.func.functional_call(model, p, (), {"input_ids": ids, "labels": ids}).loss
        )(params, ids)
        updates, state = tx.update(grads, state, None)
        params = apply_updates(params, updates)
    _assert_same(params, want, atol=1e-5)


def test_lr_schedule_callable() -> None:
    p = {"w": torch.ones(3, 2)}
    tx = galore_adamw(lambda step: 0.0 if step == 0 else 1.0)
    state = tx.init(p)
    u, state = tx.update({"w": torch.ones(3, 2)}, state)
    assert torch.equal(u["w"], torch.zeros(3, 2))
    u, state = tx.update({"w": torch.ones(3, 2)}, state)
    assert (u["w"] < 0).all()


def test_per_parameter_mode_matches_grouped_and_frees_grads() -> None:
    base = _trainable(tiny_llama())
    cfg = GaLoreConfig(rank=4, update_proj_gap=2, galore_scale=0.5, target_modules=TARGETS)
    grouped_model = copy.deepcopy(base)
    want = _run_eager(grouped_model, create_galore_optimizer(grouped_model, cfg, lr=1e-2, weight_decay=0.1))

    model = copy.deepcopy(base)
    per_cfg = GaLoreConfig(**{**cfg.__dict__, "optim_per_parameter": True})
    opt = create_galore_optimizer(model, per_cfg, lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, ft.optim.PerParameterOptimizer)
    for ids in _batches():
        _loss(model, ids).backward()
        assert all(p.grad is None for p in model.parameters())  # each gradient was consumed during backward
        opt.step()
    _assert_same({n: p.detach() for n, p in model.named_parameters()}, want)

    # one scheduler on the wrapper drives every inner optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 / (step + 1))
    assert all(g["lr"] == 5e-3 for inner in opt.optimizers.values() for g in inner.param_groups)
    opt.step()
    sched.step()
    assert all(g["lr"] == 2.5e-3 for inner in opt.optimizers.values() for g in inner.param_groups)
    # the state round-trips through state_dict (projections included)
    sd = copy.deepcopy(opt.state_dict())
    q = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    proj_before = opt.optimizers[q].state[q]["projection"]
    opt.load_state_dict(sd)
    proj_after = opt.optimizers[q].state[q]["projection"]
    assert list(proj_after) == ["right"] and torch.equal(proj_after["right"][0], proj_before["right"][0])
    opt.remove()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, _batches(1)[0]).backward()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is not None for p in model.parameters())


def test_param_groups_follow_swift() -> None:
    model = _trainable(tiny_llama())
    groups = galore_param_groups(model, GaLoreConfig(rank=8), weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    galore, decayed, plain = ([names[id(p)] for p in g["params"]] for g in groups)
    assert groups[0]["rank"] == 8 and groups[0]["update_proj_gap"] == 50 and groups[0]["scale"] == 1.0
    assert len(galore) == 14 and "lm_head.weight" not in galore  # all-linear: every linear but the head
    assert "lm_head.weight" in decayed and "model.embed_tokens.weight" in decayed
    assert plain and all("norm" in n for n in plain) and groups[2]["weight_decay"] == 0.0
    # frozen parameters are left out
    model.model.layers[1].requires_grad_(False)
    g2 = galore_param_groups(model, GaLoreConfig(rank=8))
    assert sum(len(g["params"]) for g in g2) == sum(p.requires_grad for p in model.parameters())


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="GaLoreConfig.rank"):
        GaLoreConfig(rank=0)
    with pytest.raises(ConfigError, match="GaLoreConfig.proj_type"):
        GaLoreConfig(proj_type="diagonal")
    with pytest.raises(ConfigError, match="GaLoreConfig.update_proj_gap"):
        GaLoreConfig(update_proj_gap=0)
    for flag in ("quantize", "proj_quant"):  # Q-GaLore is implemented now (tests/optim/test_qgalore.py)
        assert GaLoreConfig(**{flag: True}).q_galore
        with pytest.raises(ConfigError, match="GaLoreConfig.proj_bits"):
            GaLoreConfig(**{flag: True, "proj_bits": 5})
    with pytest.raises(TargetError, match="GaLoreConfig.target_modules"):
        galore_targets(tiny_llama(), GaLoreConfig(target_modules=["nope"]))
    with pytest.raises(TargetError, match="no 2-D weight"):
        galore_targets(tiny_llama(), GaLoreConfig(target_modules=["input_layernorm"]))
    tx = galore_adamw(1e-3, weight_decay=0.1)
    state = tx.init({"w": torch.zeros(2)})
    with pytest.raises(ConfigError, match="resync_state"):
        tx.update({"v": torch.zeros(2)}, state, None)
    with pytest.raises(ConfigError, match="weight_decay > 0 needs params"):
        tx.update({"w": torch.zeros(2)}, state, None)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    rank=st.integers(1, 14),
    proj_type=st.sampled_from(PROJ_TYPES),
)
def test_low_rank_shape_matches_reference_projector(m: int, n: int, rank: int, proj_type: str) -> None:
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 100 + n))
    ref = GaLoreProjector(rank, update_proj_gap=1, scale=1.0, proj_type=proj_type)
    low = ref.project(g, 0)
    side = projection_side(g.shape, proj_type)
    assert tuple(low.shape) == low_rank_shape(g.shape, rank, side)
    proj = compute_projection(g, rank, side)
    torch.testing.assert_close(project(g, proj), low)
    # the reference's reverse_std back-projection guesses the side from the low-rank shape, wrongly (a shape
    # error) when rank >= min(m, n) and m < n; ours remembers the side
    if proj_type != "reverse_std" or rank < min(m, n):
        torch.testing.assert_close(project_back(low, proj, 0.5), ref.project_back(low) * 0.5)
