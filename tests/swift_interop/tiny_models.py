"""Tiny transformers models built from configs, shared by the SWIFT interop scripts (no pytest import).

Same configs and seeds as ``tests/conftest.py``; both venvs (functuner's and
ms-swift's) build bit-identical weights from them, which the fixtures check
with :func:`checksum`.
"""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0):
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
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()


def tiny_bert(seed: int = 0):
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
    return transformers.BertModel(transformers.BertConfig(**kw)).eval()


def tiny_gpt2(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()


BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def checksum(model: torch.nn.Module) -> torch.Tensor:
    """Sum of every base weight in float64: equal in both venvs when the models are identical."""
    return torch.tensor([float(sum(p.double().sum() for p in model.state_dict().values()))], dtype=torch.float64)


def inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 64, (2, 7), generator=g)


def output_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first output tensor (logits / last hidden state) as float32."""
    out = model(input_ids=x)
    t = (
        out[0]
        if isinstance(out, tuple)
        else (out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state)
    )
    return t.detach().float()
