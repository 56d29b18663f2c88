"""``transformers.Trainer`` with a ``SwiftModel``: checkpoints are adapter directories, resume is exact.

Oracles: an uninterrupted run of the same training (resume must reproduce its
adapter tensors and optimizer state bit for bit), ``Swift.from_pretrained`` and
``peft.PeftModel.from_pretrained`` loading ``checkpoint-N/`` (same outputs as the
trained model), and transformers' own ``from_pretrained`` for a merged model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import tiny_llama

from functuner import LoRAConfig, Swift, SwiftModel
from functuner.errors import CheckpointError
from functuner.shim.trainer import SwiftCheckpointCallback

X = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(0))
DATA = [{"input_ids": X[i % 4], "labels": X[i % 4]} for i in range(8)]


def _swift_model() -> SwiftModel:
    torch.manual_seed(0)
    return Swift.prepare_model(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))


def _trainer(sm: SwiftModel, out: Path, max_steps: int) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=max_steps,
        save_steps=2,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        learning_rate=1e-2,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    return transformers.Trainer(model=sm, args=args, train_dataset=DATA, callbacks=[SwiftCheckpointCallback()])


def _logits(m: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(X).logits


def test_checkpoints_are_adapter_dirs_and_resume_is_exact(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    full = _swift_model()
    t_full = _trainer(full, tmp_path / "full", 4)
    t_full.train()

    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()

    resumed = _swift_model()  # a fresh process's model: the checkpoint must restore everything
    t_res = _trainer(resumed, tmp_path / "resumed", 4)
    with caplog.at_level(logging.WARNING, logger="transformers"):
        t_res.train(resume_from_checkpoint=str(ckpt))
    assert not [r for r in caplog.records if "missing keys" in r.getMessage() or "unexpected keys" in r.getMessage()]
    for k, v in full.adapters["default"].tensors.items():
        assert torch.equal(resumed.adapters["default"].tensors[k], v), k
    opt_full, opt_res = t_full.optimizer.state_dict(), t_res.optimizer.state_dict()
    for i, st in opt_full["state"].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(opt_res["state"][i][name]), torch.as_tensor(value)), (i, name)

    # checkpoint-4 of the resumed run: an adapter directory both loaders take
    final = tmp_path / "resumed" / "checkpoint-4"
    want = _logits(resumed)
    mine = Swift.from_pretrained(tiny_llama(), str(final))
    assert torch.allclose(_logits(mine), want, atol=1e-6)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(final))
    assert torch.allclose(_logits(theirs), want, atol=1e-5)


def test_resume_without_the_callback_is_exact_and_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The Trainer's own model.safetensors is SwiftModel.state_dict(): it reloads into the adapters, no warnings."""
    sm = _swift_model()
    _trainer(sm, tmp_path, 2).train()
    bare = _swift_model()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert set(saved) == set(sm.state_dict())
    with caplog.at_level(logging.WARNING):
        result = bare.load_state_dict(saved, False)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert torch.equal(_logits(bare), _logits(sm))


def test_merged_model_saves_as_a_transformers_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    want = _logits(sm)
    merged = Swift.merge_and_unload(sm)
    merged.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(back), want, atol=1e-5)
    assert torch.equal(_logits(back), _logits(merged.model))


def test_save_model_with_the_mixin_writes_an_adapter_dir(tmp_path: Path) -> None:
    from functuner.shim.trainer import SwiftTrainerMixin

    class SwiftTrainer(SwiftTrainerMixin, transformers.Trainer):
        pass

    sm = _swift_model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        learning_rate=1e-2,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = SwiftTrainer(model=sm, args=args, train_dataset=DATA)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    want = _logits(sm)
    assert torch.allclose(_logits(Swift.from_pretrained(tiny_llama(), str(tmp_path / "final"))), want, atol=1e-6)
    assert torch.allclose(
        _logits(peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "final"))), want, atol=1e-5
    )


def test_plain_trainer_save_model_is_not_an_adapter_dir_without_the_mixin(tmp_path: Path) -> None:
    """Documented limit: transformers' Trainer writes a bare model.safetensors for a model it does not know."""
    sm = _swift_model()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    transformers.Trainer(model=sm, args=args).save_model()
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()
    with pytest.raises(CheckpointError, match="SwiftCheckpointCallback"):
        Swift.from_pretrained(tiny_llama(), str(tmp_path))
