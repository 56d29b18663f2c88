"""Quantized base checkpoints on disk: the streaming CLI merge and the 16-bit export.

``functuner merge`` on a bitsandbytes checkpoint (packed weights plus quantization-state tensors, as
``state_dict`` writes them) dequantizes it shard by shard and merges into a 16-bit model; any other
quantized checkpoint (optimum-quanto's here) is refused before anything is written, naming the state tensor
and the way out: ``merge_quantized`` on the loaded model, whose float weights saved in bf16 load into the
float architecture and compute what the adapted quantized model computes (to bf16 rounding).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import functuner as ft
from functuner import LoRAConfig
from functuner.cli import main
from functuner.quant import merge_quantized
from tests.quant.quant_models import TARGETS, float_llama, ids, quantized_llama


def _save_quantized(model: torch.nn.Module, path: Path) -> None:
    path.mkdir()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"))
    model.config.to_json_file(str(path / "config.json"))


@pytest.mark.parametrize("backend", ["bnb4", "bnb8"])
def test_cli_merge_dequantizes_a_bitsandbytes_checkpoint_shard_by_shard(backend: str, tmp_path: Path) -> None:
    """``functuner merge`` on a bitsandbytes checkpoint writes a 16-bit merged model that computes what the
    adapted quantized model computes (the merge is exact in fp32; bf16 storage rounds it)."""
    model = quantized_llama(backend)
    _save_quantized(model, tmp_path / "base")
    p = ft.init(model, LoRAConfig(r=4, target_modules=TARGETS, init_lora_weights=False), generator=0)
    ft.save(p, tmp_path / "adapter", format="peft")
    argv = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--dtype", "bf16", "--quiet"]) == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(k.endswith((".SCB", ".weight_format", ".absmax", ".quant_map")) for k in merged)
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert merged["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    float_model = float_llama()
    float_model.load_state_dict({k: v.float() for k, v in merged.items()})
    x = ids()
    with torch.no_grad():
        adapted = ft.apply(model, p, kwargs={"input_ids": x}).logits
        torch.testing.assert_close(float_model(input_ids=x).logits, adapted, atol=5e-2, rtol=0)
    assert not list(tmp_path.glob(".dequantized-*"))  # the float copy of the base is gone


def test_cli_merge_refuses_other_quantized_checkpoints(tmp_path: Path, capsys) -> None:
    model = quantized_llama("quanto8")
    _save_quantized(model, tmp_path / "base")
    ft.save(ft.init(model, LoRAConfig(r=4, target_modules=TARGETS), generator=0), tmp_path / "adapter", format="peft")
    argv = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "quantized checkpoint" in err and "weight._data" in err and "merge_quantized" in err
    assert not (tmp_path / "out").exists()


def test_merge_quantized_weights_export_in_bf16(tmp_path: Path) -> None:
    model = quantized_llama("bnb4")
    p = ft.init(model, LoRAConfig(r=4, target_modules=TARGETS, init_lora_weights=False), generator=0)
    x = ids()
    with torch.no_grad():
        adapted = ft.apply(model, p, kwargs={"input_ids": x}).logits
    float_model = float_llama()
    names = set(float_model.state_dict())
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in merge_quantized(model, p).weights.items() if k in names}
    save_file(weights, str(tmp_path / "merged.safetensors"))
    float_model.load_state_dict({k: v.float() for k, v in load_file(str(tmp_path / "merged.safetensors")).items()})
    with torch.no_grad():
        merged = float_model(input_ids=x).logits
    torch.testing.assert_close(merged, adapted, atol=5e-2, rtol=0)  # bf16 storage of the merged weights
