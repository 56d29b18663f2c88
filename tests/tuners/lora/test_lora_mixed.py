"""Per-sample adapters in one forward (functuner.tuners.lora.mixed) vs each sample run alone, vs PEFT's adapter_names path."""

from __future__ import annotations

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functuner as ft
from functuner.core.routing import current_routes
from functuner.errors import AdapterNameError, ConfigError
from functuner.tuners.lora.mixed import AdapterStack, apply_mixed, index_of, stack_adapters
from tests.conftest import tiny_gpt2, tiny_llama, tiny_vit

LLAMA_SPECS = {  # name: (r, use_dora, use_rslora, targets)
    "plain": (2, False, False, ["q_proj", "v_proj", "o_proj", "embed_tokens"]),
    "dora": (4, True, False, ["q_proj", "down_proj", "embed_tokens"]),
    "rs": (3, False, True, ["q_proj", "v_proj", "gate_proj"]),
}


def _adapters(model, specs, **extra):
    out = {}
    for i, (name, (r, dora, rs, targets)) in enumerate(specs.items()):
        cfg = ft.LoRAConfig(
            r=r,
            lora_alpha=2 * r + i,
            target_modules=targets,
            init_lora_weights=False,
            use_dora=dora,
            use_rslora=rs,
            **extra,
        )
        out[name] = ft.init(model, cfg, generator=10 + i, adapter_name=name)
    return out


def _alone(model, adapters, names, x):
    """Reference: each sample alone, with its own adapter through functuner.apply (or the bare model)."""
    rows = []
    for b, name in enumerate(names):
        xb = x[b : b + 1]
        y = model(xb) if name == "__base__" else ft.apply(model, adapters[name], (xb,))
        rows.append(y.logits)
    return torch.cat(rows)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def llama_setup():
    model = tiny_llama()
    return model, _adapters(model, LLAMA_SPECS)


def test_llama_mixed_batch_equals_each_sample_alone(llama_setup):
    model, adapters = llama_setup
    x = torch.randint(0, 64, (6, 9), generator=torch.Generator().manual_seed(0))
    names = ["plain", "dora", "__base__", "rs", "dora", "plain"]
    want = _alone(model, adapters, names, x)
    got = apply_mixed(model, adapters, names, (x,)).logits
    assert _rel(got, want) < 1e-5
    # the same through a prebuilt stack and a LongTensor index (-1 = no adapter)
    stack = stack_adapters(model, adapters)
    got2 = apply_mixed(model, stack, torch.tensor([0, 1, -1, 2, 1, 0]), (x,)).logits
    torch.testing.assert_close(got2, got, rtol=0, atol=0)
    assert isinstance(stack, AdapterStack) and stack.names == ("plain", "dora", "rs")


@settings(max_examples=15, deadline=None)
@given(
    names=st.lists(st.sampled_from(["plain", "dora", "rs", "__base__"]), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
)
def test_any_assignment_equals_each_sample_alone(llama_setup, names, seed):
    model, adapters = llama_setup
    x = torch.randint(0, 64, (len(names), 5), generator=torch.Generator().manual_seed(seed))
    assert _rel(apply_mixed(model, adapters, names, (x,)).logits, _alone(model, adapters, names, x)) < 1e-5


def test_matches_peft_adapter_names_path():
    """Same adapters loaded in real PEFT: its mixed-batch forward and ours agree (fp32)."""
    torch.manual_seed(3)
    pm = None
    ours = {}
    for name, r, alpha in (("x", 2, 4), ("y", 5, 3), ("z", 3, 9)):
        kw = dict(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"])
        pcfg = peft.LoraConfig(init_lora_weights=False, **kw)
        if pm is None:
            pm = peft.get_peft_model(tiny_llama(), pcfg, adapter_name=name)
        else:
            pm.add_adapter(name, pcfg)
        tensors = {
            k[len("base_model.model.") :]: v.detach().clone()
            for k, v in pm.state_dict().items()
            if f".lora_A.{name}." in k or f".lora_B.{name}." in k
        }
        ours[name] = ft.TunerParams(tensors, ft.LoRAConfig(init_lora_weights=False, **kw), name)
    pm.eval()
    names = ["y", "__base__", "x", "z", "y"]
    x = torch.randint(0, 64, (5, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm(input_ids=x, adapter_names=names).logits
    got = apply_mixed(tiny_llama(), ours, names, (x,)).logits
    assert _rel(got, want) < 1e-5


def test_gpt2_conv1d_with_trainable_biases():
    model = tiny_gpt2()
    adapters = {}
    for i, name in enumerate(("p", "q")):
        cfg = ft.LoRAConfig(r=2 + i, target_modules=["c_attn", "c_proj"], init_lora_weights=False, bias="lora_only")
        p = ft.init(model, cfg, generator=i, adapter_name=name)
        g = torch.Generator().manual_seed(100 + i)
        adapters[name] = p.replace(
            {k: v + torch.randn(v.shape, generator=g) for k, v in p.items() if k.endswith(".bias")}
        )
    names = ["q", "p", "__base__", "q"]
    x = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(2))
    assert _rel(apply_mixed(model, adapters, names, (x,)).logits, _alone(model, adapters, names, x)) < 1e-5


def test_vit_conv2d_plain_and_dora():
    model = tiny_vit()
    specs = {"c": (2, False, False, ["projection", "query"]), "d": (3, True, False, ["projection", "value"])}
    adapters = _adapters(model, specs)
    names = ["d", "c", "__base__", "d"]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    assert _rel(apply_mixed(model, adapters, names, (x,)).logits, _alone(model, adapters, names, x)) < 1e-5


def test_under_vmap_with_vmapped_index(llama_setup):
    model, adapters = llama_setup
    stack = stack_adapters(model, adapters)
    x = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(5))
    idx = torch.tensor([2, -1, 1, 0])

    def one(xi, ii):
        return apply_mixed(model, stack, ii[None], (xi[None],)).logits[0]

    got = torch.func.vmap(one)(x, idx)
    names = [stack.names[i] if i >= 0 else "__base__" for i in idx.tolist()]
    assert _rel(got, _alone(model, adapters, names, x)) < 1e-5


def test_gradients_equal_sum_of_per_sample_gradients(llama_setup):
    """Gradient w.r.t. each adapter = sum over the samples that used it (checked against separate applies)."""
    model, adapters = llama_setup
    x = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(6))
    names = ["rs", "dora", "rs", "plain"]

    def loss(ps):
        return apply_mixed(model, ps, names, (x,)).logits.pow(2).sum()

    got = torch.func.grad(loss)(adapters)
    for name, p in adapters.items():
        want = {k: torch.zeros_like(v) for k, v in p.items()}
        for b, n in enumerate(names):
            if n != name:
                continue
            g = torch.func.grad(lambda q, b=b: ft.apply(model, q, (x[b : b + 1],)).logits.pow(2).sum())(p)
            for k in want:
                want[k] += g[k]
        for k in want:
            torch.testing.assert_close(got[name][k], want[k], rtol=1e-4, atol=1e-5)
    assert got["plain"][next(iter(got["plain"]))].abs().sum() > 0


def test_exception_mid_forward_leaves_nothing_behind(llama_setup):
    model, adapters = llama_setup
    x = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(7))
    names = ["dora", "plain", "rs"]
    first = apply_mixed(model, adapters, names, (x,)).logits
    bare = model(x).logits
    hooks_before = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model.model.layers[1].mlp

    def simulated_oom(module, args, out):
        raise RuntimeError("simulated out of memory")

    handle = layer.register_forward_hook(simulated_oom)
    try:
        with pytest.raises(RuntimeError, match="simulated out of memory"):
            apply_mixed(model, adapters, names, (x,))
    finally:
        handle.remove()
    assert current_routes() is None
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k])
    torch.testing.assert_close(model(x).logits, bare, rtol=0, atol=0)  # slots dormant again
    torch.testing.assert_close(apply_mixed(model, adapters, names, (x,)).logits, first, rtol=0, atol=0)


def test_errors(llama_setup):
    model, adapters = llama_setup
    x = torch.randint(0, 64, (2, 4))
    with pytest.raises(AdapterNameError, match="nope"):
        apply_mixed(model, adapters, ["plain", "nope"], (x,))
    with pytest.raises(ConfigError, match=r"\[-1, 2\]"):
        apply_mixed(model, adapters, torch.tensor([0, 3]), (x,))
    with pytest.raises(ConfigError, match="3 entries"):
        apply_mixed(model, adapters, ["plain", "rs", "dora"], (x,))
    with pytest.raises(ConfigError, match="at least one"):
        apply_mixed(model, {}, [], (x,))
    with pytest.raises(TypeError, match="single string"):
        index_of(("a",), "a")
    with pytest.raises(AdapterNameError, match="duplicated"):
        apply_mixed(model, [adapters["plain"], adapters["plain"]], [0, 1], (x,))
    mts = ft.init(
        model,
        ft.LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        generator=0,
        adapter_name="mts",
    )
    with pytest.raises(ConfigError, match="modules_to_save"):  # not stackable; apply_mixed runs it on sub-batches
        stack_adapters(model, {"plain": adapters["plain"], "mts": mts})
    with torch.no_grad():
        mixed = apply_mixed(model, {"plain": adapters["plain"], "mts": mts}, ["mts", "plain"], (x,)).logits
        torch.testing.assert_close(mixed[:1], ft.apply(model, mts, (x[:1],)).logits, atol=1e-5, rtol=1e-5)
    drop = ft.init(
        model, ft.LoRAConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1), generator=0, adapter_name="drop"
    )
    model.train()
    try:
        with pytest.raises(ConfigError, match="model.eval"):
            apply_mixed(model, {"drop": drop}, ["drop", "drop"], (x,))
    finally:
        model.eval()
    assert current_routes() is None
