"""Native prompt learning for PEFT's other task types (SEQ_CLS, TOKEN_CLS, FEATURE_EXTRACTION) against real PEFT 0.21.

Models from configs: transformers Llama (``LlamaForSequenceClassification``, ``LlamaForTokenClassification``,
``LlamaModel``) and BERT (``token_type_ids``).  Compared in fp32 with PEFT's tolerance (1e-5): the outputs of
``PeftModelFor<Task>.forward``, the gradients of every adapter tensor (the trained classifier head copies PEFT adds
to ``modules_to_save`` included), and checkpoints both ways.  Where PEFT 0.21.2 fails on transformers 5 (prefix
tuning with a classification head: it looks for a ``past_key_values`` argument that transformers 5 renamed
``cache``), the reference is PEFT's own prefixes (``PeftModel.get_prompt``) handed to the model as PEFT's forward
intends.  PEFT's TOKEN_CLS prompt tuning does not extend ``labels`` (its loss fails on the shape); functuner
prepends ``-100``, checked against the loss on the real tokens' logits.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from models import bert_config, llama_config

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners.prompt_learning import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

ATOL = RTOL = 1e-5
N = 4
HEADS = {"SEQ_CLS": "ForSequenceClassification", "TOKEN_CLS": "ForTokenClassification", "FEATURE_EXTRACTION": "Model"}


def _build(arch: str, task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = llama_config(pad_token_id=1) if arch == "Llama" else bert_config()
    cfg.num_labels = 3
    return getattr(transformers, arch + HEADS[task])(cfg).eval()


def _batch(task: str, bert: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 1, 3, 4, 5]])
    out = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])}
    if bert:
        out["token_type_ids"] = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    if task == "SEQ_CLS":
        out["labels"] = torch.tensor([0, 2])
    return out


def _pair(arch: str, task: str, ours: Any, theirs: Any) -> tuple[torch.nn.Module, ft.TunerParams, Any]:
    """Our params and a PeftModel holding the same tensors (PEFT's values, head copies included, copied into ours)."""
    model = _build(arch, task)
    pm = peft.get_peft_model(_build(arch, task), copy.deepcopy(theirs)).eval()
    p = ft.init(model, ours, generator=0)
    named = {n.removeprefix("base_model."): t for n, t in pm.named_parameters() if t.requires_grad}
    assert set(named) == set(p), "trainable tensors differ from PEFT's"
    return model, p.replace({k: named[k].detach().clone() for k in p}), pm


def _out(o: Any) -> torch.Tensor:
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


CASES = [
    ("Llama", "SEQ_CLS", PromptTuningConfig, peft.PromptTuningConfig, {}),
    ("Llama", "SEQ_CLS", PromptEncoderConfig, peft.PromptEncoderConfig, {"encoder_hidden_size": 8}),
    ("Llama", "TOKEN_CLS", PromptTuningConfig, peft.PromptTuningConfig, {}),
    ("Llama", "FEATURE_EXTRACTION", PromptTuningConfig, peft.PromptTuningConfig, {}),
    ("Llama", "FEATURE_EXTRACTION", PrefixTuningConfig, peft.PrefixTuningConfig, {}),
    ("Bert", "SEQ_CLS", PromptTuningConfig, peft.PromptTuningConfig, {}),
    ("Bert", "TOKEN_CLS", PromptEncoderConfig, peft.PromptEncoderConfig, {"encoder_hidden_size": 8}),
]


@pytest.mark.parametrize(
    ("arch", "task", "ours", "theirs", "extra"), CASES, ids=[f"{c[0]}-{c[1]}-{c[2].__name__}" for c in CASES]
)
def test_forward_and_grads_equal_peft(arch: str, task: str, ours: Any, theirs: Any, extra: Any) -> None:
    kw = {"num_virtual_tokens": N, "task_type": task, **extra}
    model, p, pm = _pair(arch, task, ours(**kw), theirs(**kw))
    if task in ("SEQ_CLS", "TOKEN_CLS"):  # PEFT's classifier head copy is trained too
        assert set(p.config.modules_to_save) == {"classifier", "score"}
        assert any(".modules_to_save.default." in k for k in p)
    batch = _batch(task, bert=arch == "Bert" and task != "FEATURE_EXTRACTION")
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    out = ft.apply(model, p.replace(leaves), (), batch)
    ref = pm(**batch)
    torch.testing.assert_close(_out(out), _out(ref), atol=ATOL, rtol=RTOL)
    loss = out.loss if task == "SEQ_CLS" else _out(out).square().mean()
    ref_loss = ref.loss if task == "SEQ_CLS" else _out(ref).square().mean()
    loss.backward()
    ref_loss.backward()
    named = {n.removeprefix("base_model."): t for n, t in pm.named_parameters() if t.requires_grad}
    for k, t in leaves.items():
        torch.testing.assert_close(t.grad, named[k].grad, atol=ATOL, rtol=RTOL)


def test_token_cls_labels_get_ignored_virtual_positions() -> None:
    kw = {"num_virtual_tokens": N, "task_type": "TOKEN_CLS"}
    model = _build("Llama", "TOKEN_CLS")
    p = ft.init(model, PromptTuningConfig(**kw), generator=0)
    batch = _batch("TOKEN_CLS")
    labels = torch.tensor([[0, 2, 1, 1, 0], [-100, -100, 2, 0, 1]])
    out = ft.apply(model, p, (), {**batch, "labels": labels})
    want = torch.nn.functional.cross_entropy(out.logits[:, N:].reshape(-1, 3), labels.reshape(-1))
    torch.testing.assert_close(out.loss, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_prefix_tuning_with_a_head_equals_peft_prefixes(task: str) -> None:
    """PEFT 0.21.2 raises here on transformers 5; its own prefixes, handed to the model as a cache, are the reference."""
    kw = {"num_virtual_tokens": N, "task_type": task}
    model, p, pm = _pair("Llama", task, PrefixTuningConfig(**kw), peft.PrefixTuningConfig(**kw))
    batch = _batch(task)
    with pytest.raises(ValueError, match="past key values"):
        pm(**batch)
    mask = torch.cat((torch.ones(2, N), batch["attention_mask"]), 1)
    ref = pm.base_model(**{**batch, "attention_mask": mask}, cache=pm.get_prompt(2))
    out = ft.apply(model, p, (), batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=RTOL)
    if task == "SEQ_CLS":
        torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=RTOL)


def test_seq_cls_checkpoints_both_ways(tmp_path: Path) -> None:
    """PEFT's layout holds ``prompt_embeddings`` and the head at ``base_model.model.score.weight``; both load."""
    kw = {"num_virtual_tokens": N, "task_type": "SEQ_CLS", "encoder_hidden_size": 8}
    model, p, pm = _pair("Llama", "SEQ_CLS", PromptEncoderConfig(**kw), peft.PromptEncoderConfig(**kw))
    batch = _batch("SEQ_CLS")
    with torch.no_grad():
        mine, theirs = ft.apply(model, p, (), batch).logits, pm(**batch).logits
    ft.save(p, tmp_path / "ours", format="peft")
    loaded = peft.PeftModel.from_pretrained(_build("Llama", "SEQ_CLS"), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, mine, atol=ATOL, rtol=RTOL)
    pm.save_pretrained(tmp_path / "theirs")
    q = ft.load(tmp_path / "theirs", _build("Llama", "SEQ_CLS"))
    assert set(q) == {"prompt_encoder.default.embedding.weight", "score.modules_to_save.default.weight"}
    torch.testing.assert_close(ft.apply(model, q, (), batch).logits, theirs, atol=ATOL, rtol=RTOL)
    ft.save(p, tmp_path / "swift")  # SWIFT's layout keeps the encoder and the head
    r = ft.load(tmp_path / "swift", _build("Llama", "SEQ_CLS"))
    torch.testing.assert_close(dict(r), dict(p), atol=0, rtol=0)


def test_shim_trains_the_head_and_refusals() -> None:
    cfg = PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS")
    sm = ft.Swift.prepare_model(_build("Llama", "SEQ_CLS"), cfg)
    trainable = sorted(n for n, t in sm.named_parameters() if t.requires_grad)
    assert trainable == [
        "base_model.prompt_encoder.default.embedding.weight",
        "base_model.score.modules_to_save.default.weight",
    ]
    sm(**_batch("SEQ_CLS")).loss.backward()
    model = _build("Llama", "FEATURE_EXTRACTION")
    p = ft.init(model, PromptTuningConfig(num_virtual_tokens=N, task_type="FEATURE_EXTRACTION"), generator=0)
    from transformers import DynamicCache

    with pytest.raises(ConfigError, match="CAUSAL_LM"):  # caches are generation, PEFT's causal-LM path
        ft.apply(model, p, (), {**_batch("FEATURE_EXTRACTION"), "cache": DynamicCache(config=model.config)})
    bert = _build("Bert", "FEATURE_EXTRACTION")
    q = ft.init(bert, PromptTuningConfig(num_virtual_tokens=N, task_type="FEATURE_EXTRACTION"), generator=0)
    with pytest.raises(ConfigError, match="token_type_ids"):  # PEFT drops them for this task with a warning
        ft.apply(bert, q, (), _batch("FEATURE_EXTRACTION", bert=True))
    with pytest.raises(ConfigError, match="modules_to_save"):
        ft.init(
            model,
            PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM", modules_to_save=["nope"]),
            generator=0,
        )
