"""torch.func transforms through ``functuner.apply``: grad, vmap over stacked params, per-sample grads.

Also checks that training plain LoRA through ``apply`` never materialises a
full-size ``(out, in)`` weight delta: a ``TorchDispatchMode`` records every
tensor the forward allocates.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import functuner as ft
from tests.conftest import tiny_bert, tiny_llama

# vmap falls back to a loop for CPU flash attention; correct, only slower
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _ids(shape=(3, 6), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def _lora(model, seed: int = 0, **kw) -> ft.TunerParams:
    cfg = dict(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)
    cfg.update(kw)
    return ft.init(model, ft.LoRAConfig(**cfg), generator=seed)


def _max_diff(a: ft.TunerParams, b: ft.TunerParams) -> float:
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("use_dora", [False, True])
def test_func_grad_equals_autograd(use_dora: bool) -> None:
    model = tiny_llama()
    p = _lora(model, use_dora=use_dora)
    ids = _ids()

    def loss(params: ft.TunerParams) -> torch.Tensor:
        return ft.apply(model, params, kwargs={"input_ids": ids, "labels": ids}).loss

    g = torch.func.grad(loss)(p)
    assert isinstance(g, ft.TunerParams) and list(g) == list(p) and g.config == p.config
    leaves = p.map(lambda t: t.detach().clone().requires_grad_(True))
    ref = torch.autograd.grad(loss(leaves), list(leaves.values()))
    for (k, a), b in zip(g.items(), ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert all(a.abs().max() > 0 for a in g.values())
    # a step along -grad lowers the loss (the gradient is a real descent direction)
    stepped = ft.tree_map(lambda t, d: t - 0.1 * d, p, g)
    assert loss(stepped) < loss(p)


@pytest.mark.parametrize("use_dora", [False, True])
def test_vmap_over_stacked_params_equals_loop(use_dora: bool) -> None:
    """Several adapters evaluated in one vmapped call give the same outputs as one call each."""
    model = tiny_llama()
    adapters = [_lora(model, seed=s, use_dora=use_dora) for s in range(3)]
    stacked = ft.tree_map(lambda *ts: torch.stack(ts), *adapters)
    assert stacked[next(iter(stacked))].shape[0] == 3
    ids = _ids()

    def logits(params: ft.TunerParams) -> torch.Tensor:
        return ft.apply(model, params, kwargs={"input_ids": ids}).logits

    with torch.no_grad():
        batched = torch.func.vmap(logits)(stacked)
        looped = torch.stack([logits(a) for a in adapters])
    assert batched.shape == (3, 3, 6, 64)
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=0)
    # the adapters really differ from each other
    assert (looped[0] - looped[1]).abs().max() > 1e-3


def test_vmap_over_params_and_inputs_together() -> None:
    """in_dims=(0, 0): adapter i runs on input i (a mixed-adapter batch)."""
    model = tiny_llama()
    adapters = [_lora(model, seed=s) for s in range(3)]
    stacked = ft.tree_map(lambda *ts: torch.stack(ts), *adapters)
    ids = _ids((3, 1, 5))

    def logits(params: ft.TunerParams, x: torch.Tensor) -> torch.Tensor:
        return ft.apply(model, params, kwargs={"input_ids": x}).logits

    with torch.no_grad():
        batched = torch.func.vmap(logits, in_dims=(0, 0))(stacked, ids)
        looped = torch.stack([logits(a, ids[i]) for i, a in enumerate(adapters)])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert_cls"])
def test_per_sample_grads_equal_loop(family: str) -> None:
    """``per_sample_grads`` (vmap of grad, in_dims=(None, 0, 0)) equals one grad call per sample (DP-SGD's basis)."""
    if family == "llama":
        model = tiny_llama()
        p = _lora(model)
        x = _ids((4, 6))
        y = x.clone()

        def loss(params: ft.TunerParams, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
            return ft.apply(model, params, kwargs={"input_ids": xs, "labels": ys}).loss
    else:
        model = tiny_bert(num_labels=3)
        p = ft.init(
            model,
            ft.LoRAConfig(
                r=2, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False
            ),
            generator=0,
        )
        x = _ids((4, 6))
        y = torch.tensor([0, 2, 1, 2])

        def loss(params: ft.TunerParams, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
            return ft.apply(model, params, kwargs={"input_ids": xs, "labels": ys}).loss

    psg = ft.per_sample_grads(loss, p, x, y)
    assert isinstance(psg, ft.TunerParams) and list(psg) == list(p)
    for k in p:
        assert psg[k].shape == (4, *p[k].shape), k
    for i in range(4):
        gi = torch.func.grad(loss)(p, x[i : i + 1], y[i : i + 1])
        assert _max_diff(psg.map(lambda t, i=i: t[i]), gi) < 1e-5
    # samples differ, so per-sample gradients differ (not one gradient broadcast)
    first = next(iter(p))
    assert (psg[first][0] - psg[first][1]).abs().max() > 1e-6
    # their mean is the batch gradient of the mean loss
    batch_grad = torch.func.grad(loss)(p, x, y)
    assert _max_diff(psg.map(lambda t: t.mean(0)), batch_grad) < 1e-5

    chunked = ft.per_sample_grads(loss, p, x, y, chunk_size=2)
    assert _max_diff(chunked, psg) < 1e-6


# ---------------------------------------------------------------------------
# the forward never forms B @ A
# ---------------------------------------------------------------------------
class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op allocates (view ops excluded: they allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.shapes.append((str(func), tuple(t.shape)))
        return out


def _weight_shaped(rec: AllocationRecorder, shapes: set[tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(op, s) for op, s in rec.shapes if s in shapes]


def test_training_forward_does_not_materialise_delta_weight() -> None:
    model = tiny_llama().train()
    p = _lora(model, r=3).map(lambda t: t.requires_grad_(True))
    shapes = set()
    for name, module in model.named_modules():
        if name.endswith(tuple(TARGETS)):
            out_f, in_f = module.weight.shape
            shapes |= {(out_f, in_f), (in_f, out_f)}
    assert shapes == {(32, 32), (16, 32), (32, 16), (64, 32), (32, 64)}  # v_proj: 2 kv heads of 8
    ids = _ids((2, 7))  # 14 tokens: no activation has a weight's shape

    rec = AllocationRecorder()
    with rec:
        loss = ft.apply(model, p, kwargs={"input_ids": ids, "labels": ids}).loss
    assert len(rec.shapes) > 50  # the recorder saw the forward
    assert _weight_shaped(rec, shapes) == []

    # the backward produces grads for A and B only, never an (out, in) gradient
    rec_b = AllocationRecorder()
    with rec_b:
        torch.autograd.grad(loss, list(p.values()))
    assert _weight_shaped(rec_b, shapes) == []

    # control: the recorder does catch a materialised delta
    rec_c = AllocationRecorder()
    a, b = (
        "model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "model.layers.0.self_attn.q_proj.lora_B.default.weight",
    )
    with rec_c:
        ft.lora_delta(p[a], p[b], 2.0)
    assert _weight_shaped(rec_c, shapes) != []


def test_per_sample_grads_with_dropout_in_training_mode() -> None:
    """randomness='same': one generator-drawn mask shared by all samples, equal to a loop reseeding per sample."""
    model = tiny_llama().train()
    p = _lora(model, lora_dropout=0.3)
    x = _ids((3, 5))

    def loss(params: ft.TunerParams, xs: torch.Tensor, seed: int = 11) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return ft.apply(model, params, kwargs={"input_ids": xs, "labels": xs}, generator=gen).loss

    with pytest.raises(RuntimeError, match="randomness"):
        ft.per_sample_grads(loss, p, x)
    psg = ft.per_sample_grads(loss, p, x, randomness="same")
    for i in range(3):
        gi = torch.func.grad(loss)(p, x[i : i + 1])
        assert _max_diff(psg.map(lambda t, i=i: t[i]), gi) < 1e-5
    # the mask matters: another seed gives other gradients
    other = torch.func.grad(lambda q, xs: loss(q, xs, seed=12))(p, x[:1])
    assert _max_diff(psg.map(lambda t: t[0]), other) > 1e-5


@pytest.mark.parametrize("use_dora", [False, True])
def test_autograd_saves_no_weight_sized_tensor_but_the_base_weights(use_dora: bool) -> None:
    """What the backward keeps: weight-shaped saved tensors are only the base model's own weights (or views).

    DoRA needs the row norms of ``W + s B A`` (detached); computing them may take
    one weight-sized temporary per module in the forward (at most one, checked),
    which is freed at once: never kept for the backward.
    """
    model = tiny_llama().train()
    p = _lora(model, r=3, use_dora=use_dora).map(lambda t: t.requires_grad_(True))
    adapted = [m for n, m in model.named_modules() if n.endswith(tuple(TARGETS))]
    shapes = {s for m in adapted for s in (tuple(m.weight.shape), tuple(m.weight.shape)[::-1])}
    base_storages = {w.untyped_storage().data_ptr() for w in model.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    ids = _ids((2, 7))
    rec = AllocationRecorder()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rec:
        loss = ft.apply(model, p, kwargs={"input_ids": ids, "labels": ids}).loss
    assert saved  # the hook saw the graph
    weight_sized = [t for t in saved if tuple(t.shape) in shapes]
    foreign = [(tuple(t.shape), t.grad_fn) for t in weight_sized if t.untyped_storage().data_ptr() not in base_storages]
    assert foreign == []
    temporaries = _weight_shaped(rec, shapes)
    assert len(temporaries) <= (len(adapted) if use_dora else 0), temporaries
    grads = torch.autograd.grad(loss, list(p.values()))
    assert all(g.shape == t.shape for g, t in zip(grads, p.values(), strict=True))


def test_vmap_over_stacked_params_with_biases_and_modules_to_save() -> None:
    """Overrides (bias='all' on non-adapted modules, modules_to_save copies) batch under vmap too."""
    model = tiny_bert(num_labels=3)
    cfg = ft.LoRAConfig(
        r=2, target_modules=["query", "value"], modules_to_save=["classifier"], bias="all", init_lora_weights=False
    )
    adapters = [ft.init(model, cfg, generator=s).map(lambda t, s=s: t + 0.01 * s) for s in range(3)]
    stacked = ft.tree_map(lambda *ts: torch.stack(ts), *adapters)
    ids = _ids((2, 5))

    def logits(params: ft.TunerParams) -> torch.Tensor:
        return ft.apply(model, params, kwargs={"input_ids": ids}).logits

    with torch.no_grad():
        batched = torch.func.vmap(logits)(stacked)
        looped = torch.stack([logits(a) for a in adapters])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=0)
    assert (looped[0] - looped[2]).abs().max() > 1e-3
