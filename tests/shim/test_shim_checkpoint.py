"""Checkpoints of the SWIFT shim: SWIFT-written fixtures, PEFT interop, layout, safety, atomicity, the hub.

Fixtures in tests/fixtures/swift/ were written once by the real ms-swift 4.6
(tests/fixtures/make_swift_fixtures.py); PEFT checks use the installed peft.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import functuner.io.checkpoint as ckpt
from functuner import LoRAConfig, Swift, SwiftConfig, SwiftModel
from functuner.errors import AdapterNameError, CheckpointError, UnsafeCheckpointError

sys.path.insert(0, str(Path(__file__).parents[1] / "swift_interop"))
from tiny_models import checksum, output_of  # noqa: E402

FIX = Path(__file__).parents[1] / "fixtures" / "swift"
BUILD = {"llama_two": tiny_llama, "bert_mts": tiny_bert, "bert_bias": tiny_bert, "gpt2_dora": tiny_gpt2}
NAMES = {"llama_two": ["default", "lora"], "bert_mts": ["default"], "bert_bias": ["default"], "gpt2_dora": ["adapter"]}
X = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _ref(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIX / f"{case}.ref.safetensors"))


def _out(m: torch.nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return output_of(m, x)


def _trained_llama(seed: int = 0) -> SwiftModel:
    torch.manual_seed(seed)
    return Swift.prepare_model(
        tiny_llama(),
        {
            "default": LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "second": LoRAConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"], init_lora_weights=False),
        },
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------
# checkpoints written by the real ms-swift
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(BUILD))
def test_swift_written_checkpoints_give_swift_outputs(case: str) -> None:
    ref = _ref(case)
    model = BUILD[case]()
    assert torch.equal(checksum(model), ref["base_checksum"])  # same base weights as in the SWIFT venv
    sm = Swift.from_pretrained(model, str(FIX / case))
    assert sm.active_adapters == set(NAMES[case]) and not sm.training
    x = ref["input_ids"]
    assert torch.allclose(_out(sm, x), ref["out_all"], atol=1e-6)
    for name in NAMES[case]:
        sm.set_active_adapters([name])
        assert torch.allclose(_out(sm, x), ref[f"out_{name}"], atol=1e-6), name


@pytest.mark.parametrize("rename", [{"lora": "my_lora"}, {"default": "adapter", "lora": "lora_x"}])
def test_rename_on_load_changes_only_the_adapter_component(rename: dict[str, str]) -> None:
    ref = _ref("llama_two")
    sm = Swift.from_pretrained(tiny_llama(), str(FIX / "llama_two"), adapter_name=rename)
    assert set(sm.adapters) == set(rename.values())
    for old, new in rename.items():
        names = [n for n, _ in sm.named_parameters() if f".{new}" in n]
        assert names and all(n.count(new) == 1 for n in names)
        sm.set_active_adapters([new])
        assert torch.allclose(_out(sm, ref["input_ids"]), ref[f"out_{old}"], atol=1e-6)


def test_our_layout_matches_swift_layout() -> None:
    torch.manual_seed(0)
    sm = Swift.prepare_model(tiny_llama(), LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        sm.save_pretrained(d)
        ours, theirs = Path(d), FIX / "llama_two"
        assert sorted(p.name for p in ours.iterdir()) == ["configuration.json", "default"]
        assert (ours / "configuration.json").read_text() == (theirs / "configuration.json").read_text()
        mine = load_file(str(ours / "default" / "adapter_model.safetensors"))
        swift = load_file(str(theirs / "default" / "adapter_model.safetensors"))
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in swift.items()}
        cfg_ours = json.loads((ours / "default" / "adapter_config.json").read_text())
        cfg_swift = json.loads((theirs / "default" / "adapter_config.json").read_text())
        common = (set(cfg_ours) & set(cfg_swift)) - {"lorap_lr_ratio", "init_lora_weights"}
        assert {"swift_type", "r", "target_modules", "lora_alpha", "use_dora"} <= common

        def norm(v):  # peft stores target_modules as a set, so SWIFT's list order is arbitrary
            return sorted(v) if isinstance(v, list) else v

        assert {k: norm(cfg_ours[k]) for k in common} == {k: norm(cfg_swift[k]) for k in common}


# ---------------------------------------------------------------------------
# round trips in functuner
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("form", [None, "default", ["second"], {"second": "renamed"}])
def test_save_then_from_pretrained_each_adapter_name_form(tmp_path: Path, form) -> None:
    sm = _trained_llama()
    sm.save_pretrained(tmp_path)
    expected = {}
    for n in ("default", "second"):
        sm.set_active_adapters([n])
        expected[n] = _out(sm)
    loaded = Swift.from_pretrained(tiny_llama(), str(tmp_path), adapter_name=form)
    if form is None:
        pairs = {"default": "default", "second": "second"}
    elif isinstance(form, str):
        pairs = {form: form}
    elif isinstance(form, list):
        pairs = {n: n for n in form}
    else:
        pairs = dict(form)
    assert set(loaded.adapters) == set(pairs.values())
    for disk, new in pairs.items():
        loaded.set_active_adapters([new])
        assert torch.equal(_out(loaded), expected[disk])


@settings(max_examples=6, deadline=None)
@given(
    r=st.integers(1, 6),
    alpha=st.sampled_from([1, 4, 16]),
    rslora=st.booleans(),
    dora=st.booleans(),
    targets=st.sampled_from([["q_proj"], ["k_proj", "up_proj"], ["embed_tokens", "v_proj"]]),
)
def test_roundtrip_property(r: int, alpha: int, rslora: bool, dora: bool, targets: list[str]) -> None:
    import tempfile

    torch.manual_seed(r)
    dora = dora and "embed_tokens" not in targets
    cfg = LoRAConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=dora, target_modules=targets, init_lora_weights=False
    )
    sm = Swift.prepare_model(tiny_llama(), {"adapter-1": cfg})
    with tempfile.TemporaryDirectory() as d:
        sm.save_pretrained(d)
        back = Swift.from_pretrained(tiny_llama(), d)
    assert back.adapters["adapter-1"].config == cfg
    for k, v in sm.adapters["adapter-1"].tensors.items():
        assert torch.equal(back.adapters["adapter-1"].tensors[k], v)
    assert torch.equal(_out(back), _out(sm))


def test_extra_states_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]), extra_state_keys=[r"model\.norm\.weight"]
    )
    with torch.no_grad():
        sm.model.model.norm.weight.add_(0.5)
    sm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "extra_states" / "adapter_config.json").read_text()) == {
        "extra_state_keys": [r"model\.norm\.weight"]
    }
    assert set(load_file(str(tmp_path / "extra_states" / "adapter_model.safetensors"))) == {"model.norm.weight"}
    back = Swift.from_pretrained(tiny_llama(), str(tmp_path))
    assert torch.equal(back.model.model.norm.weight, sm.model.model.norm.weight)
    assert torch.equal(_out(back), _out(sm))
    with pytest.raises(CheckpointError, match="extra_states"):
        Swift.save_to_peft_format(str(tmp_path), str(tmp_path / "peft"))
    assert not (tmp_path / "peft").exists()


# ---------------------------------------------------------------------------
# PEFT interop
# ---------------------------------------------------------------------------
def _peft_outputs(out_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(out_dir))
    for n in names:
        if n != "default":
            pm.load_adapter(str(out_dir / n), n)
    res = {}
    for n in names:
        pm.base_model.set_adapter(n)
        res[n] = _out(pm)
    pm.base_model.set_adapter(names)
    res["all"] = _out(pm)
    return res


def test_save_to_peft_format_loads_in_real_peft(tmp_path: Path) -> None:
    sm = _trained_llama()
    sm.save_pretrained(tmp_path / "swift")
    Swift.save_to_peft_format(str(tmp_path / "swift"), str(tmp_path / "peft"))
    out = tmp_path / "peft"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "configuration.json",
        "second",
    ]
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "swift_type" not in json.loads((out / "adapter_config.json").read_text())
    got = _peft_outputs(out, ["default", "second"])
    for n in ("default", "second"):
        sm.set_active_adapters([n])
        assert torch.allclose(got[n], _out(sm), atol=1e-6), n
    sm.set_active_adapters(["default", "second"])
    assert torch.allclose(got["all"], _out(sm), atol=1e-6)
    # converting again, or converting the converted folder in place, gives the same bytes
    first = _files(out)
    Swift.save_to_peft_format(str(tmp_path / "swift"), str(out))
    assert _files(out) == first
    Swift.save_to_peft_format(str(out), str(out))
    assert _files(out) == first
    shutil.copytree(tmp_path / "swift", tmp_path / "inplace")
    Swift.save_to_peft_format(str(tmp_path / "inplace"), str(tmp_path / "inplace"))
    assert _files(tmp_path / "inplace") == first


def test_save_pretrained_peft_format_loads_in_real_peft(tmp_path: Path) -> None:
    sm = _trained_llama()
    sm.save_pretrained(tmp_path, peft_format=True)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "second" / "adapter_config.json").is_file()
    got = _peft_outputs(tmp_path, ["default", "second"])
    sm.set_active_adapters(["default", "second"])
    assert torch.allclose(got["all"], _out(sm), atol=1e-6)


def test_swift_written_fixture_converts_for_peft(tmp_path: Path) -> None:
    ref = _ref("llama_two")
    Swift.save_to_peft_format(str(FIX / "llama_two"), str(tmp_path / "p"))
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "p"))
    pm.load_adapter(str(tmp_path / "p" / "lora"), "lora")
    for n in ("default", "lora"):
        pm.base_model.set_adapter(n)
        assert torch.allclose(_out(pm, ref["input_ids"]), ref[f"out_{n}"], atol=1e-6), n


def test_save_to_peft_format_refuses_what_peft_cannot_hold(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # lora_dtype='fp32' is PEFT's default autocast (kept, see tests/quant); bf16 adapters have no PEFT counterpart
    sm = Swift.prepare_model(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"], lora_dtype="bf16"))
    sm.save_pretrained(tmp_path / "a")
    with pytest.raises(CheckpointError, match="lora_dtype"):
        Swift.save_to_peft_format(str(tmp_path / "a"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    before = _files(tmp_path / "a")
    with pytest.raises(CheckpointError, match="lora_dtype"):
        Swift.save_to_peft_format(str(tmp_path / "a"), str(tmp_path / "a"))
    assert _files(tmp_path / "a") == before
    # a non-LoRA tuner type
    other = tmp_path / "b" / "default"
    other.mkdir(parents=True)
    (other / "adapter_config.json").write_text(json.dumps({"swift_type": "PROMPT", "dim": 32}))
    with pytest.raises(CheckpointError):
        Swift.save_to_peft_format(str(tmp_path / "b"), str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()


def test_peft_saved_adapters_load_into_functuner(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.add_adapter("emb", peft.LoraConfig(r=2, target_modules=["embed_tokens", "o_proj"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path))
    want = {}
    for n in ("default", "emb"):
        pm.base_model.set_adapter(n)
        want[n] = _out(pm)
    # Swift.from_pretrained on a PEFT directory goes through peft and returns a PeftModel, as SWIFT does
    # (this test used to assert a SwiftModel here, which broke code using PEFT's API on the result)
    loaded = Swift.from_pretrained(tiny_llama(), str(tmp_path))
    assert isinstance(loaded, peft.PeftModel) and set(loaded.peft_config) == {"default", "emb"}
    for n in ("default", "emb"):
        loaded.base_model.set_adapter(n)
        assert torch.allclose(_out(loaded), want[n], atol=1e-6), n
    # SwiftModel.from_pretrained (functuner's own reader) still loads the same directory into a SwiftModel
    sm = SwiftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert set(sm.adapters) == {"default", "emb"}
    for n in ("default", "emb"):
        sm.set_active_adapters([n])
        assert torch.allclose(_out(sm), want[n], atol=1e-6), n


# ---------------------------------------------------------------------------
# safety
# ---------------------------------------------------------------------------
class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/functuner_pwned_marker",))


def test_bin_is_read_only_with_the_restricted_loader(tmp_path: Path) -> None:
    sm = _trained_llama()
    sm.save_pretrained(tmp_path)
    folder = tmp_path / "default"
    torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    # a tensor-only .bin loads without an opt-in, through torch.load(weights_only=True) (as SWIFT/PEFT read it);
    # this used to be refused unless weights_only=True was passed
    loaded = Swift.from_pretrained(tiny_llama(), str(tmp_path))
    assert torch.equal(_out(loaded), _out(sm))
    loaded = Swift.from_pretrained(tiny_llama(), str(tmp_path), weights_only=True)
    assert torch.equal(_out(loaded), _out(sm))
    torch.save({"x": _Boom()}, folder / "adapter_model.bin")
    if os.path.exists("/tmp/functuner_pwned_marker"):
        os.unlink("/tmp/functuner_pwned_marker")
    for kw in ({}, {"weights_only": True}):  # a payload the restricted loader refuses is refused, never run
        with pytest.raises(UnsafeCheckpointError, match="adapter_model.bin"):
            Swift.from_pretrained(tiny_llama(), str(tmp_path), **kw)
    assert not os.path.exists("/tmp/functuner_pwned_marker")
    torch.save([torch.ones(2)], folder / "adapter_model.bin")  # loadable by the restricted loader, but no dict
    with pytest.raises(UnsafeCheckpointError, match="plain dict of tensors"):
        Swift.from_pretrained(tiny_llama(), str(tmp_path))


def test_names_and_links_that_escape_are_refused(tmp_path: Path) -> None:
    sm = _trained_llama()
    sm.save_pretrained(tmp_path / "ck")
    with pytest.raises(AdapterNameError):
        Swift.from_pretrained(tiny_llama(), str(tmp_path / "ck"), adapter_name={"default": "../evil"})
    with pytest.raises(AdapterNameError):
        sm.save_pretrained(tmp_path / "x", adapter_name="../default")
    assert not (tmp_path / "x").exists()
    # an adapter folder whose weights are a symlink to a file outside the checkpoint
    outside = tmp_path / "outside.safetensors"
    shutil.copy(tmp_path / "ck" / "second" / "adapter_model.safetensors", outside)
    (tmp_path / "ck" / "second" / "adapter_model.safetensors").unlink()
    (tmp_path / "ck" / "second" / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        Swift.from_pretrained(tiny_llama(), str(tmp_path / "ck"))
    # saving through a symlinked adapter folder is refused
    (tmp_path / "target").mkdir()
    (tmp_path / "ck2").mkdir()
    (tmp_path / "ck2" / "default").symlink_to(tmp_path / "target")
    with pytest.raises(CheckpointError, match="symlink"):
        sm.save_pretrained(tmp_path / "ck2")
    assert list((tmp_path / "target").iterdir()) == []


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sm = _trained_llama()
    sm.save_pretrained(tmp_path)
    before = _files(tmp_path)
    with torch.no_grad():
        for p in sm.adapters["default"].tensors.values():
            p.add_(1.0)

    real = ckpt._save_tensors

    def half_then_crash(state, path):  # functuner's own writer: write a truncated file, then die
        real(state, path)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(ckpt, "_save_tensors", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        sm.save_pretrained(tmp_path)
    assert _files(tmp_path) == before  # no temp folders left, old adapter intact
    monkeypatch.setattr(ckpt, "_save_tensors", real)
    sm.save_pretrained(tmp_path)
    assert _files(tmp_path) != before
    assert torch.equal(_out(Swift.from_pretrained(tiny_llama(), str(tmp_path))), _out(sm))


def test_bad_checkpoints_give_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        Swift.save_to_peft_format(str(tmp_path / "missing"), str(tmp_path / "o"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        Swift.from_pretrained(tiny_llama(), str(tmp_path / "file"))
    bad = tmp_path / "bad" / "default"
    bad.mkdir(parents=True)
    (bad / "adapter_config.json").write_text(
        json.dumps({"swift_type": "LORA", "r": 2, "target_modules": ["q_proj"], "mystery_field": 3})
    )
    with pytest.raises(CheckpointError, match="mystery_field"):
        Swift.from_pretrained(tiny_llama(), str(tmp_path / "bad"))
    with pytest.raises(CheckpointError, match="no adapter"):
        Swift.from_pretrained(tiny_llama(), str(FIX / "llama_two"), adapter_name=["nope"])


# ---------------------------------------------------------------------------
# configs and the hub
# ---------------------------------------------------------------------------
def test_swift_config_save_and_from_pretrained(tmp_path: Path) -> None:
    cfg = SwiftConfig.from_pretrained(str(FIX / "llama_two" / "lora"))  # written by ms-swift, with its extra fields
    assert isinstance(cfg, LoRAConfig) and isinstance(cfg, SwiftConfig)
    assert cfg.r == 2 and set(cfg.target_modules) == {"embed_tokens", "down_proj"} and cfg.lorap_lr_ratio == 16.0
    cfg.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["swift_type"] == "LORA"
    assert LoRAConfig.from_pretrained(str(tmp_path)) == cfg


def test_hub_id_resolves_through_modelscope_cache(tmp_path: Path) -> None:
    sm = _trained_llama()
    snap = tmp_path / "cache" / "models" / "someone--tiny-lora" / "snapshots" / "master"
    sm.save_pretrained(snap)
    loaded = Swift.from_pretrained(
        tiny_llama(), "someone/tiny-lora", cache_dir=str(tmp_path / "cache"), local_files_only=True
    )
    assert torch.equal(_out(loaded), _out(sm))
    with pytest.raises(CheckpointError, match="someone/absent"):
        Swift.from_pretrained(tiny_llama(), "someone/absent", cache_dir=str(tmp_path / "cache"), local_files_only=True)


@pytest.mark.parametrize("adapter_name", ["default", "a"])
def test_load_state_dict_takes_functional_params_with_modules_to_save(adapter_name: str) -> None:
    # params.state_dict() holds `<module>.modules_to_save.<adapter>.<param>`: loaded as is, never renamed twice
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("lin0", torch.nn.Linear(4, 4))
    model.add_module("lin1", torch.nn.Linear(4, 2))
    cfg = LoRAConfig(r=2, target_modules=["lin0"], modules_to_save=["lin1"], init_lora_weights=False)
    import functuner as ft

    params = ft.init(model, cfg, generator=0, adapter_name=adapter_name).map(lambda t: t + 0.1)
    x = torch.ones(1, 4)
    want = ft.apply(model, params, (x,))
    sm = Swift.prepare_model(model, {adapter_name: cfg})
    sm.load_state_dict(params.state_dict(), adapter_name=adapter_name)
    assert torch.equal(sm(x), want)
