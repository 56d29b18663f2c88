"""Shared fixtures: tiny transformers models built from configs (no downloads), fixed seeds."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama(seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()


def tiny_bert(seed: int = 0, num_labels: int | None = None, **overrides):
    import transformers

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    cfg = transformers.BertConfig(**kw)
    if num_labels is not None:
        cfg.num_labels = num_labels
        return transformers.BertForSequenceClassification(cfg).eval()
    return transformers.BertModel(cfg).eval()


def tiny_gpt2(seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    kw.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()


def tiny_vit(seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    kw = dict(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    kw.update(overrides)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**kw)).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """Every test must leave torch's global grad mode as it found it (a leak silently breaks later tests)."""
    before = torch.is_grad_enabled()
    yield
    after = torch.is_grad_enabled()
    if after != before:
        torch.set_grad_enabled(before)
        pytest.fail(f"test changed torch's global grad mode from {before} to {after} and did not restore it")
