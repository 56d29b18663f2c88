"""SWIFT drop-in tuner semantics.

* target matching never sees modules functuner inserted (marked with
  ``functuner.core.targets.INTERNAL_MARKER``): Part and LoRA on the same modules,
  two LoRAs with regex targets, and the saved checkpoints' key counts;
* LLaMA-Pro's expanded form (SWIFT inserts real layers): ``llamapro.expand`` gives
  a transformers model with ``num_hidden_layers`` updated and the same outputs;
* NEFTune alone leaves the model fully trainable, as in SWIFT.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from models import logits, tiny_bert, tiny_llama
from safetensors.torch import load_file
from torch import nn

import functuner as ft
from functuner.core.targets import INTERNAL_MARKER, own_named_modules, own_named_parameters, select_modules
from functuner.tuners import llamapro, neftune

PART = ft.PartConfig(target_modules=r".*attention\.self\.(query|value)")
LORA_LIST = ft.LoRAConfig(r=2, target_modules=["query", "value"])
LORA_WIDE = ft.LoRAConfig(r=2, target_modules=r".*(query|value).*")  # also matches names below the targets


# -- functional API: a marked module is never a target ------------------------------------------------------
class _Marked(nn.Module):
    """Stands for a module functuner inserted (the stateful shim's holders carry the same marker)."""

    _functuner_internal = True

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)


def _model_with_marked_modules() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].add_module("extra", _Marked())
    return model


def test_marked_modules_and_their_parameters_are_invisible() -> None:
    model = _model_with_marked_modules()
    assert INTERNAL_MARKER == "_functuner_internal"
    assert [n for n, _ in own_named_modules(model)] == ["", "0", "1"]
    assert [n for n, _ in own_named_parameters(model[0])] == ["weight", "bias"]
    assert [n for n, _ in select_modules(model, "all-linear")] == ["0", "1"]
    assert [n for n, _ in select_modules(model, r".*")] == ["0", "1"]
    with pytest.raises(ft.errors.TargetError, match="matched no module"):
        select_modules(model, ["inner"])
    lora = ft.init(model, ft.LoRAConfig(r=2, target_modules=r".*", bias="all"), generator=0)
    assert not any("extra" in k for k in lora)
    part = ft.init(model, ft.PartConfig(target_modules="0"), generator=0)
    assert sorted(part) == ["0._part_default.bias", "0._part_default.weight"]


@settings(max_examples=10, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4))
def test_own_named_modules_is_named_modules_minus_marked_subtrees(path: list[str]) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    node: nn.Module = model
    for i, part in enumerate(path):
        child = _Marked() if i == len(path) // 2 else nn.Sequential()
        node.add_module(part, child)
        node = child
    marked = [n for n, m in model.named_modules() if getattr(m, INTERNAL_MARKER, False)]
    expected = [n for n, _ in model.named_modules() if not any(n == h or n.startswith(h + ".") for h in marked)]
    assert [n for n, _ in own_named_modules(model)] == expected


# -- the stateful shim (read-only use): tuners added one after another ---------------------------------------
def _saved_keys(cfgs: list[tuple[str, ft.TunerConfig]], tmp_path: pathlib.Path) -> dict[str, list[str]]:
    sm = tiny_bert()
    for name, cfg in cfgs:
        sm = ft.Swift.prepare_model(sm, {name: cfg})
    x = torch.randint(0, 64, (1, 5))
    logits(sm(x))  # runs
    sm.save_pretrained(str(tmp_path))
    return {name: sorted(load_file(tmp_path / name / "adapter_model.safetensors")) for name, _ in cfgs}


# tiny_bert: 2 layers x (query, value): Part saves weight + bias, LoRA saves lora_A + lora_B of each
_PART_KEYS = sorted(
    f"encoder.layer.{i}.attention.self.{m}.{p}" for i in (0, 1) for m in ("query", "value") for p in ("weight", "bias")
)


def _lora_keys(name: str) -> list[str]:
    return sorted(
        f"encoder.layer.{i}.attention.self.{m}.lora_{ab}.{name}.weight"
        for i in (0, 1)
        for m in ("query", "value")
        for ab in "AB"
    )


@pytest.mark.parametrize("order", ["part_first", "lora_first"])
@pytest.mark.parametrize("lora", [LORA_LIST, LORA_WIDE], ids=["list", "regex"])
def test_part_and_lora_on_the_same_modules(order: str, lora: ft.LoRAConfig, tmp_path: pathlib.Path) -> None:
    cfgs = [("p", PART), ("l", lora)] if order == "part_first" else [("l", lora), ("p", PART)]
    keys = _saved_keys(cfgs, tmp_path)
    assert keys["p"] == _PART_KEYS  # 8 keys: never the LoRA tensors placed inside the modules
    assert keys["l"] == _lora_keys("l")


def test_two_loras_with_regex_targets(tmp_path: pathlib.Path) -> None:
    keys = _saved_keys([("a", LORA_WIDE), ("b", LORA_WIDE)], tmp_path)
    assert keys == {"a": _lora_keys("a"), "b": _lora_keys("b")}


# -- LLaMA-Pro: SWIFT's expanded model ---------------------------------------------------------------------------
@pytest.mark.parametrize(("new", "groups"), [(2, None), (1, None), (2, 1)])
def test_expand_gives_a_transformers_model_with_the_same_outputs(new: int, groups: int | None) -> None:
    model = tiny_llama()
    cfg = ft.LLaMAProConfig(model_type="llama", num_new_blocks=new, num_groups=groups)
    gen = torch.Generator().manual_seed(1)
    params = ft.init(model, cfg, generator=0).map(lambda t: t + 0.05 * torch.randn(t.shape, generator=gen))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state, config = llamapro.expand(model, params)
    plan = llamapro.expansion_plan(2, new, groups)
    assert config.num_hidden_layers == 2 + len(plan) and model.config.num_hidden_layers == 2
    expanded = transformers.AutoModelForCausalLM.from_config(config).eval()
    expanded.load_state_dict(state)  # strict: every key of the 4-layer model, nothing else
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(expanded(ids).logits, ft.apply(model, params, (ids,)).logits, rtol=0, atol=1e-6)
    for b in plan:  # the new blocks sit at SWIFT's indices (those SWIFT's checkpoint names)
        key = f"model.layers.{b.new_index}.self_attn.o_proj.weight"
        assert torch.equal(state[key], params[f"model.layers.{b.source}.llamapro_default.self_attn.o_proj.weight"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_expand_needs_a_transformers_config() -> None:
    model = tiny_llama()
    params = ft.init(model, ft.LLaMAProConfig(model_type="llama", num_new_blocks=2), generator=0)
    bare = nn.Module()
    bare.model = model.model
    with pytest.raises(ft.errors.ConfigError, match="num_hidden_layers"):
        llamapro.expand(bare, params)


# -- NEFTune alone leaves the model trainable (SWIFT: has_additional_modules() is False) --------------------------
def test_neftune_does_not_freeze_the_model() -> None:
    assert neftune.tuner.freezes_base is False
    assert ft.tuners.tuner_for(ft.LoRAConfig()).freezes_base is True
    sm = ft.Swift.prepare_model(tiny_llama(), ft.NEFTuneConfig())
    assert all(p.requires_grad for p in sm.model.parameters())


def test_neftune_then_lora_freezes_the_base_as_swift_does() -> None:
    sm = ft.Swift.prepare_model(tiny_llama(), {"n": ft.NEFTuneConfig()})
    sm = ft.Swift.prepare_model(sm, {"l": ft.LoRAConfig(r=2, target_modules=["q_proj"])})
    trainable = sorted(n for n, p in sm.model.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_" in n for n in trainable)
