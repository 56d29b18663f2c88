"""LoRA on raw parameters (``target_parameters``), as PEFT adapts fused 3-D MoE expert weights.

A tiny Qwen3-MoE built from a config (transformers' ``Qwen3MoeExperts`` keeps
every expert in one ``(E, out, in)`` parameter) is adapted through
``target_parameters`` by PEFT and by functuner with the same tensors: forward,
gradients, merged forward, unmerge, PEFT-format save / load (read back by PEFT
too).  Refusals that PEFT shares (dropout, DoRA, ``lora_bias``) and functuner's
own gap (two targeted parameters on one module, which PEFT nests) are typed.
"""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners.lora.mixed import stack_adapters

ATOL = RTOL = 1e-5


def tiny_moe() -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=32,
    )
    return Qwen3MoeForCausalLM(cfg).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _pair(model: torch.nn.Module, **kwargs: Any) -> tuple[ft.TunerParams, peft.PeftModel]:
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()
    cfg = ft.LoRAConfig.from_dict({"init_lora_weights": False, **kwargs})
    tensors = ft.from_peft_state_dict(peft.get_peft_model_state_dict(pm), "default", config=cfg)
    return ft.TunerParams({k: v.detach().clone() for k, v in tensors.items()}, cfg, "default"), pm


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_parameters": ["mlp.experts.gate_up_proj"], "r": 2, "lora_alpha": 5},
        {"target_parameters": ["down_proj"], "r": 3, "lora_alpha": 4, "target_modules": ["q_proj"]},
        {"target_parameters": ["layers.1.mlp.experts.gate_up_proj"], "r": 2, "use_rslora": True},
    ],
    ids=["gate_up_proj", "down_proj+q_proj", "one_layer_rslora"],
)
def test_fused_moe_experts_match_peft(kwargs: dict[str, Any], tmp_path: Any) -> None:
    model = tiny_moe()
    ids = _ids()
    p, pm = _pair(model, **kwargs)
    assert set(p) == set(ft.init(model, p.config, generator=0)), "functuner's init names the same tensors as PEFT"
    for k, v in ft.init(model, p.config, generator=0).items():
        assert v.shape == p[k].shape, k

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    ours = ft.apply(model, p.replace(leaves), kwargs={"input_ids": ids}).logits
    theirs = pm(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(ours.detach(), model(input_ids=ids).logits, atol=1e-4)

    w = torch.linspace(-1, 1, ours.numel()).reshape(ours.shape)
    g_ours = torch.autograd.grad((ours * w).sum(), list(leaves.values()))
    (theirs * w).sum().backward()
    grads = {n: (q.grad if q.grad is not None else torch.zeros_like(q)) for n, q in pm.named_parameters()}
    g_theirs = ft.from_peft_state_dict(peft.get_peft_model_state_dict(pm, state_dict=grads), config=p.config)
    for k, g in zip(leaves, g_ours, strict=True):
        torch.testing.assert_close(g, g_theirs[k], atol=ATOL, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")

    merged = ft.merge(model, p)
    ours_merged = torch.func.functional_call(model, merged, kwargs={"input_ids": ids}).logits
    theirs_merged = copy.deepcopy(pm).merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(ours_merged, theirs_merged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_merged, ours.detach(), atol=1e-4, rtol=1e-4)
    by_weights = ft.merge(dict(model.state_dict()), p)  # no model: the layout comes from the config and shapes
    for k, v in by_weights.items():
        torch.testing.assert_close(v, merged[k], atol=0, rtol=0)
    restored = ft.unmerge(merged, p)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(restored[k], v, atol=1e-5, rtol=1e-5)

    out = ft.save(p, tmp_path / "moe", format="peft")
    back = ft.load(out, model)
    for k in p:
        torch.testing.assert_close(back[k], p[k], atol=0, rtol=0)
    reread = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    torch.testing.assert_close(reread(input_ids=ids).logits, ours.detach(), atol=ATOL, rtol=RTOL)


def test_transposed_experts_follow_peft_layout() -> None:
    """A module with ``is_transposed`` keeps experts as ``(E, in, out)``; PEFT then swaps its A / B shapes."""
    model = tiny_moe()
    for layer in model.model.layers:
        ex = layer.mlp.experts
        ex.gate_up_proj = torch.nn.Parameter(ex.gate_up_proj.detach().transpose(1, 2).contiguous())
        ex.down_proj = torch.nn.Parameter(ex.down_proj.detach().transpose(1, 2).contiguous())
        ex.is_transposed = True
    kwargs = {"target_parameters": ["gate_up_proj"], "r": 2}
    p = ft.init(model, ft.LoRAConfig(init_lora_weights=False, **kwargs), generator=0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
    theirs = {k: tuple(v.shape) for k, v in ft.from_peft_state_dict(peft.get_peft_model_state_dict(pm)).items()}
    assert {k: tuple(v.shape) for k, v in p.items()} == theirs
    merged = ft.merge(model, p)
    ex = model.model.layers[0].mlp.experts
    A, B = p["model.layers.0.mlp.experts.lora_A.default.weight"], p["model.layers.0.mlp.experts.lora_B.default.weight"]
    E = ex.gate_up_proj.shape[0]
    a, b = A.reshape(E, 2, -1), B.reshape(B.shape[0], 2, E)
    expected = ex.gate_up_proj + torch.einsum("ore,eri->eio", b, a) * p.config.scaling_for("")
    torch.testing.assert_close(merged["model.layers.0.mlp.experts.gate_up_proj"], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("extra", "word"),
    [({"lora_dropout": 0.1}, "lora_dropout"), ({"use_dora": True}, "use_dora"), ({"lora_bias": True}, "lora_bias")],
)
def test_refusals_peft_shares(extra: dict[str, Any], word: str) -> None:
    model = tiny_moe()
    kwargs = {"target_parameters": ["gate_up_proj"], **extra}
    with pytest.raises(ValueError):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
    with pytest.raises(ConfigError, match=word):
        ft.LoRAConfig(**kwargs)


def test_two_parameters_of_one_module_is_a_typed_gap() -> None:
    """PEFT nests two wrappers on one module; functuner refuses that with a ConfigError naming the module."""
    model = tiny_moe()
    kwargs = {"target_parameters": ["gate_up_proj", "down_proj"]}
    peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))  # PEFT can
    with pytest.raises(ConfigError, match="mlp.experts"):
        ft.init(model, ft.LoRAConfig(**kwargs), generator=0)


def test_no_match_and_both_ways_are_refused() -> None:
    model = tiny_moe()
    with pytest.raises(ConfigError, match="matched no parameter"):
        ft.init(model, ft.LoRAConfig(target_parameters=["nope_proj"]), generator=0)
    with pytest.raises(ConfigError, match="target_modules"):
        ft.init(model, ft.LoRAConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]), generator=0)


def test_per_sample_refuses_raw_parameters() -> None:
    model = tiny_moe()
    p = ft.init(model, ft.LoRAConfig(target_parameters=["gate_up_proj"]), generator=0)
    with pytest.raises(ConfigError, match="target_parameters"):
        stack_adapters(model, [p])
