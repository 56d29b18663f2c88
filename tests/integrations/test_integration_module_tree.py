"""The shim follows parameter objects replaced in the module tree: ``load_state_dict(assign=True)``, ``to_empty()``.

FSDP2 (tests/io/test_distributed.py, 2 gloo ranks), ``model.load_state_dict(sd, assign=True)`` and
``model.to("meta")`` + ``to_empty()`` put *new* ``nn.Parameter`` objects where the shim registered its
adapter tensors.  The optimizer and the checkpoint code see the module tree, so the shim must route what
the tree holds: forward values, gradients, ``adapters[...].tensors`` and saved files all follow.  Oracle: the
same model trained without any replacement (and PEFT's LoRA, which lives in ordinary modules, for the
forward values).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import functuner as ft
from functuner import LoRAConfig, SwiftModel

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
CFG = LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear")


def _swift(seed: int = 0) -> SwiftModel:
    torch.manual_seed(seed)
    sm = SwiftModel(tiny_llama(), CFG)
    with torch.no_grad():  # non-zero B: the adapter changes the output
        for p in sm.adapters["default"].tensors.values():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return sm


def _train(sm: SwiftModel, steps: int = 3) -> list[float]:
    opt = torch.optim.SGD([p for p in sm.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = sm(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _tree(sm: SwiftModel) -> dict[str, torch.nn.Parameter]:
    names = dict(sm.model.named_parameters())
    return {k: names[k] for k in sm.adapters["default"].tensors}


def _assert_follows(sm: SwiftModel, old_ids: dict[str, int]) -> None:
    tree = _tree(sm)
    assert all(id(p) != old_ids[k] for k, p in tree.items()), "the test should have replaced the objects"
    assert all(sm.adapters["default"].tensors[k] is p for k, p in tree.items()), "the shim holds stale objects"


def test_load_state_dict_assign_replaces_the_adapter_parameters_and_the_shim_follows(tmp_path: Path) -> None:
    want_sm = _swift()
    want_losses = _train(want_sm)

    sm = _swift()
    old = {k: id(p) for k, p in _tree(sm).items()}
    fresh = {k: v.detach().clone() for k, v in sm.model.state_dict().items()}
    sm.model.load_state_dict(fresh, assign=True)
    _assert_follows(sm, old)
    assert _train(sm) == pytest.approx(want_losses, rel=1e-6)  # gradients reach what the optimizer steps
    for k, p in _tree(sm).items():
        assert torch.allclose(p, want_sm.adapters["default"].tensors[k], rtol=1e-6, atol=1e-7), k
    # the tree's values are what save_pretrained writes
    sm.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "default" / "adapter_model.safetensors"))
    names = {k: v for k, v in sm.state_dict().items()}
    assert names.keys() == saved.keys() and all(torch.equal(names[k], saved[k]) for k in saved)


def test_to_meta_then_to_empty_and_load_trains_like_the_original() -> None:
    want_sm = _swift()
    with torch.no_grad():
        want_out = want_sm(IDS).logits
    want_losses = _train(want_sm)

    sm = _swift()
    saved = {k: v.detach().clone() for k, v in sm.model.state_dict().items()}
    buffers = {k: b.clone() for k, b in sm.model.named_buffers()}  # rotary inv_freq is not in the state dict
    old = {k: id(p) for k, p in _tree(sm).items()}
    sm.to("meta")  # what a meta-device init starts from
    assert all(p.is_meta for p in sm.adapters["default"].tensors.values())
    sm.to_empty(device="cpu")
    with torch.no_grad():
        for k, b in buffers.items():
            sm.model.get_buffer(k).copy_(b)
    sm.model.load_state_dict(saved)
    _assert_follows(sm, old)
    with torch.no_grad():
        assert torch.equal(sm(IDS).logits, want_out)
    assert _train(sm) == pytest.approx(want_losses, rel=1e-6)


def test_forward_matches_peft_after_assign() -> None:
    """The replaced values are the ones routed: the same LoRA values in PEFT give the same logits."""
    import peft

    sm = _swift()
    values = {k: torch.randn_like(v) * 0.1 for k, v in sm.adapters["default"].tensors.items()}
    sd = {k: v.detach().clone() for k, v in sm.model.state_dict().items()}
    sd.update(values)
    sm.model.load_state_dict(sd, assign=True)
    pm = peft.get_peft_model(tiny_llama(), ft.to_peft_config(CFG))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            key = name.removeprefix("base_model.model.")
            if key in values:
                p.copy_(values[key])
        assert torch.allclose(sm(IDS).logits, pm(IDS).logits, atol=1e-6)


def test_routes_are_not_rebuilt_while_nothing_is_replaced() -> None:
    """The per-call cost: with no replacement, every call reuses the routes built once (one integer compare)."""
    sm = _swift()
    state = sm._state
    with torch.no_grad():
        sm(IDS)
        routes = state.routes
        for _ in range(3):
            sm(IDS)
    assert state.routes is routes and len(state.route_cache) == 1
    # a replacement makes the next call rebuild once, from the new objects
    sd = {k: v.detach().clone() for k, v in sm.model.state_dict().items()}
    sm.model.load_state_dict(sd, assign=True)
    with torch.no_grad():
        sm(IDS)
        rebuilt = state.routes
        sm(IDS)
    assert rebuilt is not routes and state.routes is rebuilt


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["new", "same", "assign"])), max_size=12))
def test_watched_parameters_move_the_epoch_exactly_when_an_object_changes(ops) -> None:
    """Property: the tree epoch moves iff a holder's parameter object is replaced, and ``follow`` then holds
    exactly the tree's objects (re-setting the same object, or changing values in place, moves nothing)."""
    from functuner.shim import live

    holder = torch.nn.Module()
    live.watch(holder)
    holder.a = torch.nn.Parameter(torch.zeros(2))
    holder.b = torch.nn.Parameter(torch.zeros(3))

    class Entry:
        held = {"x.a": holder.a, "x.b": holder.b}
        owners = (("x.a", holder._parameters, "a"), ("x.b", holder._parameters, "b"))
        shared = frozenset()
        seen = -1
        generation = 0

    entry = Entry()
    live.follow(entry)
    for leaf, op in ops:
        before, old = live.epoch(), holder._parameters[leaf]
        if op == "new":
            holder._parameters[leaf] = torch.nn.Parameter(old.detach().clone())  # as FSDP2 / nn.Module._apply
        elif op == "assign":
            setattr(holder, leaf, torch.nn.Parameter(old.detach() + 1))  # as load_state_dict(assign=True)
        else:
            holder._parameters[leaf] = old
            with torch.no_grad():
                old.add_(1.0)  # in place: the same object, nothing to follow
        assert (live.epoch() != before) == (op != "same")
        generation = entry.generation
        live.follow(entry)
        assert entry.generation == generation + (op != "same")
        assert entry.held["x.a"] is holder.a and entry.held["x.b"] is holder.b
