"""TunerParams: an immutable mapping that is a pytree for torch, optree (global and "functuner" namespace)."""

from __future__ import annotations

import copy

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from hypothesis import given, settings
from hypothesis import strategies as st

import functuner as ft
from functuner.core.params import TunerParams

CFG = ft.LoRAConfig(r=2, target_modules=["q_proj"])

names = st.lists(
    st.from_regex(r"[a-z]{1,6}(\.[a-z0-9]{1,4}){0,3}", fullmatch=True), min_size=0, max_size=6, unique=True
)


def _params(keys: list[str], adapter: str = "default", cfg=CFG) -> TunerParams:
    g = torch.Generator().manual_seed(len(keys))
    return TunerParams({k: torch.randn(i + 1, 2, generator=g) for i, k in enumerate(keys)}, cfg, adapter)


@settings(max_examples=25, deadline=None)
@given(keys=names)
def test_torch_pytree_roundtrip(keys: list[str]) -> None:
    p = _params(keys)
    leaves, spec = torch_pytree.tree_flatten(p)
    assert len(leaves) == len(keys)
    assert all(leaf is p[k] for leaf, k in zip(leaves, keys, strict=True))
    back = torch_pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, TunerParams) and back == p
    assert list(back) == keys and back.config is p.config and back.adapter_name == p.adapter_name
    # names are part of the static structure: paths carry them
    paths = [path for path, _ in torch_pytree.tree_flatten_with_path(p)[0]]
    assert [path[0].key for path in paths] == keys


@settings(max_examples=25, deadline=None)
@given(keys=names)
def test_optree_with_and_without_namespace(keys: list[str]) -> None:
    p = _params(keys)
    for kwargs in ({}, {"namespace": "functuner"}):
        doubled = optree.tree_map(lambda t: t * 2, p, **kwargs)
        assert isinstance(doubled, TunerParams), kwargs
        assert list(doubled) == keys and doubled.config == p.config
        assert all(torch.equal(doubled[k], p[k] * 2) for k in keys)
        leaves, spec = optree.tree_flatten(p, **kwargs)
        assert len(leaves) == len(keys)
        assert optree.tree_unflatten(spec, leaves) == p
    assert ft.tree_map(lambda t: t + 1, p) == p.map(lambda t: t + 1)
    # nested inside containers
    nested = {"a": p, "b": [p, p]}
    out = ft.tree_map(torch.neg, nested)
    assert out["b"][1] == p.map(torch.neg)


def test_tree_map_over_two_params_and_paths() -> None:
    a, b = _params(["x.lora_A", "x.lora_B"]), _params(["x.lora_A", "x.lora_B"]).map(lambda t: t + 1)
    s = ft.tree_map(lambda u, v: u + v, a, b)
    assert all(torch.equal(s[k], a[k] + b[k]) for k in a)
    paths, _, _ = optree.tree_flatten_with_path(a)
    assert paths == [("x.lora_A",), ("x.lora_B",)]


def test_specs_equal_only_for_same_structure_and_static_data() -> None:
    p = _params(["a", "b"])
    spec = torch_pytree.tree_structure(p)
    assert torch_pytree.tree_structure(p.map(torch.zeros_like)) == spec
    assert torch_pytree.tree_structure(_params(["b", "a"])) != spec
    assert torch_pytree.tree_structure(_params(["a", "b"], adapter="other")) != spec
    assert torch_pytree.tree_structure(_params(["a", "b"], cfg=ft.LoRAConfig(r=3, target_modules=["q_proj"]))) != spec
    # configs compare and hash by value, so an equal config rebuilt from a dict gives the same spec
    same_cfg = ft.LoRAConfig.from_dict(CFG.to_dict())
    assert same_cfg == CFG and hash(same_cfg) == hash(CFG)
    assert torch_pytree.tree_structure(_params(["a", "b"], cfg=same_cfg)) == spec


def test_immutability() -> None:
    p = _params(["a", "b"])
    with pytest.raises(AttributeError):
        p.config = None  # type: ignore[misc]
    with pytest.raises(AttributeError):
        p.adapter_name = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.config
    with pytest.raises(TypeError):
        p["a"] = torch.zeros(1)  # type: ignore[index]
    with pytest.raises(TypeError):
        hash(p)
    # the constructor copies the mapping: changing the source dict changes nothing
    src = {"a": torch.zeros(2)}
    q = TunerParams(src, CFG)
    src["b"] = torch.ones(2)
    assert list(q) == ["a"]
    # state_dict() hands out a copy of the mapping
    d = q.state_dict()
    d["c"] = torch.ones(1)
    assert "c" not in q


def test_replace_and_map_return_new_params() -> None:
    p = _params(["a", "b"])
    new_a = torch.full_like(p["a"], 3.0)
    q = p.replace({"a": new_a})
    assert q is not p and q["a"] is new_a and q["b"] is p["b"]
    assert not torch.equal(p["a"], new_a)
    with pytest.raises(KeyError, match="'c'"):
        p.replace({"c": torch.zeros(1)})
    with pytest.raises(TypeError, match="nonsense"):
        p.replace(nonsense=1)
    r = p.replace(adapter_name="other")
    assert r.adapter_name == "other" and p.adapter_name == "default" and r["a"] is p["a"]
    m = p.map(lambda t: t * 0)
    assert all(torch.equal(m[k], torch.zeros_like(p[k])) for k in p)
    assert p.to(torch.float64)["a"].dtype == torch.float64 and p["a"].dtype == torch.float32
    assert p.num_parameters() == sum(t.numel() for t in p.values())


def test_equality_is_exact() -> None:
    p = _params(["a"])
    assert p == p.map(torch.clone)
    assert p != p.map(lambda t: t + 1e-7)
    assert p != _params(["a"], adapter="x")
    assert (p == {"a": p["a"]}) is False


def test_copies() -> None:
    p = _params(["a", "b"])
    c = copy.copy(p)
    assert c == p
    d = copy.deepcopy(p)
    assert d == p and d["a"] is not p["a"]


def test_real_init_result_is_a_pytree_of_the_right_leaves() -> None:
    from models import tiny_llama

    model = tiny_llama()
    p = ft.init(model, ft.LoRAConfig(r=2, target_modules=["q_proj"], use_dora=True), generator=0)
    leaves, spec = torch_pytree.tree_flatten(p)
    assert len(leaves) == 6  # A, B, magnitude for 2 layers
    assert torch_pytree.tree_unflatten(leaves, spec) == p
    assert all(isinstance(t, torch.Tensor) for t in leaves)
