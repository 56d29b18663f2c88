"""Isolation: concurrent calls on one model each see only their own params.

Two threads call ``apply`` on one shared model with different params 200 times
each and must always get their own (precomputed, sequential) result; asyncio
tasks interleaving inside a routed block must not see each other's routes; an
exception inside a call leaves no routes behind.
"""

from __future__ import annotations

import asyncio
import threading

import torch

import functuner as ft
from functuner.core.routing import current_routes, routed
from tests.conftest import tiny_llama

N_CALLS = 200


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to 1e-6 (the adapters' outputs differ by > 1e-2, so this cannot confuse them)."""
    return bool(torch.allclose(a, b, atol=1e-6, rtol=0))


def _setup():
    model = tiny_llama()
    cfg = ft.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    params = [ft.init(model, cfg, generator=s, adapter_name=f"a{s}") for s in range(2)]
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        expected = [ft.apply(model, p, kwargs={"input_ids": ids}).logits for p in params]
    # the two adapters give clearly different outputs, both different from the base
    assert (expected[0] - expected[1]).abs().max() > 1e-2
    assert min((e - base).abs().max() for e in expected) > 1e-2
    return model, params, ids, base, expected


def test_two_threads_each_get_their_own_result() -> None:
    model, params, ids, base, expected = _setup()
    barrier = threading.Barrier(2)
    wrong = [0, 0]
    done = [0, 0]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(N_CALLS):
                    out = ft.apply(model, params[i], kwargs={"input_ids": ids}).logits
                    wrong[i] += not _same(out, expected[i])
                    done[i] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert done == [N_CALLS, N_CALLS]
    assert wrong == [0, 0]
    # afterwards the model is its plain self again
    assert current_routes() is None
    with torch.no_grad():
        assert _same(model(input_ids=ids).logits, base)


def test_thread_with_params_and_thread_without_params() -> None:
    """A plain forward in one thread is never touched by another thread's adapter."""
    model, params, ids, base, expected = _setup()
    barrier = threading.Barrier(2)
    wrong = {"adapter": 0, "plain": 0}

    def adapter_worker() -> None:
        barrier.wait()
        with torch.no_grad():
            for _ in range(N_CALLS):
                wrong["adapter"] += not _same(ft.apply(model, params[0], kwargs={"input_ids": ids}).logits, expected[0])

    def plain_worker() -> None:
        barrier.wait()
        with torch.no_grad():
            for _ in range(N_CALLS):
                wrong["plain"] += not _same(model(input_ids=ids).logits, base)

    threads = [threading.Thread(target=adapter_worker), threading.Thread(target=plain_worker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == {"adapter": 0, "plain": 0}


def test_asyncio_tasks_interleaving_inside_routed_blocks() -> None:
    """Each task sets its routes, yields to the other task, then runs the model: it still sees its own routes."""
    model, params, ids, base, expected = _setup()
    routes = [ft.functional.bind_routes(model, p) for p in params]
    order: list[int] = []

    async def task(i: int) -> int:
        wrong = 0
        for _ in range(20):
            with routed(routes[i]):
                order.append(i)
                await asyncio.sleep(0)  # the other task runs here, inside its own routed block
                with torch.no_grad():
                    wrong += not _same(model(input_ids=ids).logits, expected[i])
        return wrong

    async def main() -> list[int]:
        return list(await asyncio.gather(task(0), task(1)))

    assert asyncio.run(main()) == [0, 0]
    # the tasks really interleaved
    assert any(a != b for a, b in zip(order, order[1:], strict=False))
    with torch.no_grad():
        assert _same(model(input_ids=ids).logits, base)


def test_asyncio_to_thread_calls() -> None:
    model, params, ids, _, expected = _setup()

    def call(i: int) -> bool:
        with torch.no_grad():
            return _same(ft.apply(model, params[i], kwargs={"input_ids": ids}).logits, expected[i])

    async def main() -> list[bool]:
        return list(await asyncio.gather(*(asyncio.to_thread(call, i % 2) for i in range(40))))

    assert all(asyncio.run(main()))


def test_exception_inside_call_leaves_no_routes() -> None:
    model, params, ids, base, _ = _setup()
    bad_ids = torch.full((1, 5), 10_000)  # out of the vocabulary: the embedding raises
    try:
        ft.apply(model, params[0], kwargs={"input_ids": bad_ids})
    except (IndexError, RuntimeError):
        pass
    else:
        raise AssertionError("an out-of-vocabulary id should raise")
    assert current_routes() is None
    with torch.no_grad():
        assert _same(model(input_ids=ids).logits, base)


def test_two_threads_training_get_their_own_gradients() -> None:
    """Forward and backward in two threads at once: each thread's gradients are those of its own params."""
    model, params, ids, _, _ = _setup()
    model.train()  # no dropout configured: training mode changes nothing random

    def loss(p: ft.TunerParams) -> torch.Tensor:
        return ft.apply(model, p, kwargs={"input_ids": ids, "labels": ids}).loss

    expected = [torch.func.grad(loss)(p) for p in params]
    first = next(iter(params[0]))
    assert (expected[0][first] - expected[1][first.replace(".a0.", ".a1.")]).abs().max() > 1e-4
    barrier = threading.Barrier(2)
    wrong = [0, 0]

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(50):
            leaves = params[i].map(lambda t: t.detach().clone().requires_grad_(True))
            grads = torch.autograd.grad(loss(leaves), list(leaves.values()))
            wrong[i] += not all(_same(g, expected[i][k]) for g, k in zip(grads, leaves, strict=True))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0, 0]


def test_remove_slots_removes_every_slot_kind_including_method_slots() -> None:
    """Forward slots and the Adapter tuner's method slots all go; the model computes the base again, unslotted."""
    from functuner.core.routing import MethodSlot, has_slot, remove_slots
    from tests.conftest import tiny_bert

    model = tiny_bert()
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
    layers = [f"encoder.layer.{i}" for i in range(2)]
    cfg = ft.AdapterConfig(dim=32, target_modules=r".*layer\.\d+$", method_name="feed_forward_chunk", adapter_length=4)
    lora = ft.LoRAConfig(r=2, target_modules=["query"], init_lora_weights=False)
    params = [ft.init(model, c, generator=0, adapter_name=n) for c, n in ((cfg, "ad"), (lora, "lo"))]
    with torch.no_grad():
        adapted = ft.apply(model, params, kwargs={"input_ids": ids}).last_hidden_state
    assert not torch.allclose(adapted, base)
    method_slots = [
        m
        for name in layers
        if isinstance((m := model.get_submodule(name)).__dict__.get("feed_forward_chunk"), MethodSlot)
    ]
    assert len(method_slots) == 2  # the Adapter tuner installed its method slots
    slotted = [m for m in model.modules() if has_slot(m)]
    assert slotted  # and LoRA its forward slots
    assert remove_slots(model) == len(slotted) + len(method_slots)
    assert not any(has_slot(m) for m in model.modules())
    assert not any(isinstance(v, MethodSlot) for m in model.modules() for v in m.__dict__.values())
    assert remove_slots(model) == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, base)
