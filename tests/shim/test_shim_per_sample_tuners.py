"""``SwiftModel(..., adapter_names=...)`` with adapters of several tuners in one batch (the general sub-batch path).

Each sample must equal its adapter run alone (``functuner.apply`` on the wrapped model; ``__base__``: the bare
model), in ``forward`` and in ``generate``; the shim's stack cache must be reused while nothing changes and
see an in-place update of an adapter tensor; gradients reach the adapters of the samples that used them.
The PEFT parity of each tuner's per-sample forward is ``tests/tuners/test_per_sample_all.py``.
"""

from __future__ import annotations

import torch
from conftest import tiny_llama

import functuner as ft
from functuner import LoRAConfig, Swift
from functuner.tuners.ia3 import IA3Config
from functuner.tuners.lokr import LoKrConfig

NAMES = ["ia3", "lora", "__base__", "lokr", "lora"]
X = torch.randint(0, 64, (len(NAMES), 6), generator=torch.Generator().manual_seed(0))


def _model() -> ft.SwiftModel:
    configs = {
        "lora": LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
        "ia3": IA3Config(
            target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
        "lokr": LoKrConfig(target_modules=["o_proj"], r=2, init_weights=False),
    }
    return Swift.prepare_model(tiny_llama(), configs).eval()


def _alone(sm: ft.SwiftModel, names: list[str], ids: torch.Tensor) -> torch.Tensor:
    bare = tiny_llama()
    rows = [
        (
            bare(ids[i : i + 1])
            if n == "__base__"
            else ft.apply(sm.base_model, sm.adapters[n].params, (ids[i : i + 1],))
        ).logits
        for i, n in enumerate(names)
    ]
    return torch.cat(rows)


def test_forward_mixes_tuners_and_reuses_the_stack() -> None:
    sm = _model()
    with torch.no_grad():
        out = sm(X, adapter_names=NAMES).logits
        torch.testing.assert_close(out, _alone(sm, NAMES, X), atol=1e-5, rtol=1e-5)
        stack = sm._state.mixed.stack
        again = sm(X, adapter_names=NAMES).logits
    assert sm._state.mixed.stack is stack  # nothing changed: the cached stack serves the second call
    torch.testing.assert_close(again, out, atol=0, rtol=0)
    vec = sm.adapters["ia3"].tensors["model.layers.0.mlp.down_proj.ia3_l.ia3"]
    with torch.no_grad():
        vec.mul_(2.0)  # an in-place write the next call must see
        changed = sm(X, adapter_names=NAMES).logits
        torch.testing.assert_close(changed, _alone(sm, NAMES, X), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed[0], out[0])
    torch.testing.assert_close(changed[1:], out[1:], atol=1e-5, rtol=1e-5)


def test_generate_runs_each_prompt_with_its_adapter() -> None:
    sm = _model()
    names = ["lokr", "ia3", "__base__"]
    ids = X[:3]
    with torch.no_grad():
        mixed = sm.generate(ids, adapter_names=names, max_new_tokens=3, do_sample=False)
        for i, n in enumerate(names):
            if n == "__base__":
                alone = tiny_llama().generate(ids[i : i + 1], max_new_tokens=3, do_sample=False)
            else:
                sm.set_active_adapters([n])
                alone = sm.generate(ids[i : i + 1], max_new_tokens=3, do_sample=False)
            assert torch.equal(mixed[i : i + 1], alone), (i, n)


def test_gradients_reach_the_adapters_of_their_samples() -> None:
    sm = _model()
    loss = sm(X, adapter_names=NAMES).logits.square().mean()
    loss.backward()
    grads = {n: [t.grad for t in sm.adapters[n].tensors.values()] for n in ("ia3", "lokr")}
    assert all(g is not None and g.abs().sum() > 0 for n in grads for g in grads[n])
    leaves = {n: {k: v.detach().clone().requires_grad_(True) for k, v in sm.adapters[n].params.items()} for n in grads}
    rows = []
    for i, n in enumerate(NAMES):
        p = sm.adapters[n].params.replace(leaves[n]) if n in leaves else None
        out = (
            ft.apply(sm.base_model, p if p is not None else sm.adapters[n].params, (X[i : i + 1],))
            if n != "__base__"
            else None
        )
        rows.append(out.logits if out is not None else tiny_llama()(X[i : i + 1]).logits)
    ref = torch.cat(rows).square().mean()
    ref_g = torch.autograd.grad(ref, [t for n in leaves for t in leaves[n].values()])
    for got, want in zip([g for n in grads for g in grads[n]], ref_g, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
