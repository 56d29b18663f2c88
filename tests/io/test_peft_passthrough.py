"""PEFT's own tuners through the shim (issue 4): ``Swift`` passes them to the real ``peft`` and loads their checkpoints.

Compared against the real thing: ``peft.get_peft_model`` on an identical copy,
``peft.PeftModel.from_pretrained`` on real checkpoints written by
``PeftModel.save_pretrained`` to disk.  Covered: AdaLoRA, IA3, LoHa, LoKr,
VeRA, BOFT, prompt tuning, prefix tuning (tiny Llama), IA3 on a tiny BERT;
merge / unmerge / merge_and_unload of IA3, LoHa, LoKr; bad directories
(SwiftModel target, pickles, NaN, missing keys, wrong model, mixed types)
raise typed errors and leave the model as it was.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_llama
from safetensors.torch import load_file, save_file

import functuner as ft
import functuner.io.checkpoint as ckpt
from functuner import LoRAConfig, Swift, SwiftModel
from functuner.errors import AdapterNameError, CheckpointError, ConfigError, ParamsMismatchError, UnsafeCheckpointError

X = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))

CONFIGS: dict[str, Callable[[], peft.PeftConfig]] = {
    "adalora": lambda: peft.AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_step=10),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "loha": lambda: peft.LoHaConfig(r=2, target_modules=["q_proj", "v_proj"]),
    "lokr": lambda: peft.LoKrConfig(r=2, target_modules=["q_proj", "v_proj"]),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"]),
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


def out(model: Any) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=X)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor away from its initial value (PEFT inits many tuners to the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def fingerprint(model: torch.nn.Module) -> tuple[Any, ...]:
    """Structure, trainable flags and output of a model: what a failed load must leave unchanged."""
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        out(model),
    )


def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def saved_peft(
    tmp_path: Path, kind: str, make: Callable[..., torch.nn.Module] = tiny_llama
) -> tuple[Path, torch.Tensor]:
    """A perturbed PEFT adapter of ``kind`` saved by PeftModel.save_pretrained; returns (dir, its outputs)."""
    torch.manual_seed(1)
    pm = Swift.prepare_model(make(), CONFIGS[kind]())
    perturb(pm)
    pm.save_pretrained(str(tmp_path / kind))
    return tmp_path / kind, out(pm)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_prepare_and_load_match_peft(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    ours = Swift.prepare_model(tiny_llama(), CONFIGS[kind]())
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny_llama(), CONFIGS[kind]())
    assert isinstance(ours, peft.PeftModel) and type(ours) is type(theirs)
    assert torch.equal(out(ours), out(theirs))
    perturb(ours)
    want = out(ours)
    assert not torch.allclose(want[:, -X.shape[1] :], out(tiny_llama())), "perturbed adapter must change the output"
    ours.save_pretrained(str(tmp_path))

    loaded = Swift.from_pretrained(tiny_llama(), str(tmp_path))
    reference = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert type(loaded) is type(reference)
    assert loaded.peft_config["default"].peft_type == CONFIGS[kind]().peft_type
    assert torch.equal(out(loaded), out(reference))
    assert torch.allclose(out(loaded), want, atol=1e-6)
    # trainable as PEFT leaves them (inference by default)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in reference.named_parameters() if p.requires_grad
    ]


def test_ia3_on_bert_loads_and_trains_when_asked(tmp_path: Path) -> None:
    cfg = peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    torch.manual_seed(1)
    pm = Swift.prepare_model(tiny_bert(), cfg)
    perturb(pm)
    pm.save_pretrained(str(tmp_path))
    loaded = Swift.from_pretrained(tiny_bert(), str(tmp_path), inference_mode=False)
    assert torch.equal(out(loaded), out(peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path))))
    assert torch.allclose(out(loaded), out(pm), atol=1e-6)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".ia3_l." in n for n in trainable)


@pytest.mark.parametrize("kind", ["ia3", "loha", "lokr"])
def test_merge_unmerge_and_unload_keep_outputs(kind: str) -> None:
    torch.manual_seed(1)
    pm = Swift.prepare_model(tiny_llama(), CONFIGS[kind]())
    perturb(pm)
    before = out(pm)
    v_proj = pm.base_model.model.model.layers[0].self_attn.v_proj
    w = v_proj.get_base_layer().weight.detach().clone()
    Swift.merge(pm)
    assert not torch.equal(v_proj.get_base_layer().weight, w), "merge must fold the adapter into the weight"
    assert torch.allclose(out(pm), before, atol=1e-5)
    Swift.unmerge(pm)
    assert torch.allclose(v_proj.get_base_layer().weight, w, atol=1e-5)
    assert torch.allclose(out(pm), before, atol=1e-5)
    base = Swift.merge_and_unload(pm)
    assert not isinstance(base, peft.PeftModel)
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in base.modules())
    assert torch.allclose(out(base), before, atol=1e-5)


def test_merge_and_unload_adapter_name_reaches_peft() -> None:
    torch.manual_seed(1)
    pm = Swift.prepare_model(tiny_llama(), CONFIGS["ia3"]())
    pm.add_adapter("b", CONFIGS["ia3"]())
    perturb(pm)  # the active adapter ("default") only
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".ia3_l.b" in name:
                p.mul_(3.0)
    pm.set_adapter("b")
    want_b = out(pm)
    pm.set_adapter("default")
    assert not torch.allclose(out(pm), want_b, atol=1e-3)
    base = Swift.merge_and_unload(pm, adapter_name="b")  # not the active one
    assert torch.allclose(out(base), want_b, atol=1e-5)


def test_prompt_learning_has_no_merged_form() -> None:
    pm = Swift.prepare_model(tiny_llama(), CONFIGS["prompt"]())
    for op in (Swift.merge, Swift.unmerge, Swift.merge_and_unload):
        with pytest.raises(ConfigError, match="PROMPT_TUNING"):
            op(pm)


def test_several_adapters_and_renames_load_like_peft(tmp_path: Path) -> None:
    torch.manual_seed(1)
    pm = Swift.prepare_model(tiny_llama(), CONFIGS["loha"]())
    pm.add_adapter("b", CONFIGS["loha"]())
    pm.set_adapter("b")
    perturb(pm)  # b only
    pm.set_adapter("default")
    perturb(pm, seed=8)
    pm.save_pretrained(str(tmp_path))
    assert (tmp_path / "b" / ckpt.CONFIG_NAME).is_file()

    loaded = Swift.from_pretrained(tiny_llama(), str(tmp_path))
    ref = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    ref.load_adapter(str(tmp_path / "b"), adapter_name="b")
    assert set(loaded.peft_config) == {"default", "b"}
    for name in ("default", "b"):
        loaded.set_adapter(name)
        ref.set_adapter(name)
        pm.set_adapter(name)
        assert torch.equal(out(loaded), out(ref))
        assert torch.allclose(out(loaded), out(pm), atol=1e-6)

    renamed = Swift.from_pretrained(tiny_llama(), str(tmp_path), adapter_name={"b": "mine"})
    assert set(renamed.peft_config) == {"mine"}
    assert torch.equal(out(renamed), out(ref))  # ref is on "b"

    # into an existing PeftModel: added beside its adapter, as PeftModel.load_adapter does
    again = Swift.from_pretrained(renamed, str(tmp_path), adapter_name={"default": "other"})
    assert again is renamed and set(renamed.peft_config) == {"mine", "other"}
    renamed.set_adapter("other")
    ref.set_adapter("default")
    assert torch.equal(out(renamed), out(ref))
    with pytest.raises(AdapterNameError, match="mine"):
        Swift.from_pretrained(renamed, str(tmp_path), adapter_name={"b": "mine"})


def test_functuner_readers_load_peft_ia3_natively(tmp_path: Path) -> None:
    # IA3 is a native functuner tuner (issue #22): functuner's own readers take a PEFT IA3 directory as
    # TunerParams / a SwiftModel with PEFT's outputs, while Swift.from_pretrained keeps the seed's contract
    # (a PeftModel, test_prepare_and_load_match_peft).  (Before #22 these readers refused it by name.)
    folder, want = saved_peft(tmp_path, "ia3")
    found = ckpt.read_adapter_dir(folder)
    assert set(found) == {"default"}
    params = ft.load(folder, tiny_llama())
    assert type(params.config).__name__ == "IA3Config"
    base = tiny_llama()
    got = ft.apply(base, params, (X,)).logits
    assert torch.allclose(got, want, atol=1e-6)
    sm = SwiftModel.from_pretrained(tiny_llama(), str(folder))
    assert isinstance(sm, SwiftModel) and set(sm.adapters) == {"default"}
    assert torch.allclose(out(sm), want, atol=1e-6)


def test_swift_model_target_is_refused_unchanged(tmp_path: Path) -> None:
    folder, _ = saved_peft(tmp_path, "ia3")
    sm = Swift.prepare_model(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = fingerprint(sm)
    with pytest.raises(CheckpointError, match="SwiftModel cannot hold"):
        Swift.from_pretrained(sm, str(folder))
    assert same(fingerprint(sm), before) and set(sm.adapters) == {"default"}


def test_pickle_only_directory_loads_with_the_restricted_loader(tmp_path: Path) -> None:
    # PEFT (and SWIFT through PEFT) read adapter_model.bin with torch.load(weights_only=True); so does functuner,
    # with no opt-in (this test used to expect a refusal unless weights_only=True was passed)
    torch.manual_seed(1)
    pm = Swift.prepare_model(tiny_llama(), CONFIGS["ia3"]())
    perturb(pm)
    pm.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / ckpt.BIN_NAME).is_file() and not (tmp_path / ckpt.SAFETENSORS_NAME).exists()
    loaded = Swift.from_pretrained(tiny_llama(), str(tmp_path))
    assert torch.allclose(out(loaded), out(pm), atol=1e-6)
    loaded = Swift.from_pretrained(tiny_llama(), str(tmp_path), weights_only=True)
    assert torch.allclose(out(loaded), out(pm), atol=1e-6)
    # a payload needing more than the restricted loader is refused, naming the file, and nothing changes
    torch.save({"x": torch.ones(1), "y": Path("/")}, tmp_path / ckpt.BIN_NAME)
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(UnsafeCheckpointError, match=ckpt.BIN_NAME):
        Swift.from_pretrained(model, str(tmp_path))
    assert same(fingerprint(model), before)


def _rewrite(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / ckpt.SAFETENSORS_NAME))
    change(tensors)
    save_file(tensors, str(folder / ckpt.SAFETENSORS_NAME))


def test_nan_missing_key_or_wrong_model_change_nothing(tmp_path: Path) -> None:
    folder, _ = saved_peft(tmp_path, "ia3")
    first = next(iter(load_file(str(folder / ckpt.SAFETENSORS_NAME))))

    wrong = tiny_llama(intermediate_size=48)  # down_proj's IA3 vector has the wrong length
    before = fingerprint(wrong)
    # functuner's shape check refuses it before peft touches the model (peft's own "size mismatch" RuntimeError
    # came after it had injected layers; this test used to expect that one)
    with pytest.raises(ParamsMismatchError, match="down_proj"):
        Swift.from_pretrained(wrong, str(folder))
    assert same(fingerprint(wrong), before)

    nan_dir = tmp_path / "nan"
    shutil.copytree(folder, nan_dir)
    _rewrite(nan_dir, lambda t: t[first].fill_(float("nan")))
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(CheckpointError, match="NaN"):
        Swift.from_pretrained(model, str(nan_dir))
    assert same(fingerprint(model), before)

    _rewrite(folder, lambda t: t.pop(first))  # PEFT itself only warns and leaves that vector at its init
    with pytest.raises(CheckpointError, match="partly untrained"):
        Swift.from_pretrained(model, str(folder))
    assert same(fingerprint(model), before)

    # the same failure while adding to an existing PeftModel removes only the new adapter
    pm = Swift.prepare_model(tiny_llama(), CONFIGS["ia3"]())
    before = fingerprint(pm)
    with pytest.raises(CheckpointError, match="partly untrained"):
        Swift.from_pretrained(pm, str(folder), adapter_name={"default": "extra"})
    assert set(pm.peft_config) == {"default"} and same(fingerprint(pm), before)


def test_mixed_directory_is_refused_before_loading(tmp_path: Path) -> None:
    folder, _ = saved_peft(tmp_path, "ia3")
    lora = Swift.prepare_model(tiny_llama(), {"other": LoRAConfig(r=2, target_modules=["q_proj"])})
    lora.save_pretrained(str(folder))  # adds SWIFT's folder other/ beside PEFT's root adapter
    assert json.loads((folder / "other" / ckpt.CONFIG_NAME).read_text())["swift_type"] == "LORA"
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(CheckpointError, match="mixes PEFT adapters"):
        Swift.from_pretrained(model, str(folder))
    assert same(fingerprint(model), before)
    only_ia3 = Swift.from_pretrained(model, str(folder), adapter_name="default")  # choosing one type works
    assert isinstance(only_ia3, peft.PeftModel)
    only_lora = Swift.from_pretrained(tiny_llama(), str(folder), adapter_name="other")
    assert isinstance(only_lora, SwiftModel)


def test_peft_lora_directory_into_an_existing_peft_model_uses_load_adapter(tmp_path: Path) -> None:
    def lora() -> peft.LoraConfig:
        return peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    torch.manual_seed(1)
    saved = peft.get_peft_model(tiny_llama(), lora())
    saved.save_pretrained(str(tmp_path))
    torch.manual_seed(2)
    pm = peft.get_peft_model(tiny_llama(), lora())
    got = Swift.from_pretrained(pm, str(tmp_path), adapter_name={"default": "second"})
    assert got is pm and set(pm.peft_config) == {"default", "second"}
    pm.set_adapter("second")
    assert torch.equal(out(pm), out(saved))
    # a plain model gets a PeftModel too (the SWIFT contract; this used to assert a SwiftModel, which broke
    # code using PEFT's API on the result); SwiftModel.from_pretrained still reads it into functuner's own LoRA
    through_peft = Swift.from_pretrained(tiny_llama(), str(tmp_path))
    assert isinstance(through_peft, peft.PeftModel) and torch.equal(out(through_peft), out(saved))
    ours = SwiftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert isinstance(ours, SwiftModel) and torch.allclose(out(ours), out(saved), atol=1e-6)
