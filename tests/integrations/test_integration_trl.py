"""TRL's ``SFTTrainer`` trains a ``SwiftModel`` exactly as it trains the equivalent ``peft.PeftModel``.

Oracle: the same tiny Llama, the same LoRA values (saved by the shim in PEFT's
layout, loaded by peft as trainable), the same data and seed through
``SFTTrainer``: the logged loss curves and the trained adapter tensors agree.
TRL reaches the backbone through ``self.base_model`` in its fused LM-head
forward; the shim runs that patch on the wrapped model (``functuner.shim.patches``).
Offline: a word-level tokenizer built with ``tokenizers``; the data set is built in the test.
"""

from __future__ import annotations

from pathlib import Path

import datasets  # in the test extra: a missing client fails, never skips
import peft
import pytest
import torch
import trl
from conftest import tiny_llama

from functuner import LoRAConfig, Swift, SwiftModel

WORDS = ["<pad>", "<eos>", "<unk>", *"the cat sat on a mat dog ran to park bird flew over tree".split()]
TEXTS = ["the cat sat on a mat", "the dog ran to the park", "a bird flew over the tree", "the cat ran to a tree"]


def _tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _train(model: torch.nn.Module, out: Path, bf16: bool) -> list[float]:
    args = trl.SFTConfig(
        bf16=bf16,
        activation_checkpointing=True,  # TRL's default (recomputation reaches the adapters through the shim's routes)
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        learning_rate=1e-2,
        logging_steps=1,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        data_seed=0,
    )
    data = datasets.Dataset.from_dict({"text": TEXTS})
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer())
    trainer.train()
    return [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_sft_trainer_trains_a_swift_model_like_the_peft_model(tmp_path: Path, bf16: bool) -> None:
    """fp32: agreement to float rounding; bf16 autocast (TRL's default, accelerate wraps the forward): to bf16's."""
    tol = 2e-3 if bf16 else 1e-5
    # bf16 rounds differently with a different op order, and Adam turns a near-zero gradient's sign flip into a
    # full lr step: the bulk must agree, a few elements may differ by up to max_steps * lr
    bulk, worst = (1e-3, 4 * 1e-2) if bf16 else (1e-5, 1e-5)
    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    sm.save_pretrained(tmp_path / "init", peft_format=True)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "init"), is_trainable=True)
    frozen = sm.model.model.layers[0].self_attn.q_proj.weight.detach().clone()

    mine = _train(sm, tmp_path / "swift", bf16)
    theirs = _train(pm, tmp_path / "peft", bf16)
    assert len(mine) == len(theirs) == 4
    assert mine == pytest.approx(theirs, rel=tol, abs=tol)
    assert isinstance(sm, SwiftModel) and torch.equal(sm.model.model.layers[0].self_attn.q_proj.weight, frozen)
    # the trained adapters agree too (PEFT's names, the same values up to float rounding)
    mine_sd = sm.get_adapter_state_dict("default")
    theirs_sd = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(pm).items()}
    assert sorted(mine_sd) == sorted(theirs_sd)
    for k, v in mine_sd.items():
        diff = (v - theirs_sd[k]).abs()
        assert diff.median() <= bulk and diff.max() <= worst, k
    x = torch.randint(0, len(WORDS), (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # TRL's patch runs on the wrapped model: both call paths agree
        # (with bf16, accelerate's autocast wrapper stays on the model the Trainer got, as on a PeftModel)
        assert torch.allclose(sm(x).logits, sm.model(x).logits, atol=1e-2 if bf16 else 1e-6)
