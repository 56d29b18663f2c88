"""Copies of a SwiftModel: ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load`` give independent models.

Oracles: the original's outputs (the copy computes the same), and independence
checked both ways: changing the copy's adapter tensors, active set or merge
state changes only the copy's outputs (its slots route to its own adapters).
TRL builds reference models and EMA copies with ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading
from collections.abc import Callable

import pytest
import torch
from conftest import tiny_llama

from functuner import LoRAConfig, Swift, SwiftModel

X = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _torch_roundtrip(m: SwiftModel) -> SwiftModel:
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES: dict[str, Callable[[SwiftModel], SwiftModel]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_roundtrip,
}


def _model() -> SwiftModel:
    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(),
        {
            "default": LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "other": LoRAConfig(r=2, target_modules=["o_proj"], init_lora_weights=False),
        },
    )
    sm.set_active_adapters(["default"])
    return sm


def _logits(m: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(X).logits


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copy_is_equal_and_independent(how: str) -> None:
    sm = _model()
    want = _logits(sm)
    c = COPIES[how](sm)
    assert isinstance(c, SwiftModel) and type(c).forward is not SwiftModel.forward  # signed class again
    assert sorted(c.adapters) == ["default", "other"] and c.active_adapters == {"default"}
    assert torch.equal(_logits(c), want)
    assert torch.equal(_logits(c.model), want)  # the copy's inner model routes to the copy's adapters
    for name, a in c.adapters.items():
        for k, p in a.tensors.items():
            assert p is not sm.adapters[name].tensors[k] and p.data_ptr() != sm.adapters[name].tensors[k].data_ptr()
            assert dict(c.named_parameters())[f"base_model.{k}"] is p  # still the registered parameter
    with torch.no_grad():
        for p in c.adapters["default"].tensors.values():
            p.add_(0.5)
    assert torch.equal(_logits(sm), want) and torch.equal(_logits(sm.model), want)
    changed = _logits(c)
    assert not torch.allclose(changed, want)
    assert torch.equal(_logits(c.model), changed)
    c.set_active_adapters(["other"])
    assert sm.active_adapters == {"default"} and torch.equal(_logits(sm), want)
    sm.set_active_adapters([])
    assert c.active_adapters == {"other"} and not torch.equal(_logits(c), _logits(sm))


def test_copy_trains_on_its_own() -> None:
    sm = _model()
    before = {k: v.detach().clone() for k, v in sm.adapters["default"].tensors.items()}
    c = copy.deepcopy(sm)
    c.train()
    opt = torch.optim.SGD([p for p in c.parameters() if p.requires_grad], lr=0.1)
    c(X, labels=X).loss.backward()
    opt.step()
    assert all(torch.equal(sm.adapters["default"].tensors[k], v) for k, v in before.items())
    assert any(not torch.equal(c.adapters["default"].tensors[k], v) for k, v in before.items())


def test_copy_of_merged_and_offloaded_state() -> None:
    sm = _model()
    want = _logits(sm)
    sm.deactivate_adapter("other", offload="meta")
    Swift.merge(sm)
    merged = _logits(sm)
    assert torch.allclose(merged, want, atol=1e-5)
    c = copy.deepcopy(sm)
    assert torch.equal(_logits(c), merged)
    Swift.unmerge(c)  # the copy's originals are the copy's own weights: exact
    assert torch.equal(_logits(c), want)
    assert torch.equal(_logits(sm), merged) and sm._state.merged == ["default"]
    Swift.unmerge(sm)
    c.activate_adapter("other")  # its offload cache is its own file
    sm.activate_adapter("other")
    assert torch.equal(_logits(c), _logits(sm))
    assert c._state.offload_dir is not None and c._state.offload_dir is not sm._state.offload_dir


def test_per_thread_state_starts_fresh_in_the_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USE_UNIQUE_THREAD", "0")
    sm = _model()
    sm.set_active_adapters(["other"])  # this thread's own choice
    c = copy.deepcopy(sm)
    assert len(list(c._state.thread_states)) == 0
    seen: list[set[str]] = []
    t = threading.Thread(target=lambda: seen.append(sm.active_adapters))
    t.start()
    t.join()
    assert seen == [{"default", "other"}]  # what a new thread of the original sees (the global set)
    assert c.active_adapters == seen[0] != sm.active_adapters
