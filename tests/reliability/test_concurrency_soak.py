"""Concurrency soak (issue 8, item 3): many threads, several adapters, no cross-talk.

* 8 threads share one SwiftModel with 4 adapters under ``USE_UNIQUE_THREAD=0``
  (per-thread activation) and, on a second copy of the base model, the
  functional :func:`functuner.apply`.  Each thread makes 300 forwards, each
  with a random adapter, input and API, with random yields in between; every
  output must equal the single-thread reference for that (adapter, input)
  bitwise: zero mismatches.
* 8 threads save to 8 directories at once, then 8 threads load them at once:
  every checkpoint loads and gives its model's outputs.
* 4 threads save 4 different models to the *same* directory at once: it ends
  up holding exactly one of them, complete.

``FUNCTUNER_FULL=1`` runs 3,000 forwards per thread.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from rel_common import tiny_llama

import functuner as ft
from functuner import LoRAConfig, Swift

N_THREADS, N_ADAPTERS = 8, 4
N_CALLS = 3000 if os.environ.get("FUNCTUNER_FULL") == "1" else 300
INPUTS = [torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(s)) for s in range(3)]
NAMES = [f"a{i}" for i in range(N_ADAPTERS)]


def _shim(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("USE_UNIQUE_THREAD", "0")
    model = tiny_llama(num_hidden_layers=1)
    torch.manual_seed(3)
    cfgs = {
        n: LoRAConfig(r=2, lora_alpha=4 * (i + 1), target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        for i, n in enumerate(NAMES)
    }
    return Swift.prepare_model(model, cfgs)


def _run_threads(fn, n: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


def test_eight_threads_four_adapters_shim_and_functional(monkeypatch: pytest.MonkeyPatch) -> None:
    sm = _shim(monkeypatch)
    plain = tiny_llama(num_hidden_layers=1)  # the same base weights, never wrapped
    params = {n: sm.adapters[n].params.detach() for n in NAMES}
    refs: dict[tuple[str, int], torch.Tensor] = {}
    with torch.no_grad():
        for n in NAMES:
            sm.set_active_adapters([n])
            for j, x in enumerate(INPUTS):
                refs[n, j] = sm(input_ids=x).logits
                assert torch.equal(ft.apply(plain, params[n], kwargs={"input_ids": x}).logits, refs[n, j])
        sm.set_active_adapters(NAMES)  # what a thread that never chose sees
    distinct = [refs[n, 0] for n in NAMES]
    assert all((a - b).abs().max() > 1e-3 for i, a in enumerate(distinct) for b in distinct[i + 1 :])

    mismatches: list[tuple[int, int, str, str, int]] = []
    counts = [0] * N_THREADS
    barrier = threading.Barrier(N_THREADS)

    def worker(t: int) -> None:
        rng = random.Random(1000 + t)
        barrier.wait()
        for i in range(N_CALLS):
            n, j, api = rng.choice(NAMES), rng.randrange(len(INPUTS)), rng.choice(("shim", "apply"))
            with torch.no_grad():
                if api == "shim":
                    sm.set_active_adapters([n])
                    if rng.random() < 0.3:
                        time.sleep(0)  # let another thread switch its adapters in between
                    out = sm(input_ids=INPUTS[j]).logits
                else:
                    out = ft.apply(plain, params[n], kwargs={"input_ids": INPUTS[j]}).logits
            if not torch.equal(out, refs[n, j]):
                mismatches.append((t, i, n, api, j))
            counts[t] += 1
            if rng.random() < 0.1:
                time.sleep(0)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: more interleavings
    try:
        errors = _run_threads(worker, N_THREADS)
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
    assert counts == [N_CALLS] * N_THREADS
    assert mismatches == [], f"{len(mismatches)} mismatches, first: {mismatches[:5]}"
    # the main thread's own choice was never disturbed by the workers'
    assert sm.active_adapters == set(NAMES)


def _model(seed: int):
    model = tiny_llama(num_hidden_layers=1)
    torch.manual_seed(seed)
    return Swift.prepare_model(
        model, {n: LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False) for n in NAMES[:2]}
    )


def _out(m) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=INPUTS[0]).logits


def test_concurrent_saves_and_loads(tmp_path: Path) -> None:
    models = [_model(seed) for seed in range(N_THREADS)]
    expected = [_out(m) for m in models]
    errors = _run_threads(lambda i: [models[i].save_pretrained(tmp_path / f"ck{i}") for _ in range(3)], N_THREADS)
    assert not errors, errors[:3]
    loaded: dict[int, torch.Tensor] = {}
    bases = [tiny_llama(num_hidden_layers=1) for _ in range(N_THREADS)]  # built here: torch's global RNG is shared

    def load(i: int) -> None:
        loaded[i] = _out(Swift.from_pretrained(bases[i], str(tmp_path / f"ck{i}")))

    errors = _run_threads(load, N_THREADS)
    assert not errors, errors[:3]
    for i in range(N_THREADS):
        assert torch.equal(loaded[i], expected[i]), f"checkpoint {i} came back different"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"ck{i}" for i in range(N_THREADS))


def test_concurrent_saves_to_one_directory_leave_one_complete_checkpoint(tmp_path: Path) -> None:
    models = [_model(seed) for seed in range(4)]
    expected = [_out(m) for m in models]
    target = tmp_path / "shared"
    errors = _run_threads(lambda i: models[i].save_pretrained(target), 4)
    assert not errors, errors[:3]
    got = _out(Swift.from_pretrained(tiny_llama(num_hidden_layers=1), str(target)))
    assert sum(torch.equal(got, e) for e in expected) == 1
