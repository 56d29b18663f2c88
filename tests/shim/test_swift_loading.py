"""``Swift.from_pretrained`` / ``save_pretrained`` / adapter switching with ms-swift 4.6's behaviour.

What SWIFT does was read from ms-swift 4.6's ``swift/tuners/base.py`` and run in its own venv
(``tests/fixtures/tuner_reverse_interop.py check`` repeats these scenarios there in CI):

* ``SwiftModel.from_pretrained`` (and ``Swift.from_pretrained`` on a SWIFT directory) leaves the loaded
  adapters trainable; ``inference_mode`` (default ``True``) only calls ``eval()``; ``is_trainable=True``
  (ms-swift's resume code passes it) is accepted;
* a PEFT directory (no ``swift_type``) goes through ``peft.PeftModel.from_pretrained`` and a ``PeftModel``
  comes back; a ``PeftConfig`` given to ``Swift.prepare_model`` goes through ``peft.get_peft_model``;
* ``set_active_adapters`` / ``activate_adapter`` / ``deactivate_adapter`` ignore names that are not loaded;
* ``save_pretrained(safe_serialization=False)`` writes ``torch.save`` of a plain dict of tensors as
  ``adapter_model.bin``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

import functuner.io.checkpoint as ckpt
from functuner import LoRAConfig, Swift, SwiftModel
from functuner.errors import AdapterNameError, CheckpointError, ParamsMismatchError, UnsafeCheckpointError

X = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def _out(m: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(X).logits


def _fingerprint(m: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    return {n: (p.detach().clone(), p.requires_grad) for n, p in m.named_parameters()}


def _same(a: dict[str, tuple[torch.Tensor, bool]], b: dict[str, tuple[torch.Tensor, bool]]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)


def _swift_dir(tmp_path: Path) -> tuple[SwiftModel, Path]:
    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(), {"default": LoRAConfig(**LORA), "b": LoRAConfig(r=2, target_modules=["o_proj"], bias="all")}
    )
    sm.save_pretrained(tmp_path / "swift")
    return sm, tmp_path / "swift"


def _peft_dir(tmp_path: Path) -> tuple[peft.PeftModel, Path]:
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**LORA))
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "peft"))
    return pm, tmp_path / "peft"


def _trainable(m: torch.nn.Module) -> set[str]:
    return {n for n, p in m.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------
# loading keywords: is_trainable, inference_mode, revision, adapter_name forms
# ---------------------------------------------------------------------------
def test_loaded_adapters_are_trainable_and_inference_mode_is_eval(tmp_path: Path) -> None:
    sm, d = _swift_dir(tmp_path)
    lora = {n for n in _trainable(sm) if ".lora_" in n}
    for kw in ({}, {"is_trainable": True}, {"inference_mode": True}, {"revision": None}):
        loaded = Swift.from_pretrained(tiny_llama(), str(d), **kw)
        assert isinstance(loaded, SwiftModel) and not loaded.training, kw
        assert _trainable(loaded) == lora, kw  # as SWIFT: adapters trainable, base (and LoRA biases) frozen
        assert torch.equal(_out(loaded), _out(sm))
    resumed = Swift.from_pretrained(tiny_llama(), str(d), inference_mode=False, is_trainable=True)
    assert resumed.training and _trainable(resumed) == _trainable(sm)  # biases marked trainable too, as SWIFT
    frozen = Swift.from_pretrained(tiny_llama(), str(d), is_trainable=False)
    assert not _trainable(frozen)  # an explicit is_trainable=False is honoured (SWIFT ignores it)


def test_adapter_name_forms(tmp_path: Path) -> None:
    sm, d = _swift_dir(tmp_path)
    assert set(Swift.from_pretrained(tiny_llama(), str(d), adapter_name="b").adapters) == {"b"}
    assert set(Swift.from_pretrained(tiny_llama(), str(d), adapter_name=["default", "b"]).adapters) == {"default", "b"}
    renamed = Swift.from_pretrained(tiny_llama(), str(d), adapter_name={"b": "mine"})
    assert set(renamed.adapters) == {"mine"}
    sm.set_active_adapters(["b"])
    assert torch.equal(_out(renamed), _out(sm))
    with pytest.raises(CheckpointError, match="nope"):
        Swift.from_pretrained(tiny_llama(), str(d), adapter_name="nope")


# ---------------------------------------------------------------------------
# PEFT directories and configs: through peft, a PeftModel back, functuner's checks first
# ---------------------------------------------------------------------------
def test_peft_lora_directory_returns_a_peft_model(tmp_path: Path) -> None:
    pm, d = _peft_dir(tmp_path)
    ref = peft.PeftModel.from_pretrained(tiny_llama(), str(d))
    loaded = Swift.from_pretrained(tiny_llama(), str(d), adapter_name="default")
    assert isinstance(loaded, peft.PeftModel) and set(loaded.peft_config) == {"default"}
    assert torch.equal(_out(loaded), _out(ref)) and torch.allclose(_out(loaded), _out(pm), atol=1e-6)
    assert not _trainable(loaded)  # peft's default, is_trainable=False
    resumed = Swift.from_pretrained(tiny_llama(), str(d), adapter_name="default", is_trainable=True)
    assert _trainable(resumed) == {n for n in _trainable(pm) if ".default." in n}
    both = Swift.from_pretrained(tiny_llama(), str(d), adapter_name={"default": "x", "b": "y"})
    assert isinstance(both, peft.PeftModel) and set(both.peft_config) == {"x", "y"}


def test_peft_config_goes_through_peft() -> None:
    torch.manual_seed(0)
    pm = Swift.prepare_model(tiny_llama(), peft.LoraConfig(**LORA))
    torch.manual_seed(0)
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**LORA))
    assert isinstance(pm, peft.PeftModel) and torch.equal(_out(pm), _out(ref))
    assert _trainable(pm) == _trainable(ref)


def _rewrite(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(folder / ckpt.SAFETENSORS_NAME))
    change(tensors)
    save_file(tensors, str(folder / ckpt.SAFETENSORS_NAME))


def test_peft_directory_checks_run_before_peft_and_change_nothing(tmp_path: Path) -> None:
    _, d = _peft_dir(tmp_path)
    key = next(k for k in load_file(str(d / ckpt.SAFETENSORS_NAME)) if "lora_A" in k)
    cases = {}
    nan = tmp_path / "nan"
    shutil.copytree(d, nan)
    _rewrite(nan, lambda t: t[key].fill_(float("nan")))
    cases["nan"] = (nan, CheckpointError, "NaN")
    shape = tmp_path / "shape"
    shutil.copytree(d, shape)
    _rewrite(shape, lambda t: t.__setitem__(key, torch.zeros(4, 5)))
    cases["shape"] = (shape, ParamsMismatchError, "q_proj")
    model = tiny_llama()
    for name, (folder, err, match) in cases.items():
        before = _fingerprint(model)
        with pytest.raises(err, match=match):
            Swift.from_pretrained(model, str(folder), adapter_name="default")
        assert _same(_fingerprint(model), before), name
        assert not any("lora" in n for n, _ in model.named_modules()), name
    wrong = tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)  # every shape differs
    before = _fingerprint(wrong)
    with pytest.raises(ParamsMismatchError, match="shape"):
        Swift.from_pretrained(wrong, str(d), adapter_name="default")
    assert _same(_fingerprint(wrong), before)


def test_peft_directory_with_a_huge_rank_is_refused_before_allocating(tmp_path: Path) -> None:
    _, d = _peft_dir(tmp_path)
    cfg = (d / ckpt.CONFIG_NAME).read_text().replace('"r": 4', '"r": 1000000000')
    (d / ckpt.CONFIG_NAME).write_text(cfg)
    model = tiny_llama()
    before = _fingerprint(model)
    with pytest.raises(CheckpointError, match="rank|r="):
        Swift.from_pretrained(model, str(d), adapter_name="default")
    assert _same(_fingerprint(model), before)


# ---------------------------------------------------------------------------
# .bin: written as SWIFT does with safe_serialization=False, read only with the restricted loader
# ---------------------------------------------------------------------------
def test_safe_serialization_false_writes_a_tensor_only_bin(tmp_path: Path) -> None:
    sm, _ = _swift_dir(tmp_path)
    sm.extra_state_keys  # noqa: B018 - none here; extra states covered in test_shim_checkpoint
    out = tmp_path / "bin"
    sm.save_pretrained(out)  # a safetensors checkpoint first: re-saving as .bin leaves no stale safetensors
    with pytest.warns(UserWarning, match="safetensors"):
        sm.save_pretrained(out, safe_serialization=False)
    for name in ("default", "b"):
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == [ckpt.CONFIG_NAME, ckpt.BIN_NAME]
        data = torch.load(folder / ckpt.BIN_NAME, weights_only=True)
        assert type(data) is dict and all(type(v) is torch.Tensor for v in data.values())
        assert data.keys() == {k for k in sm.state_dict(adapter_name=name)}
        assert all(torch.equal(data[k], v) for k, v in sm.state_dict(adapter_name=name).items())
    loaded = Swift.from_pretrained(tiny_llama(), str(out))
    assert torch.equal(_out(loaded), _out(sm))
    with pytest.warns(UserWarning, match="safetensors"):
        sm.save_pretrained(tmp_path / "peft_bin", adapter_name="default", safe_serialization=False, peft_format=True)
    assert sorted(p.name for p in (tmp_path / "peft_bin").iterdir()) == [
        ckpt.CONFIG_NAME,
        ckpt.BIN_NAME,
        "configuration.json",
    ]
    ref = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft_bin"))  # PEFT reads it
    sm.set_active_adapters(["default"])
    assert torch.allclose(_out(ref), _out(sm), atol=1e-6)


def test_bin_with_anything_but_tensors_is_refused(tmp_path: Path) -> None:
    sm, d = _swift_dir(tmp_path)
    folder = d / "default"
    tensors = load_file(str(folder / ckpt.SAFETENSORS_NAME))
    (folder / ckpt.SAFETENSORS_NAME).unlink()
    for payload in ({**tensors, "meta": {"step": 1}}, {**tensors, "p": Path("/")}, list(tensors.values())):
        torch.save(payload, folder / ckpt.BIN_NAME)
        model = tiny_llama()
        before = _fingerprint(model)
        with pytest.raises(UnsafeCheckpointError, match=str(folder / ckpt.BIN_NAME)):
            Swift.from_pretrained(model, str(d))
        with pytest.raises(UnsafeCheckpointError, match=ckpt.BIN_NAME):
            ckpt.load(d, adapter_name="default")
        assert _same(_fingerprint(model), before)


# ---------------------------------------------------------------------------
# unknown adapter names: warn and ignore (SWIFT), or raise with strict=True
# ---------------------------------------------------------------------------
def test_unknown_adapter_names_warn_and_are_ignored(tmp_path: Path) -> None:
    sm, _ = _swift_dir(tmp_path)
    with pytest.warns(UserWarning, match=r"unknown adapter\(s\) \['nope'\]"):
        sm.set_active_adapters(["default", "nope"])
    assert sm.active_adapters == {"default"}
    with pytest.warns(UserWarning, match="nope"):
        sm.deactivate_adapter("nope")
    with pytest.warns(UserWarning, match="nope"):
        sm.activate_adapter("nope")
    assert sm.active_adapters == {"default"}
    for call in (
        lambda: sm.set_active_adapters(["b", "nope"], strict=True),
        lambda: sm.activate_adapter("nope", strict=True),
        lambda: sm.deactivate_adapter("nope", strict=True),
    ):
        with pytest.raises(AdapterNameError, match="nope"):
            call()
    assert sm.active_adapters == {"default"}  # strict refusals change nothing
    with pytest.raises(AdapterNameError):  # PEFT's set_adapter keeps PEFT's error
        sm.set_adapter("nope")


def test_neftune_alone_saves_the_whole_model_as_swift(tmp_path: Path) -> None:
    # SWIFT: a SwiftModel whose adapters have no modules of their own (NEFTune) trains the model itself, so
    # save_pretrained writes the wrapped model with its own save_pretrained beside the adapter configs
    import transformers

    from functuner import NEFTuneConfig

    sm = Swift.prepare_model(tiny_llama(), NEFTuneConfig(noise_alpha=5.0))
    assert all(p.requires_grad for p in sm.parameters())
    with torch.no_grad():
        sm.model.model.norm.weight.add_(1.0)  # "trained"
    sm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "default" / ckpt.CONFIG_NAME).is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert torch.equal(reloaded.model.norm.weight, sm.model.model.norm.weight)
    again = Swift.from_pretrained(reloaded, str(tmp_path))
    assert set(again.adapters) == {"default"} and again.adapters["default"].swift_type.lower() == "neftune"
