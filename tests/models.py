"""Tiny models for the tests, built from configs with fixed seeds (no downloads): the one home of every builder.

Imported by pytest test files (directly or through ``tests/conftest.py``) and, as a plain module, by the
scripts that run under ms-swift's own venv (``tests/fixtures/*.py``, ``tests/swift_interop/*.py``), so it
imports neither pytest nor functuner, and transformers only inside the builders.

Both venvs must build bit-identical weights from these builders: the recorded fixtures check it with
:func:`checksum` / :func:`checksum_tensor`.  The seed is set right before construction and nothing else
draws from torch's global RNG in between; changing a config, a seed or the construction order breaks
every fixture (regenerate them with the scripts in ``tests/fixtures/``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "BUILDERS",
    "RESTUNING_VIT",
    "SMALL_LLAMA",
    "ToyGLM",
    "ToyGLMBlock",
    "ToyImageNet",
    "ToyUNet",
    "ToyUpBlock",
    "bert_config",
    "checksum",
    "checksum_tensor",
    "gpt2_config",
    "inputs",
    "llama_config",
    "logits",
    "output_of",
    "tiny_bert",
    "tiny_glm",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_toy",
    "tiny_unet",
    "tiny_vit",
    "vit_config",
]

# -- transformers configs ---------------------------------------------------------------------------------------
_LLAMA: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
_BERT: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
_GPT2: dict[str, Any] = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
_VIT: dict[str, Any] = dict(
    image_size=16,
    patch_size=4,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    num_labels=3,
)

#: The smaller Llama of the LongLoRA / LLaMA-Pro fixtures (``tests/fixtures/tuners2``): ``tiny_llama(**SMALL_LLAMA)``.
SMALL_LLAMA: dict[str, Any] = dict(vocab_size=32, hidden_size=16, intermediate_size=32, attn_implementation="sdpa")
#: The smaller ViT of the Res-Tuning fixture (``tests/fixtures/tuners2``): ``tiny_vit(**RESTUNING_VIT)``.
RESTUNING_VIT: dict[str, Any] = dict(image_size=8, hidden_size=16, num_attention_heads=2, intermediate_size=32)


def llama_config(**overrides: Any) -> Any:
    import transformers

    return transformers.LlamaConfig(**{**_LLAMA, **overrides})


def bert_config(**overrides: Any) -> Any:
    import transformers

    return transformers.BertConfig(**{**_BERT, **overrides})


def gpt2_config(**overrides: Any) -> Any:
    import transformers

    return transformers.GPT2Config(**{**_GPT2, **overrides})


def vit_config(**overrides: Any) -> Any:
    import transformers

    return transformers.ViTConfig(**{**_VIT, **overrides})


# -- transformers models -----------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """``LlamaForCausalLM``: 2 layers, hidden 32, 4 heads (2 KV heads), vocabulary 64; eval mode."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(**overrides)).eval()


def tiny_bert(seed: int = 0, num_labels: int | None = None, **overrides: Any) -> nn.Module:
    """``BertModel`` (``BertForSequenceClassification`` with ``num_labels``): 2 layers, hidden 32; eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = bert_config(**overrides)
    if num_labels is not None:
        cfg.num_labels = num_labels
        return transformers.BertForSequenceClassification(cfg).eval()
    return transformers.BertModel(cfg).eval()


def tiny_gpt2(seed: int = 0, **overrides: Any) -> nn.Module:
    """``GPT2LMHeadModel`` (Conv1D layers): 2 layers, hidden 32, 4 heads, vocabulary 64; eval mode."""
    import transformers

    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(gpt2_config(**overrides)).eval()


def tiny_vit(seed: int = 0, **overrides: Any) -> nn.Module:
    """``ViTForImageClassification`` on (B, 3, 16, 16) images, 3 labels: 2 layers, hidden 32; eval mode."""
    import transformers

    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(vit_config(**overrides)).eval()


# -- plain torch toys --------------------------------------------------------------------------------------------
class ToyImageNet(nn.Module):
    """A small image classifier whose ``backbone`` (an nn.Sequential) maps (B, 3, 16, 16) -> (B, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 32),
        )
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def tiny_toy(seed: int = 0) -> nn.Module:
    """:class:`ToyImageNet` (the Side tuner's ``fcn4`` fixture); eval mode."""
    torch.manual_seed(seed)
    return ToyImageNet().eval()


class ToyUpBlock(nn.Module):
    """conv + SiLU as its own class: SWIFT's SCETuning attaches its tuner as a child of the target, which an
    ``nn.Sequential`` target would then also run as an extra layer (a SWIFT quirk we keep out of the fixture)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.conv(x))


class ToyUNet(nn.Module):
    """A UNet-shaped toy with SCEdit's hook points: down blocks, and up blocks whose input is
    ``cat([hidden, skip], dim=1)`` (the skip connection is the last ``width`` channels)."""

    def __init__(self, channels: int = 3, width: int = 8) -> None:
        super().__init__()
        conv = nn.Conv2d
        self.stem = conv(channels, width, 3, padding=1)
        self.down = nn.ModuleList([conv(width, width, 3, stride=2, padding=1) for _ in range(2)])
        self.mid = conv(width, width, 3, padding=1)
        self.up = nn.ModuleList([ToyUpBlock(width) for _ in range(2)])
        self.out = conv(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        skips = []
        for block in self.down:
            skips.append(h)
            h = block(h)
        h = self.mid(h)
        for block in self.up:
            h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1))
        return self.out(h)


def tiny_unet(seed: int = 0) -> ToyUNet:
    """:class:`ToyUNet` (the SCEdit / Res-Tuning fixtures), in train mode as the fixtures built it."""
    torch.manual_seed(seed)
    return ToyUNet()


class ToyGLMBlock(nn.Module):
    """A ChatGLM-shaped attention block: one fused ``query_key_value`` Linear (out = 3 x hidden), then ``dense``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query_key_value(h).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return h + self.dense(att @ v)


class ToyGLM(nn.Module):
    """Token ids -> logits through :class:`ToyGLMBlock` layers (MergedLinear LoRA's ``query_key_value`` target)."""

    def __init__(self, vocab: int = 64, hidden: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([ToyGLMBlock(hidden) for _ in range(layers)])
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def tiny_glm(seed: int = 0) -> ToyGLM:
    """:class:`ToyGLM`: vocabulary 64, hidden 16, 2 layers; eval mode."""
    torch.manual_seed(seed)
    return ToyGLM().eval()


#: The LoRA interop fixtures' architectures (``tests/fixtures/swift``, ``tests/swift_interop``).
BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


# -- fingerprints, inputs and outputs ----------------------------------------------------------------------------
def checksum(model: nn.Module) -> float:
    """Sum of the state in float64, tensor by tensor (the tuner fixtures' ``base_checksum``)."""
    return sum(float(t.double().sum()) for t in model.state_dict().values())


def checksum_tensor(model: nn.Module) -> torch.Tensor:
    """Sum of the state in float64 as a 1-element tensor (the LoRA interop fixtures' ``base_checksum``).

    Summed in torch rather than in Python floats, so its last bits differ from :func:`checksum`; each
    fixture set keeps the form it was recorded with.
    """
    return torch.tensor([float(sum(p.double().sum() for p in model.state_dict().values()))], dtype=torch.float64)


def inputs() -> torch.Tensor:
    """The LoRA interop fixtures' input ids: (2, 7) from a fixed generator."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 64, (2, 7), generator=g)


def logits(out: Any) -> torch.Tensor:
    """The tensor the tuner fixtures recorded: a tensor output, else ``.logits``, else ``.last_hidden_state``."""
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def output_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first output tensor (logits / last hidden state) of ``model(input_ids=x)``, detached, as float32."""
    out = model(input_ids=x)
    t = (
        out[0]
        if isinstance(out, tuple)
        else (out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state)
    )
    return t.detach().float()
