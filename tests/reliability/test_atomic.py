"""Atomic stateful calls (issue 8, item 5): a failure at any step leaves the model exactly as it was.

For each shim call that changes state (``merge``, ``unmerge``,
``merge_and_unload``, ``load_state_dict``, ``from_pretrained`` onto a
SwiftModel and onto a plain model, ``set_active_adapters`` with
``offload='cpu'``/``'meta'`` and back, and without offload), the call is first run once to count
its steps: every torch function it calls (a ``TorchFunctionMode``) and every
call of the shim's own per-tensor helpers (``_register``, ``_unregister``,
``_set_registered``, ``bind_routes``, ``load_file``, ``save_file``: patched
with counting wrappers; patching our own code, mocking nothing else).  Then,
on one and the same model, the call is repeated with an injected exception at
step k for every k: after each raise the model must be bitwise what it was
(values, storage, identity, requires_grad, module tree, hooks, adapters,
active set, merge and offload state) and give the same outputs.  Finally the
call runs without a failure and must do its job.

By default calls with more than ``MAX_STEPS`` steps are tested at that many
evenly spread steps plus the last 40; ``FUNCTUNER_FULL=1`` tests every step.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from rel_common import ModelSnapshot, out_of, tiny_llama
from torch.overrides import TorchFunctionMode

import functuner.shim.placement as placement_mod
import functuner.shim.state as state_mod
from functuner import LoRAConfig, Swift, SwiftModel

MAX_STEPS = 10**9 if os.environ.get("FUNCTUNER_FULL") == "1" else 80


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread (and do not stall on a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Injected(RuntimeError):
    """The failure the test injects."""


class Steps(TorchFunctionMode):
    """Counts steps; raises :class:`Injected` at step ``fail_at`` (once)."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.fail_at, self.n = fail_at, 0

    def tick(self, what: object) -> None:
        self.n += 1
        if self.n == self.fail_at:
            raise Injected(f"injected failure at step {self.n} ({what})")

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if "grad_enabled" not in getattr(func, "__name__", ""):  # torch's own no_grad() enter/exit: not a step
            self.tick(func)
        return func(*args, **(kwargs or {}))


# the shim's steps that are no torch op: parameter placement, route building, offload file I/O
_HELPERS = (
    (placement_mod, ("register", "unregister", "set_registered", "bind_routes", "load_file", "save_file")),
    (state_mod, ("bind_routes",)),
)


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch):
    holder: dict[str, Steps | None] = {"mode": None}
    for module, names in _HELPERS:
        for name in names:
            real = getattr(module, name)

            def wrapped(*a: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
                mode = holder["mode"]
                if mode is not None:
                    mode.tick(_name)
                return _real(*a, **kw)

            monkeypatch.setattr(module, name, wrapped)

    def run(call: Callable[[], Any], fail_at: int | None) -> int:
        mode = Steps(fail_at)
        holder["mode"] = mode
        try:
            with mode:
                call()
        finally:
            holder["mode"] = None
        return mode.n

    return run


def _fail_everywhere(steps, build: Callable[[], tuple[torch.nn.Module, Callable[[], Any]]]) -> tuple[int, Any]:
    """Build, count the call's steps, rebuild, and fail the call at every (sampled) step on one model."""
    # Pure caches keyed by the model (e.g. LoRA's validated layouts) are filled by a call that fails late, and
    # then spare later calls some steps; so steps are counted, and failures injected, on models whose caches
    # were filled by a call failed at its last step (the first call of a process also pays for lazy imports).
    _, first_call = build()
    first = steps(first_call, None)
    _, count_call = build()
    with pytest.raises(Injected):
        steps(count_call, first)
    total = steps(count_call, None)

    def fresh():
        model, call = build()
        snap, before = ModelSnapshot(model), out_of(model)
        with pytest.raises(Injected):
            steps(call, first)
        snap.assert_unchanged()
        return model, call, snap, before

    model, call, snap, before = fresh()
    ks = list(range(1, total + 1))
    if total > MAX_STEPS:
        stride = total / MAX_STEPS
        ks = sorted({int(i * stride) + 1 for i in range(MAX_STEPS)} | set(range(max(1, total - 40), total + 1)))
    swallowed = []
    for i, k in enumerate(ks):
        try:
            steps(call, k)
        except Injected:
            pass
        else:
            # a library caught the injected error itself (safetensors' storage_ptr falls back on any
            # exception): the call legitimately completed, so continue on a new model
            swallowed.append(k)
            assert len(swallowed) <= len(ks) // 4, f"injections at {swallowed} did not fail the call"
            model, call, snap, before = fresh()
            continue
        try:
            snap.assert_unchanged()
            if i % 8 == 0 or k == total:  # the bitwise snapshot is the check; outputs confirm it now and then
                assert torch.equal(out_of(model), before), "outputs changed"
        except AssertionError as e:
            raise AssertionError(f"after a failure at step {k} of {total}: {e}") from None
    steps(call, None)  # and without a failure the call completes
    return total, model


def _two_adapters(seed: int = 3) -> SwiftModel:
    model = tiny_llama(num_hidden_layers=1)
    torch.manual_seed(seed)
    return Swift.prepare_model(
        model,
        {
            "a": LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "b": LoRAConfig(
                r=2, lora_alpha=8, target_modules=["embed_tokens", "o_proj"], use_dora=False, init_lora_weights=False
            ),
        },
        extra_state_keys=[r"model\.norm\.weight"],
    )


def _base_weights(m: SwiftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.model.state_dict().items() if "lora_" not in k}


def test_merge_is_atomic(steps) -> None:
    def build():
        sm = _two_adapters()
        return sm, lambda: Swift.merge(sm)

    total, sm = _fail_everywhere(steps, build)
    assert sorted(sm._state.merged) == ["a", "b"]
    print(f"merge: {total} steps")


def test_unmerge_is_atomic(steps) -> None:
    def build():
        sm = _two_adapters()
        Swift.merge(sm)
        return sm, lambda: Swift.unmerge(sm)

    total, sm = _fail_everywhere(steps, build)
    assert sm._state.merged == []
    ref = _base_weights(_two_adapters())
    assert all(torch.equal(v, ref[k]) for k, v in _base_weights(sm).items())


def test_merge_and_unload_is_atomic(steps) -> None:
    def build():
        sm = _two_adapters()
        return sm, lambda: Swift.merge_and_unload(sm, adapter_name=["a", "b"])

    total, sm = _fail_everywhere(steps, build)
    assert sm.adapters == {}
    ref = _two_adapters()
    assert torch.allclose(out_of(sm), out_of(ref), atol=1e-5)


def test_merge_and_unload_of_a_merged_model_is_atomic(steps) -> None:
    def build():
        sm = _two_adapters()
        Swift.merge(sm)
        return sm, lambda: Swift.merge_and_unload(sm, adapter_name="a")

    _, sm = _fail_everywhere(steps, build)
    assert sorted(sm.adapters) == ["b"]


def test_load_state_dict_is_atomic(steps) -> None:
    new_state = _two_adapters(seed=9).state_dict(adapter_name="a", save_extra_states=False)

    def build():
        sm = _two_adapters()
        return sm, lambda: sm.load_state_dict(new_state, adapter_name="a")

    _, sm = _fail_everywhere(steps, build)
    got = sm.state_dict(adapter_name="a", save_extra_states=False)
    assert all(torch.equal(got[k], new_state[k]) for k in new_state)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    src = _two_adapters(seed=11)
    with torch.no_grad():
        src.model.model.norm.weight.add_(0.25)
    src.save_pretrained(tmp_path / "ck")
    shutil.move(tmp_path / "ck" / "a", tmp_path / "ck" / "c")  # load as new names next to 'a' and 'b'
    shutil.move(tmp_path / "ck" / "b", tmp_path / "ck" / "d")
    return tmp_path / "ck"


def test_from_pretrained_onto_a_swift_model_is_atomic(steps, saved: Path) -> None:
    def build():
        sm = _two_adapters()
        return sm, lambda: Swift.from_pretrained(sm, str(saved))

    total, sm = _fail_everywhere(steps, build)
    assert sorted(sm.adapters) == ["a", "b", "c", "d"]
    print(f"from_pretrained: {total} steps")


def test_from_pretrained_onto_a_plain_model_is_atomic(steps, saved: Path) -> None:
    def build():
        plain = tiny_llama(num_hidden_layers=1)
        return plain, lambda: Swift.from_pretrained(plain, str(saved))

    _fail_everywhere(steps, build)


@pytest.mark.parametrize("where", ["cpu", "meta"])
def test_set_active_adapters_with_offload_is_atomic(steps, where: str) -> None:
    def build():
        sm = _two_adapters()
        return sm, lambda: sm.set_active_adapters(["a"], offload=where)

    _, sm = _fail_everywhere(steps, build)
    assert sm.active_adapters == {"a"} and sm.adapters["b"].offload == where


def test_set_active_adapters_reloading_an_offloaded_adapter_is_atomic(steps) -> None:
    def build():
        sm = _two_adapters()
        sm.set_active_adapters(["a"], offload="meta")
        return sm, lambda: sm.set_active_adapters(["b"], offload="meta")

    _, sm = _fail_everywhere(steps, build)
    assert sm.active_adapters == {"b"} and sm.adapters["a"].offload == "meta" and sm.adapters["b"].offload is None


def test_set_active_adapters_without_offload_is_atomic(steps) -> None:
    # a switch to an adapter set whose routes are not cached builds them: fail at every step of that
    def build():
        sm = _two_adapters()
        sm._state.route_cache.clear()  # (loading seeds each adapter's own routes; see the next test)
        return sm, lambda: sm.set_active_adapters(["b"])

    _, sm = _fail_everywhere(steps, build)
    assert sm.active_adapters == {"b"}


def test_switching_to_a_loaded_adapter_does_no_work_that_could_fail(steps) -> None:
    # loading an adapter caches its routes, so switching to it is a lookup: no torch op, no route build
    sm = _two_adapters()
    before = out_of(sm)
    assert steps(lambda: sm.set_active_adapters(["b"]), None) == 0
    assert sm.active_adapters == {"b"}
    sm.set_active_adapters(["a", "b"])
    assert torch.equal(out_of(sm), before)
