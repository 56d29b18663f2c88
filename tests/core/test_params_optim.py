"""``TunerParams.parameters()`` / ``trainable()``: training a ``TunerParams`` with a ``torch.optim`` optimizer.

``torch.optim.AdamW(params)`` on a mapping iterates its names (strings) and fails; ``params.parameters()``
is the documented spelling. These tests pin its order (the pytree leaf order), the typed error for tensors an
optimizer could never update, and that training ``params.trainable()`` leaves the original params untouched.
"""

from __future__ import annotations

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from hypothesis import given, settings
from hypothesis import strategies as st

import functuner as ft
from functuner.errors import ParamsMismatchError
from tests.conftest import tiny_llama


def _lora(model: torch.nn.Module) -> ft.TunerParams:
    return ft.init(model, ft.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), generator=0)


def test_a_mapping_is_not_an_optimizer_argument_but_parameters_is() -> None:
    params = _lora(tiny_llama()).trainable()
    with pytest.raises(TypeError, match="str"):
        torch.optim.AdamW(params)  # the reported failure: a Mapping yields its keys
    optimizer = torch.optim.AdamW(params.parameters(), lr=1e-2)
    assert [p for group in optimizer.param_groups for p in group["params"]] == params.parameters()


def test_parameters_order_is_the_pytree_leaf_order_and_stable() -> None:
    params = _lora(tiny_llama())
    tensors = params.parameters(require_grad=False)
    assert len(tensors) == len(params)
    assert all(a is b for a, b in zip(tensors, torch_pytree.tree_leaves(params), strict=True))
    assert all(a is b for a, b in zip(tensors, optree.tree_leaves(params, namespace="functuner"), strict=True))
    assert all(a is params[name] for a, name in zip(tensors, params, strict=True))
    doubled = ft.tree_map(lambda t: 2 * t, params)
    assert all(torch.equal(2 * a, b) for a, b in zip(tensors, doubled.parameters(require_grad=False), strict=True))


def test_parameters_refuses_tensors_an_optimizer_would_never_update() -> None:
    params = _lora(tiny_llama())  # fresh from init: no requires_grad
    first = next(iter(params))
    with pytest.raises(ParamsMismatchError, match="does not require grad") as info:
        params.parameters()
    assert first in str(info.value) and "params.trainable()" in str(info.value)
    non_leaf = params.trainable().map(lambda t: t * 2)  # results of autograd ops are not leaves
    with pytest.raises(ParamsMismatchError, match="is not a leaf tensor"):
        non_leaf.parameters()


def test_trainable_copies_train_with_torch_optim_and_leave_the_original_alone() -> None:
    model = tiny_llama()
    params = _lora(model)
    before = params.state_dict()
    snapshot = {k: v.clone() for k, v in before.items()}
    trained = params.trainable()
    assert trained.config == params.config and trained.adapter_name == params.adapter_name
    assert all(t.is_leaf and t.requires_grad for t in trained.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(trained.values(), params.values(), strict=True))

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    def loss_fn(p: ft.TunerParams) -> torch.Tensor:
        logits = ft.apply(model, p, (ids,)).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))

    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn(trained)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(trained[k], snapshot[k]) for k in params)  # the optimizer trained the copies
    assert all(torch.equal(params[k], snapshot[k]) and params[k] is before[k] for k in params)  # not the original


@settings(max_examples=20, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), min_size=1, max_size=6))
def test_parameters_follows_insertion_order_for_any_names(shapes: list[tuple[int, int]]) -> None:
    names = [f"layer.{len(shapes) - i}.lora_A.default.weight" for i in range(len(shapes))]  # not sorted order
    tensors = {name: torch.randn(*shape) for name, shape in zip(names, shapes, strict=True)}
    params = ft.TunerParams(tensors, config=None).trainable()
    assert [t.shape for t in params.parameters()] == [torch.Size(s) for s in shapes]
    assert all(torch.equal(a, tensors[n]) for a, n in zip(params.parameters(), names, strict=True))
