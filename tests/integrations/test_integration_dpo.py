"""TRL's ``DPOTrainer`` trains a ``SwiftModel`` exactly as it trains the equivalent ``peft.PeftModel``.

The reference model is PEFT's.  TRL with a ``PeftModel`` it builds from ``peft_config=``
(a new adapter) computes the reference with the adapter disabled; with a ``PeftModel``
passed in (a pretrained adapter) it adds a frozen ``"ref"`` copy of the adapter.  A
``SwiftModel`` gets ``ref_model=functuner.reference_model(sm)`` (adapters disabled) or
``reference_model(sm, adapters="frozen")``: the wrapped model's own modules, run with
per-call routes (no copy of the base weights).  Oracle: the same tiny Llama, the same
non-zero LoRA values (so "disabled" and "frozen copy" differ and a wrong reference
shows in the first loss), the same data and seed: the logged loss curves, DPO's
reward metrics and the trained adapters agree.
Offline: a word-level tokenizer built with ``tokenizers``; the data set is built in the test.
"""

from __future__ import annotations

import math
from pathlib import Path

import datasets  # in the test extra: a missing client fails, never skips
import peft
import pytest
import torch
import transformers
import trl
from conftest import tiny_llama
from safetensors.torch import load_file

import functuner
from functuner import LoRAConfig, Swift, SwiftModel
from functuner.errors import ConfigError

WORDS = ["<pad>", "<eos>", "<unk>", *"the cat sat on a mat dog ran to park bird flew over tree".split()]
DATA = {
    "prompt": ["the cat", "the dog", "a bird", "the cat"],
    "chosen": [" sat on a mat", " ran to the park", " flew over the tree", " ran to a tree"],
    "rejected": [" flew over a dog", " sat on the cat", " ran to a mat", " sat on the park"],
}


def _tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _train(
    model: torch.nn.Module, out: Path, ref_model: torch.nn.Module | None = None, **trainer_kwargs: object
) -> tuple[list[float], list]:
    args = trl.DPOConfig(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        learning_rate=5e-2,
        logging_steps=1,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        data_seed=0,
        beta=0.5,
        bf16=False,  # fp32: agreement to float rounding (TRL's bf16 autocast default rounds the two op orders apart)
        # off: with it on, TRL 1.16's reference pass calls transformers' deprecated gradient_checkpointing_disable
        # (a FutureWarning from their code, with a PeftModel alike); the SFT test covers recomputation through the shim
        activation_checkpointing=False,
    )
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=datasets.Dataset.from_dict(DATA),
        processing_class=_tokenizer(),
        **trainer_kwargs,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [float(h["loss"]) for h in logs], logs


def _swift_with_values(tmp_path: Path) -> SwiftModel:
    torch.manual_seed(0)
    sm = Swift.prepare_model(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B != 0: the adapter changes the outputs, so "disabled" and "frozen copy" differ
        for p in sm.adapters["default"].tensors.values():
            p.normal_(0, 0.2)
    sm.save_pretrained(tmp_path / "init", peft_format=True)
    return sm


def _init_values(tmp_path: Path) -> dict[str, torch.Tensor]:
    got = load_file(str(tmp_path / "init" / "adapter_model.safetensors"))  # PEFT's layout: default at the root
    return {k.removeprefix("base_model.model."): v for k, v in got.items()}


def _assert_same_training(sm: SwiftModel, pm: peft.PeftModel, mine, theirs, tmp_path: Path) -> None:
    (mine, my_logs), (theirs, their_logs) = mine, theirs
    assert len(mine) == len(theirs) == 3
    assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    for a, b in zip(my_logs, their_logs, strict=True):  # DPO's own metrics (rewards, margins) agree as well
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    assert sm.active_adapters == {"default"}  # the reference calls never touched the policy's active set
    mine_sd = sm.get_adapter_state_dict("default")
    theirs_sd = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(pm).items()}
    theirs_sd = {k: v for k, v in theirs_sd.items() if ".ref." not in k}  # TRL's frozen "ref" copy, if any
    assert sorted(mine_sd) == sorted(theirs_sd)
    init = _init_values(tmp_path)
    for k, v in mine_sd.items():
        assert torch.allclose(v, theirs_sd[k], rtol=1e-4, atol=1e-5), k
    assert any(not torch.equal(v, init[k]) for k, v in mine_sd.items()), "training did not change the adapter"


def test_dpo_new_adapter_reference_is_the_adapter_disabled_like_peft(tmp_path: Path) -> None:
    """TRL + PEFT with ``peft_config=``: the reference is the policy with the adapter disabled (the base model)."""
    sm = _swift_with_values(tmp_path)
    x = torch.randint(3, len(WORDS), (2, 6), generator=torch.Generator().manual_seed(0))
    ref = functuner.reference_model(sm)
    frozen = sm.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        base = tiny_llama()(x).logits
        assert torch.equal(ref(x).logits, base)  # the reference is the base model...
        assert not torch.allclose(sm(x).logits, base, atol=1e-3)  # ...which the adapter really changes
    assert all(a is b for a, b in zip(ref.parameters(), sm.model.parameters(), strict=True))  # shared, not copied

    mine = _train(sm, tmp_path / "swift", ref)
    # PEFT's side: TRL builds the PeftModel from peft_config (functuner's config converted), then trains the same
    # values (copied in before training: PEFT's own init draws other numbers)
    holder: dict[str, peft.PeftModel] = {}
    init = _init_values(tmp_path)

    class Start(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    key = name.removeprefix("base_model.model.").replace(".default.", ".")
                    if key in init:
                        p.copy_(init[key])
            holder["pm"] = model

    theirs = _train(
        tiny_llama(),
        tmp_path / "peft",
        peft_config=functuner.to_peft_config(sm.adapters["default"].config),
        callbacks=[Start()],
    )
    pm = holder["pm"]
    assert "ref" not in pm.peft_config  # TRL's "adapter disabled" path, not a frozen copy
    assert mine[0][0] != pytest.approx(math.log(2), abs=1e-3)  # step 0: policy != reference (adapter on vs off)
    _assert_same_training(sm, pm, mine, theirs, tmp_path)
    assert torch.equal(sm.model.model.layers[0].self_attn.q_proj.weight, frozen)


def test_dpo_pretrained_adapter_reference_is_a_frozen_copy_like_peft(tmp_path: Path) -> None:
    """TRL + a ``PeftModel`` with a pretrained adapter: the reference is a frozen copy of the adapter."""
    sm = _swift_with_values(tmp_path)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "init"), is_trainable=True)
    ref = functuner.reference_model(sm, adapters="frozen")
    mine = _train(sm, tmp_path / "swift", ref)
    theirs = _train(pm, tmp_path / "peft")
    assert "ref" in pm.peft_config  # TRL's frozen copy
    assert mine[0][0] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy == reference
    _assert_same_training(sm, pm, mine, theirs, tmp_path)


def test_reference_model_refuses_what_is_no_swift_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a SwiftModel"):
        functuner.reference_model(tiny_llama())
    with pytest.raises(ConfigError, match="disabled"):
        functuner.reference_model(_swift_with_values(tmp_path), adapters="initial")
