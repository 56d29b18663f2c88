"""LongLoRA: LoRA + embedder/normalizer copies + S2-Attn, checked against SWIFT's own shift code and by hand.

SWIFT parity note: ms-swift 4.6's ``Swift.prepare_model(model, LongLoRAConfig(...))``
raises ``TypeError: Linear.__init__() missing 1 required positional argument:
'config'`` with its peft 0.20 (recorded by tests/fixtures/make_tuner_fixtures2.py
in tuners2/longlora_swift.json), and its patched Llama attention reads
``self.num_heads``, which transformers 5 attention modules no longer have.  So
whole-model parity with SWIFT cannot be run; instead the S2 shift/attention is
compared with SWIFT's own ``_preprocess_qkv``/``_postprocess_qkv`` around SDPA
(fixture s2_attn.safetensors), and the model-level path with a hand-written
reference built from the pure functions.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import functuner as ft
from functuner.core.routing import routed
from functuner.errors import ConfigError, ParamsMismatchError, TargetError
from functuner.tuners.longlora import s2_allowed, s2_attention

FIX = pathlib.Path(__file__).parents[1] / "fixtures" / "tuners2"


def _cfg(**kw):
    base = dict(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    base.update(kw)
    return ft.LongLoRAConfig(**base)


def test_s2_attention_matches_swift_shift_code():
    fx = load_file(FIX / "s2_attn.safetensors")
    g = int(8 * 0.25)
    torch.testing.assert_close(s2_attention(fx["q"], fx["k"], fx["v"], g), fx["out"], rtol=0, atol=1e-6)
    masked = torch.nn.functional.scaled_dot_product_attention(fx["q"], fx["k"], fx["v"], attn_mask=s2_allowed(8, 4, g))
    torch.testing.assert_close(masked, fx["out"], rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(heads=st.sampled_from([2, 4, 6]), groups=st.integers(1, 4), half_g=st.integers(1, 3), seed=st.integers(0, 99))
def test_mask_form_equals_grouped_form(heads, groups, half_g, seed):
    g = 2 * half_g
    n = g * groups
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, 4, generator=gen) for _ in range(3))
    masked = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=s2_allowed(n, heads, g))
    torch.testing.assert_close(masked, s2_attention(q, k, v, g), rtol=1e-5, atol=1e-5)


def test_init_keys_follow_swift_rules_and_start_at_base():
    model = tiny_llama()
    p = ft.init(model, ft.LongLoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), generator=0)
    # SWIFT's state_dict_callback: LoRA keys + every state_dict name containing 'embed' or 'norm'
    expected_extra = {n for n in model.state_dict() if "embed" in n or "norm" in n}
    lora_keys = {k for k in p if ".lora_" in k}
    assert set(p) - lora_keys == expected_extra
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in p
    assert "model.layers.1.self_attn.v_proj.lora_B.default.weight" in p
    assert all(torch.equal(p[k], model.state_dict()[k]) for k in expected_extra)
    assert p.config.swift_type == "longlora"
    ids = torch.arange(12).view(1, 12)
    base = model(ids).logits
    assert torch.equal(ft.apply(model, p, (ids,)).logits, base)
    swift = json.loads((FIX / "longlora_swift.json").read_text())
    assert swift["prepare_error"] is None or "TypeError" in swift["prepare_error"]


def test_active_differs_inactive_equals_base_and_regex_spec():
    model = tiny_llama()
    ids = torch.arange(8).view(1, 8)
    base = model(ids).logits
    p = ft.init(model, _cfg(embedder_and_normalizer=r"model\.norm\.weight"), generator=1)
    assert [k for k in p if ".lora_" not in k] == ["model.norm.weight"]
    p = p.replace({"model.norm.weight": p["model.norm.weight"] * 1.5})
    out = ft.apply(model, p, (ids,)).logits
    assert not torch.allclose(out, base)
    assert torch.equal(model(ids).logits, base)  # no routes: base model untouched
    torch.testing.assert_close(ft.apply(model, p, (ids,)).logits, out, rtol=0, atol=0)


def _attn_inputs(model, n):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, n, 32, generator=gen)
    pos = torch.arange(n).unsqueeze(0)
    cos, sin = model.model.rotary_emb(x, pos)
    return x, (cos, sin)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_train_mode_attention_is_s2_by_hand(impl):
    model = tiny_llama(attn_implementation=impl).train()
    p = ft.init(model, _cfg(model_type="llama", group_size_ratio=0.25), generator=0)
    attn = model.model.layers[0].self_attn
    n = 16
    x, (cos, sin) = _attn_inputs(model, n)
    with routed(ft.functional.bind_routes(model, p)):
        out, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)

    def proj(name):
        lin = getattr(attn, name)
        a = p[f"model.layers.0.self_attn.{name}.lora_A.default.weight"]
        b = p[f"model.layers.0.self_attn.{name}.lora_B.default.weight"]
        return lin(x) + (x @ a.T @ b.T) * (p.config.lora_alpha / p.config.r)

    with torch.no_grad():
        q = proj("q_proj").view(2, n, -1, 8).transpose(1, 2)
        k = attn.k_proj(x).view(2, n, -1, 8).transpose(1, 2)
        v = proj("v_proj").view(2, n, -1, 8).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        ref = attn.o_proj(s2_attention(q, k, v, 4).transpose(1, 2).reshape(2, n, -1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # eval mode: the model's own attention (S2 off), so outputs differ from train mode
    model.eval()
    with routed(ft.functional.bind_routes(model, p)):
        out_eval, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)
    assert not torch.allclose(out_eval, out)


def test_eager_and_sdpa_agree_with_padding_and_no_nan():
    ids = torch.arange(16).view(2, 8) % 30 + 1
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    outs = []
    for impl in ("sdpa", "eager"):
        model = tiny_llama(attn_implementation=impl).train()
        p = ft.init(model, _cfg(model_type="llama", group_size_ratio=0.5), generator=0)
        outs.append(ft.apply(model, p, (ids,), {"attention_mask": mask}).logits)
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0][:, :], outs[1], rtol=1e-4, atol=1e-4)


def test_grad_only_to_tuner_params_under_func_grad():
    model = tiny_llama().train()
    p = ft.init(model, _cfg(model_type="llama"), generator=0)
    ids = torch.arange(16).view(2, 8)

    def loss(params):
        return ft.apply(model, params, (ids,), {"labels": ids}).loss

    grads = torch.func.grad(loss)(p)
    assert set(grads) == set(p)
    assert grads["model.norm.weight"].abs().sum() > 0
    assert grads["model.embed_tokens.weight"].abs().sum() > 0
    assert grads["model.layers.0.self_attn.q_proj.lora_B.default.weight"].abs().sum() > 0
    assert all(q.grad is None for q in model.parameters())


def test_merge_equals_apply_in_eval_and_unmerge_refuses_copies():
    model = tiny_llama()
    p = ft.init(model, _cfg(), generator=2)
    p = p.replace({"model.norm.weight": p["model.norm.weight"] + 0.3})
    ids = torch.arange(8).view(1, 8)
    merged = ft.merge(model, p)
    out = torch.func.functional_call(model, merged, (ids,)).logits
    torch.testing.assert_close(out, ft.apply(model, p, (ids,)).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="originals cannot be"):
        ft.unmerge(model, p, merged)


def test_bad_configs_raise_before_anything_changes():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="group_size_ratio"):
        ft.LongLoRAConfig(r=2, target_modules=["q_proj"], group_size_ratio=0)
    with pytest.raises(ConfigError, match="model_type"):
        ft.LongLoRAConfig(r=2, target_modules=["q_proj"], model_type="gpt2")
    with pytest.raises(TargetError, match="embedder_and_normalizer"):
        ft.init(model, _cfg(embedder_and_normalizer=["no_such_param"]), generator=0)
    p = ft.init(model, _cfg(model_type="llama", group_size_ratio=0.3), generator=0)
    model.train()
    with pytest.raises(ConfigError, match="group"):
        ft.apply(model, p, (torch.arange(10).view(1, 10),))
    model.eval()
    bad = p.replace({"model.norm.weight": torch.zeros(5)})
    with pytest.raises(ParamsMismatchError, match="model.norm.weight"):
        ft.validate(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
