"""Per-sample adapters through the shim: ``SwiftModel(x, adapter_names=[...])`` and ``generate(..., adapter_names=)``.

Compared against: each sample run alone with its adapter active (and the bare
base model for ``"__base__"``), real PEFT's ``adapter_names=`` given the same
weights (saved by the shim in PEFT's format, loaded by ``peft.PeftModel``), and
the outputs after the adapters' tensors change (optimizer steps, in-place
writes, loading, offloading): the shim's cached stack must follow.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from functuner import AdapterConfig, LoRAConfig, Swift, SwiftModel
from functuner.errors import AdapterNameError, ConfigError

ATOL = 1e-5
X = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(1))


def _shim(dora: bool = True) -> SwiftModel:
    """Three LoRA adapters of different ranks / targets (one DoRA, one rsLoRA) on a tiny Llama, eval mode."""
    torch.manual_seed(0)
    return Swift.prepare_model(
        tiny_llama(),
        {
            "default": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "other": LoRAConfig(
                r=2, target_modules=["o_proj", "up_proj", "q_proj"], init_lora_weights=False, use_rslora=True
            ),
            "third": LoRAConfig(r=3, target_modules=["k_proj", "down_proj"], init_lora_weights=False, use_dora=dora),
        },
    )


def _alone(sm: SwiftModel, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Each sample run by itself with only its adapter active (none for '__base__'); active set restored."""
    before = sorted(sm.active_adapters)
    rows = []
    with torch.no_grad():
        for i, n in enumerate(names):
            sm.set_active_adapters([] if n == "__base__" else [n])
            rows.append(sm(x[i : i + 1]).logits)
    sm.set_active_adapters(before)
    return torch.cat(rows)


def _mixed(sm: SwiftModel, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return sm(x, adapter_names=names).logits


@pytest.fixture(scope="module")
def sm() -> SwiftModel:
    return _shim()


# ---------------------------------------------------------------------------
# equal to running each sample alone; '__base__' is the base model
# ---------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from(["default", "other", "third", "__base__"]), min_size=4, max_size=4))
def test_each_sample_gets_its_own_adapter(sm: SwiftModel, names: list[str]) -> None:
    got = _mixed(sm, X, names)
    assert torch.allclose(got, _alone(sm, X, names), rtol=1e-5, atol=ATOL)


def test_base_rows_equal_the_base_model_and_active_adapters_do_not_leak(sm: SwiftModel) -> None:
    base = tiny_llama()(X).logits.detach()
    assert sm.active_adapters == {"default", "other", "third"}  # active adapters play no part per sample
    got = _mixed(sm, X, ["__base__", "other", "__base__", "__base__"])
    for i in (0, 2, 3):
        assert torch.allclose(got[i], base[i], atol=ATOL)
    assert not torch.allclose(got[1], base[1], atol=1e-3)
    assert torch.allclose(_mixed(sm, X, ["__base__"] * 4), base, atol=ATOL)
    # the ordinary forward (no adapter_names) still runs the active adapters
    with torch.no_grad():
        assert not torch.allclose(sm(X).logits, base, atol=1e-3)


# ---------------------------------------------------------------------------
# real PEFT, same weights
# ---------------------------------------------------------------------------
def test_equals_real_peft_adapter_names(tmp_path: Path) -> None:
    sm = _shim(dora=False)  # PEFT does not run DoRA adapters per sample
    sm.save_pretrained(tmp_path, peft_format=True)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    for n in ("other", "third"):
        pm.load_adapter(str(tmp_path / n), n)
    pm.eval()
    names = ["third", "__base__", "default", "other"]
    with torch.no_grad():
        want = pm(X, adapter_names=names).logits
    assert torch.allclose(_mixed(sm, X, names), want, rtol=1e-5, atol=ATOL)
    gen = pm.generate(
        input_ids=X[:, :3],
        adapter_names=names,
        max_new_tokens=3,
        do_sample=False,
        attention_mask=torch.ones(4, 3, dtype=torch.long),
    )
    ours = sm.generate(
        X[:, :3],
        adapter_names=names,
        max_new_tokens=3,
        do_sample=False,
        attention_mask=torch.ones(4, 3, dtype=torch.long),
    )
    assert torch.equal(ours, gen)


def test_generate_with_beams_expands_names_per_prompt(sm: SwiftModel) -> None:
    names = ["other", "__base__"]
    mask = torch.ones(2, 3, dtype=torch.long)
    got = sm.generate(
        X[:2, :3], adapter_names=names, max_new_tokens=3, num_beams=2, do_sample=False, attention_mask=mask
    )
    before = sorted(sm.active_adapters)
    for i, n in enumerate(names):
        sm.set_active_adapters([] if n == "__base__" else [n])
        alone = sm.generate(X[i : i + 1, :3], max_new_tokens=3, num_beams=2, do_sample=False, attention_mask=mask[:1])
        assert torch.equal(got[i : i + 1], alone), n
    sm.set_active_adapters(before)


# ---------------------------------------------------------------------------
# the cached stack follows every change of the adapters' tensors
# ---------------------------------------------------------------------------
def _train_step(sm: SwiftModel, opt: torch.optim.Optimizer, name: str) -> None:
    sm.set_active_adapters([name])
    loss = sm(X).logits.square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sm.set_active_adapters(["default", "other", "third"])


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),  # fused: writes without bumping version counters
        lambda ps: torch.optim.SGD(ps, lr=0.5),
    ],
    ids=["adamw_fused", "sgd"],
)
def test_cache_follows_optimizer_steps(make_opt) -> None:  # type: ignore[no-untyped-def]
    sm = _shim()
    names = ["third", "other", "__base__", "default"]
    first = _mixed(sm, X, names)
    stack = sm._state.mixed.stack
    assert torch.equal(_mixed(sm, X, names), first) and sm._state.mixed.stack is stack  # reused while unchanged
    opt = make_opt([p for p in sm.adapters["third"].tensors.values() if p.requires_grad])
    _train_step(sm, opt, "third")
    after = _mixed(sm, X, names)
    assert sm._state.mixed.stack is not stack
    assert not torch.allclose(after[0], first[0], atol=1e-4)  # the trained adapter's row moved...
    assert torch.equal(after[1:], first[1:])  # ...the others did not
    assert torch.allclose(after, _alone(sm, X, names), rtol=1e-5, atol=ATOL)


def test_cache_follows_writes_loads_replacements_and_offload() -> None:
    sm = _shim()
    names = ["default", "other", "third", "__base__"]
    _mixed(sm, X, names)
    a = sm.adapters["default"].tensors["model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    with torch.no_grad():
        a.add_(0.3)  # an in-place write (version counter)
    assert torch.allclose(_mixed(sm, X, names), _alone(sm, X, names), atol=ATOL)
    a.data = a.data * 2  # a replaced tensor (new storage)
    assert torch.allclose(_mixed(sm, X, names), _alone(sm, X, names), atol=ATOL)
    other = _shim()  # load another model's weights into 'other' through the shim
    with torch.no_grad():
        for p in other.adapters["other"].tensors.values():
            p.mul_(-1.5)
    sm.load_state_dict(other.state_dict(adapter_name="other"), adapter_name="other")
    assert torch.allclose(_mixed(sm, X, names), _alone(sm, X, names), atol=ATOL)
    with torch.no_grad():  # DoRA depends on the base weight too
        sm.model.model.layers[1].mlp.down_proj.weight.mul_(1.1)
    assert torch.allclose(_mixed(sm, X, names), _alone(sm, X, names), atol=ATOL)
    sm.deactivate_adapter("third", offload="meta")
    assert sm._state.mixed is None  # offloading drops the cache (and the tensors it kept alive)
    with pytest.raises(ConfigError, match=r"'third'.*offloaded"):
        _mixed(sm, X, names)
    assert torch.allclose(
        _mixed(sm, X, ["other", "__base__", "default", "other"]),
        _alone(sm, X, ["other", "__base__", "default", "other"]),
        atol=ATOL,
    )
    sm.activate_adapter("third")
    assert torch.allclose(_mixed(sm, X, names), _alone(sm, X, names), atol=ATOL)
    Swift.prepare_model(sm, {"new": LoRAConfig(r=2, target_modules=["gate_proj"], init_lora_weights=False)})
    names = ["new", "third", "__base__", "default"]
    assert torch.allclose(_mixed(sm, X, names), _alone(sm, X, names), atol=ATOL)


def test_gradients_reach_the_named_adapters_in_grad_mode() -> None:
    sm = _shim()
    names = ["default", "third", "default", "__base__"]
    sm(X, adapter_names=names).logits.square().sum().backward()
    mixed = {k: p.grad.clone() for a in ("default", "third") for k, p in sm.adapters[a].tensors.items()}
    assert all(p.grad is None for p in sm.adapters["other"].tensors.values())
    sm.zero_grad()
    for i, n in enumerate(names[:3]):  # the '__base__' row reaches no adapter
        sm.set_active_adapters([n])
        sm(X[i : i + 1]).logits.square().sum().backward()
    for k, g in mixed.items():
        p = sm.adapters[k.split(".")[-2]].tensors[k]
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6), k
    assert sm._state.mixed is None  # the differentiable stack is per call, never cached


# ---------------------------------------------------------------------------
# errors: typed, naming what is wrong, nothing changed
# ---------------------------------------------------------------------------
def test_errors_name_the_problem_and_change_nothing() -> None:
    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(),
        {
            "default": LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
            "ad": AdapterConfig(dim=32, target_modules=r".*mlp", hidden_pos=0, adapter_length=4),
        },
    )
    sm.deactivate_adapter("ad")
    with torch.no_grad():
        before = sm(X).logits
    with pytest.raises(AdapterNameError, match="'nope'"):
        sm(X, adapter_names=["default", "nope", "__base__", "default"])
    with pytest.raises(ConfigError, match=r"'ad'.*adapter"):
        sm(X, adapter_names=["default", "ad", "__base__", "default"])
    with pytest.raises(ConfigError, match="3 entries but the batch has 4"):
        sm(X, adapter_names=["default", "__base__", "default"])
    with pytest.raises(ConfigError, match="3 entries but the batch has 4"):
        sm.generate(X, adapter_names=["default"] * 3, max_new_tokens=1)
    with pytest.raises(TypeError, match="one adapter name per sample"):
        sm(X, adapter_names="default")
    sm.activate_adapter("ad")
    with pytest.raises(ConfigError, match=r"adapter\(s\) \['ad'\] that cannot run per sample are active"):
        sm(X, adapter_names=["default"] * 4)
    sm.deactivate_adapter("ad")
    sm.train()
    with pytest.raises(ConfigError, match="training mode"):
        sm(X, adapter_names=["default"] * 4)
    sm.eval()
    Swift.merge(sm)
    with pytest.raises(ConfigError, match=r"merged.*Swift.unmerge"):
        sm(X, adapter_names=["default"] * 4)
    Swift.unmerge(sm)
    with torch.no_grad():
        assert torch.equal(sm(X).logits, before)  # no routes or state left behind by the failed calls
    assert sm.active_adapters == {"default"}


def test_threads_each_get_their_own_assignment(sm: SwiftModel) -> None:
    from concurrent.futures import ThreadPoolExecutor

    plans = [["default", "__base__", "third", "other"], ["other", "third", "__base__", "default"]]
    want = [_mixed(sm, X, p) for p in plans]

    def run(i: int) -> bool:
        return all(torch.equal(_mixed(sm, X, plans[i % 2]), want[i % 2]) for _ in range(5))

    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(run, range(4)))
