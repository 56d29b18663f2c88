"""``functuner.save`` / ``functuner.load`` and the disk layer underneath, against the real shim and real ``peft``.

* SWIFT layout: ``save`` writes exactly what ``SwiftModel.save_pretrained``
  writes for one adapter (same files, keys, tensors, config); ``load`` reads it
  back equal, for LoRA and for SWIFT-only tuners (Adapter, Part).
* PEFT layout: ``save(format="peft")`` loads in ``peft.PeftModel.from_pretrained``
  with the same outputs as ``apply``; ``load`` reads PEFT's own save.
* Refusals: no PEFT format (nothing written), a model the adapter does not
  fit, several adapters without a name, a bad format name.
* :func:`functuner.io.keys.to_disk` / ``from_disk`` are inverse (property).
* Modes follow the umask; a SIGKILL at any moment of a directory swap leaves
  the old or the new directory, complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import functuner as ft
from functuner import Swift
from functuner.errors import CheckpointError, ParamsMismatchError
from functuner.io import keys
from functuner.tuners.adapter import AdapterConfig
from functuner.tuners.part import PartConfig

X = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _trained(params: ft.TunerParams) -> ft.TunerParams:
    g = torch.Generator().manual_seed(11)
    return params.map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype))


CASES = {
    "lora": lambda m: ft.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "adapter": lambda m: AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=4),
    "part": lambda m: PartConfig(target_modules=r"model\.layers\.0\.self_attn\.q_proj"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["default", "mine"])
def test_swift_layout_is_save_pretrained_and_round_trips(case: str, name: str, tmp_path: Path) -> None:
    model = tiny_llama()
    cfg = CASES[case](model)
    params = _trained(ft.init(model, cfg, generator=0, adapter_name=name))
    out = ft.save(params, tmp_path / "ours")
    assert out == tmp_path / "ours"
    sm = Swift.prepare_model(tiny_llama(), {name: cfg})
    sm.load_state_dict(keys.to_disk(params, cfg, name, "swift"), adapter_name=name)
    sm.save_pretrained(str(tmp_path / "shim"))
    ours, shim = _files(tmp_path / "ours"), _files(tmp_path / "shim")
    assert ours.keys() == shim.keys()
    assert json.loads(ours[f"{name}/adapter_config.json"]) == json.loads(shim[f"{name}/adapter_config.json"])
    a = load_file(tmp_path / "ours" / name / "adapter_model.safetensors")
    b = load_file(tmp_path / "shim" / name / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = ft.load(tmp_path / "ours", model)
    assert back.adapter_name == name and back.config == cfg
    assert back.keys() == params.keys() and all(torch.equal(back[k], params[k]) for k in params)
    # the adapter's own folder loads too, under its folder's name
    assert ft.load(tmp_path / "ours" / name).adapter_name == name
    with torch.no_grad():
        torch.testing.assert_close(ft.apply(model, back, (X,)).logits, sm(X).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["default", "other"])
def test_peft_layout_loads_in_peft_with_equal_outputs(name: str, tmp_path: Path) -> None:
    model = tiny_bert(num_labels=3)
    cfg = ft.LoRAConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    params = _trained(ft.init(model, cfg, generator=0, adapter_name=name))
    ft.save(params, tmp_path, format="peft")
    folder = tmp_path if name == "default" else tmp_path / name
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(tiny_bert(num_labels=3), str(folder), adapter_name=name).eval()
    with torch.no_grad():
        ours = ft.apply(model, params, kwargs={"input_ids": X}).logits
        torch.testing.assert_close(pm(input_ids=X).logits, ours, atol=1e-6, rtol=0)
    back = ft.load(tmp_path, model, adapter_name=name)
    assert back.keys() == params.keys() and all(torch.equal(back[k], params[k]) for k in params)
    # and PEFT's own save of that model reads back to the same params
    pm.save_pretrained(str(tmp_path / "by_peft"))
    again = ft.load(tmp_path / "by_peft", model, adapter_name=name)
    assert all(torch.equal(again[k], params[k]) for k in params)


def test_refusals_write_nothing(tmp_path: Path) -> None:
    model = tiny_llama()
    adapter = ft.init(model, CASES["adapter"](model), generator=0)
    with pytest.raises(CheckpointError, match="ADAPTER adapters have no PEFT format"):
        ft.save(adapter, tmp_path / "p", format="peft")
    with pytest.raises(CheckpointError, match="format='onnx'"):
        ft.save(adapter, tmp_path / "p", format="onnx")
    assert list(tmp_path.iterdir()) == []
    ft.save(adapter, tmp_path / "two")
    ft.save(ft.init(model, CASES["lora"](model), generator=0, adapter_name="lora"), tmp_path / "two")
    with pytest.raises(CheckpointError, match="choose one with adapter_name"):
        ft.load(tmp_path / "two")
    assert ft.load(tmp_path / "two", adapter_name="lora").config == CASES["lora"](model)
    with pytest.raises(CheckpointError, match="no adapter 'nope'"):
        ft.load(tmp_path / "two", adapter_name="nope")
    with pytest.raises(ParamsMismatchError):  # hidden size 48: the saved adapter does not fit
        ft.load(tmp_path / "two", tiny_llama(hidden_size=48), adapter_name="lora")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        ft.load(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="neither a SWIFT nor a PEFT"):
        ft.load(tmp_path)


def test_modes_follow_the_umask(tmp_path: Path) -> None:
    model = tiny_llama()
    params = ft.init(model, CASES["lora"](model), generator=0)
    old = os.umask(0o022)
    try:
        ft.save(params, tmp_path / "s")
        ft.save(params, tmp_path / "p", format="peft")
    finally:
        os.umask(old)
    for root in (tmp_path / "s", tmp_path / "p"):
        for p in [root, *root.rglob("*")]:
            assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p


_module = st.lists(st.sampled_from(["a", "b", "enc", "layer", "0", "1", "proj"]), min_size=1, max_size=3).map(".".join)


@settings(max_examples=30, deadline=None)
@given(
    modules=st.lists(_module, min_size=1, max_size=3, unique=True),
    name=st.sampled_from(["default", "x", "lora", "a-b"]),
    fmt=st.sampled_from(["swift", "peft"]),
    bias=st.booleans(),
    saved=st.booleans(),
)
def test_to_disk_and_from_disk_are_inverse(modules: list[str], name: str, fmt: str, bias: bool, saved: bool) -> None:
    mods = [f"m.{m}.q" for m in modules]
    state: dict[str, torch.Tensor] = {}
    for m in mods:
        state[f"{m}.lora_A.{name}.weight"] = torch.zeros(2, 3)
        state[f"{m}.lora_B.{name}.weight"] = torch.zeros(3, 2)
        if bias:
            state[f"{m}.bias"] = torch.zeros(3)
    if saved:
        state[f"head.modules_to_save.{name}.weight"] = torch.zeros(1)
    cfg = ft.LoRAConfig(r=2, target_modules=["q"], modules_to_save=["head"] if saved else None)
    disk = keys.to_disk(state, cfg, name, fmt)
    assert len(disk) == len(state)
    assert all(k.startswith(keys.PEFT_PREFIX) == (fmt == "peft") for k in disk)
    back = keys.from_disk(disk, cfg, name, fmt)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)


_SWAPPER = """
import sys, time
from pathlib import Path
from functuner.core.fs import atomic_dir
target, i = Path(sys.argv[1]), 0
while True:
    i += 1
    tag = "AB"[i % 2]
    with atomic_dir(target) as tmp:
        for j in range(20):
            (tmp / f"f{j}").write_text(tag * 1000)
"""


def test_sigkill_during_directory_swaps_leaves_old_or_new(tmp_path: Path) -> None:
    target = tmp_path / "ck"
    target.mkdir()
    for j in range(20):
        (target / f"f{j}").write_text("A" * 1000)
    rng = torch.Generator().manual_seed(0)
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(target)])
        time.sleep(0.3 + float(torch.rand(1, generator=rng)) * 0.4)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        contents = {p.read_text() for p in target.iterdir()}
        assert len(list(target.iterdir())) == 20 and contents in ({"A" * 1000}, {"B" * 1000}), contents


def test_load_extra_states_gives_the_functional_api_what_the_shim_writes_into_the_model(tmp_path: Path) -> None:
    """``functuner.load_extra_states``: SWIFT's ``extra_states/`` as a checked dict; params + extra states = the shim."""
    from safetensors.torch import save_file

    from functuner.tuners.lora.config import LoRAConfig

    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]), extra_state_keys=[r"model\.norm\.weight"]
    )
    with torch.no_grad():
        sm.model.model.norm.weight.add_(0.5)
        for t in sm.adapters["default"].tensors.values():
            t.add_(0.01)
    sm.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    base = tiny_llama()
    params = ft.load(tmp_path, base)
    extra = ft.load_extra_states(tmp_path, base)
    assert set(extra) == {"model.norm.weight"}
    assert torch.equal(extra["model.norm.weight"], sm.model.model.norm.weight)
    assert not torch.equal(base.model.norm.weight, extra["model.norm.weight"])  # returned, never written
    with torch.no_grad():
        want = sm(input_ids=ids).logits
        base.load_state_dict(extra, strict=False)  # the caller decides where they go
        got = ft.apply(base, params, (), {"input_ids": ids}).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a checkpoint without extra states: {}; a key the model lacks: CheckpointError naming it
    sm2 = Swift.prepare_model(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    sm2.save_pretrained(tmp_path / "plain")
    assert ft.load_extra_states(tmp_path / "plain") == {}
    save_file({"model.nonexistent.weight": torch.ones(3)}, str(tmp_path / "extra_states" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="model.nonexistent.weight"):
        ft.load_extra_states(tmp_path, tiny_llama())
