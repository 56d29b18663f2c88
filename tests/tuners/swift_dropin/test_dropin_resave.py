"""Checkpoints written by the real ms-swift 4.6, read and re-saved by functuner: the same files back.

The fixtures in ``tests/fixtures/swift/`` were written by ms-swift 4.6 itself
(``tests/fixtures/make_swift_fixtures.py``; peft 0.18's bookkeeping fields such as
``peft_version`` and ``megatron_core`` in the configs).  ``Swift.from_pretrained``
then ``save_pretrained`` must give back each ``adapter_config.json`` byte for byte
(SWIFT's ``json.dumps(indent=2, sort_keys=True)``, no trailing newline, every
bookkeeping field kept in place) and the same tensors under the same keys (less the
other adapters' tensors SWIFT 4.6 wrongly saves into an adapter named ``lora``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

from functuner import LoRAConfig, Swift
from functuner.io import checkpoint as ckpt
from functuner.tuners.config_json import config_from_json, config_to_json, kept_json_fields

FIX = Path(__file__).parents[2] / "fixtures" / "swift"
BUILD = {"llama_two": tiny_llama, "bert_mts": tiny_bert, "bert_bias": tiny_bert, "gpt2_dora": tiny_gpt2}


@pytest.mark.parametrize("case", sorted(BUILD))
def test_ms_swift_checkpoint_resaves_identically(case: str, tmp_path: Path) -> None:
    src = FIX / case
    sm = Swift.from_pretrained(BUILD[case](), str(src))
    sm.save_pretrained(tmp_path)
    configs = sorted(src.rglob(ckpt.CONFIG_NAME))
    assert configs
    for cfg in configs:
        rel = cfg.relative_to(src)
        assert (tmp_path / rel).read_bytes() == cfg.read_bytes(), rel
        theirs = load_file(str(cfg.parent / ckpt.SAFETENSORS_NAME))
        ours = load_file(str(tmp_path / rel.parent / ckpt.SAFETENSORS_NAME))
        # SWIFT 4.6 picks an adapter's tensors by substring ('.lora' is in '.lora_A'), so its adapter named
        # 'lora' also saved every other adapter's tensors; functuner writes each adapter's own (documented)
        extra = set(theirs) - set(ours)
        assert set(ours) <= set(theirs) and all(f".{rel.parent.name}." not in k for k in extra), rel
        assert not extra or rel.parent.name == "lora", rel
        assert all(torch.equal(theirs[k], ours[k]) and theirs[k].dtype == ours[k].dtype for k in ours), rel
    assert (tmp_path / "configuration.json").read_text() == "{}"


def test_bookkeeping_fields_are_kept_but_do_not_change_equality() -> None:
    data = config_to_json(LoRAConfig(r=4, target_modules=["q_proj"]))
    data.update({"peft_version": "0.18.1", "megatron_core": "megatron.core", "qalora_group_size": 16})
    cfg = config_from_json(data)
    assert cfg == LoRAConfig(r=4, target_modules=["q_proj"])  # equality and hashing ignore bookkeeping
    assert hash(cfg) == hash(LoRAConfig(r=4, target_modules=["q_proj"]))
    assert kept_json_fields(cfg) == {
        "peft_version": "0.18.1",
        "megatron_core": "megatron.core",
        "qalora_group_size": 16,
    }
    assert config_to_json(cfg) == data
    kept_json_fields(cfg)["peft_version"] = "changed"  # a copy: the config stays as read
    assert config_to_json(cfg)["peft_version"] == "0.18.1"
    assert kept_json_fields(LoRAConfig()) == {}
