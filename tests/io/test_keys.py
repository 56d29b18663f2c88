"""PEFT key renaming against real files: ``adapter_model.safetensors`` written by PEFT's ``save_pretrained``.

Both directions:

* ours -> PEFT: ``to_peft_state_dict(p)`` loaded into a PEFT model and saved by
  PEFT gives a file whose keys and tensors are exactly ``to_peft_state_dict(p)``;
  ``from_peft_state_dict`` of that file gives back ``p`` exactly.
* PEFT -> ours: an adapter that PEFT itself initialised and saved, read with
  ``safetensors`` and renamed by ``from_peft_state_dict``, gives functuner
  params whose ``apply`` output equals the PEFT model's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import functuner as ft
from functuner.errors import CheckpointError
from tests.conftest import tiny_bert, tiny_llama

CASES = {
    "lora": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), None),
    "dora": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True), None),
    "embedding": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), None),
    "dora_embedding": (tiny_llama, dict(r=2, lora_alpha=8, target_modules=["embed_tokens"], use_dora=True), None),
    "bias_all": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all"), None),
    "bias_lora_only": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "dense"], bias="lora_only"), None),
    "modules_to_save": (
        lambda: tiny_bert(num_labels=3),
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
        {"classifier"},
    ),
}


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def _out(o) -> torch.Tensor:
    return o["logits"] if o.get("logits") is not None else o["last_hidden_state"]


def _peft_save(pm, tmp_path: Path) -> dict[str, torch.Tensor]:
    # save_embedding_layers=False: PEFT would otherwise also store the full base embedding weights
    pm.save_pretrained(tmp_path, save_embedding_layers=False)
    path = tmp_path / "adapter_model.safetensors"
    assert path.is_file()
    return load_file(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ours_to_peft_file_and_back(case: str, tmp_path: Path) -> None:
    make_model, cfg, saved_modules = CASES[case]
    model = make_model()
    p = ft.init(model, ft.LoRAConfig(init_lora_weights=False, **cfg), generator=0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    ours_peft = ft.to_peft_state_dict(p)
    loaded = peft.set_peft_model_state_dict(pm, ours_peft)
    assert loaded.unexpected_keys == []

    on_disk = _peft_save(pm, tmp_path)
    assert set(on_disk) == set(ours_peft), sorted(set(on_disk) ^ set(ours_peft))
    for k, v in on_disk.items():
        assert torch.equal(v, ours_peft[k]), k

    back = ft.from_peft_state_dict(on_disk, "default", modules_to_save=saved_modules)
    assert set(back) == set(p)
    for k in p:
        assert torch.equal(back[k], p[k]), k
    # the loaded params run and give PEFT's output
    q = ft.TunerParams(back, p.config, "default")
    with torch.no_grad():
        torch.testing.assert_close(
            _out(ft.apply(model, q, kwargs={"input_ids": _ids()})), _out(pm(input_ids=_ids())), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("case", ["lora", "dora", "embedding", "bias_all", "modules_to_save"])
def test_peft_initialised_adapter_loads_into_functuner(case: str, tmp_path: Path) -> None:
    """An adapter PEFT drew and saved itself (non-zero B) gives PEFT's outputs through functuner."""
    make_model, cfg, saved_modules = CASES[case]
    model = make_model()
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **cfg)).eval()
    if saved_modules:  # make the saved copy differ from the original so loading it matters
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.25)
    on_disk = _peft_save(pm, tmp_path)
    p = ft.TunerParams(
        ft.from_peft_state_dict(on_disk, "default", modules_to_save=saved_modules), ft.LoRAConfig(**cfg), "default"
    )
    ft.validate(model, p)
    # every trainable PEFT tensor arrived
    ours = ft.init(model, ft.LoRAConfig(**cfg), generator=0)
    assert set(p) == set(ours)
    with torch.no_grad():
        a = _out(ft.apply(model, p, kwargs={"input_ids": _ids()}))
        b = _out(pm(input_ids=_ids()))
        base = _out(model(input_ids=_ids()))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - base).abs().max() > 1e-3


def test_adapter_name_other_than_default(tmp_path: Path) -> None:
    model = tiny_llama()
    cfg = dict(r=2, target_modules=["q_proj"], use_dora=True)
    p = ft.init(model, ft.LoRAConfig(init_lora_weights=False, **cfg), generator=0, adapter_name="mine")
    sd = ft.to_peft_state_dict(p, "mine")
    assert all(".mine" not in k for k in sd)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg), adapter_name="mine")
    assert peft.set_peft_model_state_dict(pm, sd, adapter_name="mine").unexpected_keys == []
    pm.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "mine" / "adapter_model.safetensors")
    back = ft.from_peft_state_dict(on_disk, "mine")
    assert set(back) == set(p) and all(torch.equal(back[k], p[k]) for k in p)


def test_errors_name_the_key() -> None:
    with pytest.raises(CheckpointError, match="model.layers.0.q_proj.lora_A.weight"):
        ft.from_peft_state_dict({"model.layers.0.q_proj.lora_A.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="other_thing"):
        ft.from_peft_state_dict({"base_model.model.x.other_thing": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="q_proj.lora_A.other.weight"):
        ft.to_peft_state_dict({"m.q_proj.lora_A.other.weight": torch.zeros(1)}, "default")


_part = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)
_module = st.lists(_part, min_size=1, max_size=4).map(".".join)


@settings(max_examples=25, deadline=None)
@given(
    modules=st.lists(_module, min_size=1, max_size=4, unique=True),
    adapter=st.from_regex(r"[A-Za-z][A-Za-z0-9_\-]{0,7}", fullmatch=True),
    dora=st.booleans(),
)
def test_key_round_trip_property(modules: list[str], adapter: str, dora: bool) -> None:
    """to_peft then from_peft is the identity on LoRA keys; tensors are passed through, never copied."""
    reserved = {"lora_A", "lora_B", "lora_magnitude_vector", "weight", "bias", "base_layer", "modules_to_save"}
    assume(adapter not in reserved and all(adapter not in m.split(".") for m in modules))
    assume(all(not (set(m.split(".")) & reserved) for m in modules))
    state: dict[str, torch.Tensor] = {}
    for m in modules:
        state[f"{m}.lora_A.{adapter}.weight"] = torch.zeros(1)
        state[f"{m}.lora_B.{adapter}.weight"] = torch.zeros(1)
        if dora:
            state[f"{m}.lora_magnitude_vector.{adapter}.weight"] = torch.zeros(1)
    peft_sd = ft.to_peft_state_dict(state, adapter)
    assert len(peft_sd) == len(state)
    assert all(k.startswith("base_model.model.") and adapter not in k.split(".") for k in peft_sd)
    back = ft.from_peft_state_dict(peft_sd, adapter)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)


def test_rename_adapter_touches_only_the_name_component() -> None:
    t = torch.zeros(1)
    state = {
        "adapter_mlp.lora_A.adapter.weight": t,
        "x.adapter.lora_B.adapter.weight": t,
        "cls.modules_to_save.adapter.weight": t,
        "x.lora_embedding_A.adapter": t,
    }
    out = ft.rename_adapter(state, "adapter", "mine")
    assert set(out) == {
        "adapter_mlp.lora_A.mine.weight",
        "x.adapter.lora_B.mine.weight",
        "cls.modules_to_save.mine.weight",
        "x.lora_embedding_A.mine",
    }
    assert all(v is t for v in out.values())
