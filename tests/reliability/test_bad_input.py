"""Bad input: a typed functuner error whose message names the field/key at fault, and nothing changed.

"Nothing changed" is checked bitwise: every parameter and buffer of the model
(values and storage), the params given, and the model's hook tables.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import functuner as ft
from functuner.errors import (
    AdapterNameError,
    ConfigError,
    FunctunerError,
    ParamsMismatchError,
    TargetError,
    UnsupportedModuleError,
)
from tests.conftest import tiny_bert, tiny_llama


class Snapshot:
    """A bitwise copy of a model's tensors (with storage pointers) and hook counts."""

    def __init__(self, model: nn.Module, params: ft.TunerParams | None = None) -> None:
        self.model = model
        self.state = {k: (v.detach().clone(), v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()}
        self.hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
        self.params = params
        self.params_copy = {k: v.clone() for k, v in params.items()} if params is not None else None

    def assert_unchanged(self) -> None:
        now = self.model.state_dict(keep_vars=True)
        assert set(now) == set(self.state)
        for k, (v, ptr) in self.state.items():
            assert now[k].data_ptr() == ptr, f"{k} was replaced"
            assert torch.equal(now[k].detach(), v), f"{k} was written to"
        assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in self.model.modules()] == self.hooks
        if self.params is not None:
            for k, v in self.params_copy.items():
                assert torch.equal(self.params[k], v), f"params[{k!r}] was written to"


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------
# config / targets
# ---------------------------------------------------------------------------
def test_targets_that_match_nothing() -> None:
    model = tiny_llama()
    snap = Snapshot(model)
    with pytest.raises(TargetError, match="target_modules") as e:
        ft.init(model, ft.LoRAConfig(target_modules=["no_such_proj"]), generator=0)
    assert "no_such_proj" in str(e.value)
    with pytest.raises(TargetError, match="target_modules"):
        ft.init(model, ft.LoRAConfig(target_modules=r".*\.nothing_here"), generator=0)
    with pytest.raises(TargetError, match="target_modules"):
        ft.init(model, ft.LoRAConfig(target_modules=None), generator=0)
    snap.assert_unchanged()


def test_modules_to_save_that_match_nothing() -> None:
    model = tiny_bert(num_labels=2)
    snap = Snapshot(model)
    with pytest.raises(ConfigError, match="modules_to_save") as e:
        ft.init(model, ft.LoRAConfig(target_modules=["query"], modules_to_save=["clasifier"]), generator=0)
    assert "clasifier" in str(e.value)
    snap.assert_unchanged()


@settings(max_examples=20, deadline=None)
@given(r=st.integers(min_value=-1000, max_value=0))
def test_non_positive_rank(r: int) -> None:
    with pytest.raises(ConfigError, match=r"\br must be a positive integer") as e:
        ft.LoRAConfig(r=r, target_modules=["q_proj"])
    assert f"r={r}" in str(e.value)


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("r", 2.5, "r must be"),
        ("r", True, "r must be"),
        ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\]"),
        ("lora_alpha", "8", "lora_alpha"),
        ("lora_dropout", 1.0, "lora_dropout"),
        ("lora_dropout", -0.1, "lora_dropout"),
        ("bias", "some", "bias"),
        ("init_lora_weights", "pissa_niter_x", "init_lora_weights"),  # "pissa" itself is supported
        ("lora_dtype", "fp8", "lora_dtype"),
        ("use_qa_lora", True, "use_qa_lora"),
    ],
)
def test_invalid_config_fields_name_the_field(field: str, value, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        ft.LoRAConfig(target_modules=["q_proj"], **{field: value})
    # dataclasses.replace goes through the same checks
    good = ft.LoRAConfig(target_modules=["q_proj"])
    with pytest.raises(ConfigError, match=pattern):
        dataclasses.replace(good, **{field: value})


def test_unknown_config_key_from_dict() -> None:
    with pytest.raises(ConfigError, match="lora_alhpa"):
        ft.LoRAConfig.from_dict({"r": 4, "target_modules": ["q_proj"], "lora_alhpa": 8})


@pytest.mark.parametrize("name", ["", "a.b", "../x", "a/b", "with space"])
def test_bad_adapter_names(name: str) -> None:
    model = tiny_llama()
    snap = Snapshot(model)
    with pytest.raises(AdapterNameError):
        ft.init(model, ft.LoRAConfig(target_modules=["q_proj"]), generator=0, adapter_name=name)
    snap.assert_unchanged()


def test_init_without_explicit_randomness() -> None:
    model = tiny_llama()
    with pytest.raises(TypeError, match="generator"):
        ft.init(model, ft.LoRAConfig(target_modules=["q_proj"]), generator=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# unsupported layers
# ---------------------------------------------------------------------------
def test_unsupported_layer_type_names_module_and_type() -> None:
    model = tiny_llama()
    snap = Snapshot(model)
    with pytest.raises(UnsupportedModuleError) as e:
        ft.init(model, ft.LoRAConfig(target_modules=["q_proj", "input_layernorm"]), generator=0)
    msg = str(e.value)
    assert "model.layers.0.input_layernorm" in msg and "LlamaRMSNorm" in msg
    assert isinstance(e.value, TypeError) and isinstance(e.value, FunctunerError)
    snap.assert_unchanged()


def test_grouped_conv_rank_must_divide_by_groups() -> None:
    # grouped convolutions are supported as PEFT has them (lora_B grouped like the base): the rank must be a
    # multiple of groups, refused before anything changes; a fitting rank works
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    snap = Snapshot(model)
    with pytest.raises(ConfigError, match="groups=2"):
        ft.init(model, ft.LoRAConfig(r=3, target_modules=["0"]), generator=0)
    snap.assert_unchanged()
    params = ft.init(model, ft.LoRAConfig(r=8, target_modules=["0"]), generator=0)
    assert ft.apply(model, params, (torch.randn(1, 4, 6, 6),)).shape == (1, 4, 4, 4)


# ---------------------------------------------------------------------------
# params that do not fit the model
# ---------------------------------------------------------------------------
def _llama_params(model: nn.Module, **kw) -> ft.TunerParams:
    return ft.init(
        model, ft.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw), generator=0
    )


def _all_fail(model: nn.Module, params: ft.TunerParams, exc: type[Exception], pattern: str) -> None:
    """validate, apply and merge all refuse ``params`` with ``exc`` matching ``pattern``, changing nothing."""
    snap = Snapshot(model, params)
    base_state = dict(model.state_dict())
    base_before = {k: (id(v), v.clone()) for k, v in base_state.items()}
    for call in (
        lambda: ft.validate(model, params),
        lambda: ft.apply(model, params, kwargs={"input_ids": _ids()}),
        lambda: ft.merge(model, params),
        lambda: ft.merge(model, params, base_state),
    ):
        with pytest.raises(exc, match=pattern):
            call()
    snap.assert_unchanged()
    # the explicit base mapping is untouched too: same keys, same tensor objects, same values
    assert set(base_state) == set(base_before)
    for k, (ident, value) in base_before.items():
        assert id(base_state[k]) == ident and torch.equal(base_state[k], value), k


def test_params_from_a_wider_model_name_key_and_shapes() -> None:
    small, wide = tiny_llama(), tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    p = _llama_params(wide)
    _all_fail(small, p, ParamsMismatchError, r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.default\.weight.*\(2, 48\)")


def test_params_with_one_tensor_of_wrong_shape() -> None:
    model = tiny_llama()
    p = _llama_params(model)
    key = "model.layers.1.self_attn.v_proj.lora_B.default.weight"
    bad = p.replace({key: torch.zeros(17, 2)})
    _all_fail(model, bad, ParamsMismatchError, rf"{key.replace('.', r'.')}.*\(17, 2\).*needs \(16, 2\)")


def test_params_for_modules_the_model_lacks() -> None:
    model, deep = tiny_llama(), tiny_llama(num_hidden_layers=3)
    p = _llama_params(deep)
    _all_fail(model, p, ParamsMismatchError, r"model\.layers\.2\.self_attn")


def test_params_with_a_missing_partner() -> None:
    model = tiny_llama()
    p = _llama_params(model)
    key_b = "model.layers.0.self_attn.q_proj.lora_B.default.weight"
    bad = ft.TunerParams({k: v for k, v in p.items() if k != key_b}, p.config, p.adapter_name)
    _all_fail(model, bad, ParamsMismatchError, key_b.replace(".", r"\."))


def test_params_with_a_stray_key() -> None:
    model = tiny_llama()
    p = _llama_params(model)
    bad = ft.TunerParams({**p, "model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}, p.config, p.adapter_name)
    _all_fail(model, bad, ParamsMismatchError, r"q_proj\.weight")


def test_dora_flag_without_magnitudes() -> None:
    model = tiny_llama()
    p = _llama_params(model)
    bad = p.replace(config=dataclasses.replace(p.config, use_dora=True))
    _all_fail(model, bad, ParamsMismatchError, r"use_dora=True.*lora_magnitude_vector")


def test_modules_to_save_of_wrong_shape() -> None:
    model = tiny_bert(num_labels=3)
    p = ft.init(model, ft.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), generator=0)
    key = "classifier.modules_to_save.default.weight"
    bad = p.replace({key: torch.zeros(4, 32)})
    snap = Snapshot(model, bad)
    for call in (
        lambda: ft.validate(model, bad),
        lambda: ft.merge(model, bad),
        lambda: ft.apply(model, bad, kwargs={"input_ids": _ids()}),
    ):
        with pytest.raises(ParamsMismatchError, match=r"classifier\.modules_to_save\.default\.weight.*\(4, 32\)"):
            call()
    snap.assert_unchanged()


def test_unmerge_of_dora_is_refused_and_changes_nothing() -> None:
    model = tiny_llama()
    p = _llama_params(model, use_dora=True)
    merged = ft.merge(model, p)
    merged_copy = {k: v.clone() for k, v in merged.items()}
    snap = Snapshot(model, p)
    with pytest.raises(ConfigError, match=r"DoRA.*q_proj"):
        ft.unmerge(model, p, merged)
    snap.assert_unchanged()
    assert all(torch.equal(merged[k], v) for k, v in merged_copy.items())


def test_params_of_an_unknown_kind() -> None:
    model = tiny_llama()
    with pytest.raises(TypeError, match="TunerParams"):
        ft.apply(model, {"x": torch.zeros(1)}, kwargs={"input_ids": _ids()})  # type: ignore[arg-type]


def test_wrong_shape_is_caught_even_after_good_params_with_the_same_names() -> None:
    """Validation results are cached per params structure; the shapes are part of that structure."""
    model = tiny_llama()
    p = _llama_params(model)
    ft.validate(model, p)
    with torch.no_grad():
        ft.apply(model, p, kwargs={"input_ids": _ids()})
    key = "model.layers.0.self_attn.q_proj.lora_B.default.weight"
    bad = p.replace({key: torch.zeros(17, 2)})
    _all_fail(model, bad, ParamsMismatchError, rf"{key.replace('.', r'.')}.*\(17, 2\)")
    # the good params are still accepted afterwards
    ft.validate(model, p)


def test_params_whose_rank_disagrees_with_the_config() -> None:
    """A rank-2 adapter under a config saying r=4 would be scaled by alpha/4: refused, naming the key."""
    model = tiny_llama()
    p = _llama_params(model)
    relabelled = p.replace(config=dataclasses.replace(p.config, r=4))
    _all_fail(model, relabelled, ParamsMismatchError, r"q_proj\.lora_A\.default\.weight.*rank 2.*r=4")
