"""Distributed training of tuner params with torch.distributed: DDP, FSDP2, rank-0 checkpoints.

Two CPU processes (gloo backend) are started once per module with
``torch.multiprocessing.spawn``; they run every scenario in turn, each in its
own process group (a ``FileStore`` in a temporary folder: no ports), torn down
with ``destroy_process_group`` at the end of the scenario.  Each rank writes
its results to safetensors files; the tests below compare them with a
single-process run in this (pytest) process, on the same global batch:
losses and tuner params after ``STEPS`` SGD steps must agree to 1e-5 relative
(fp32); 1e-6 for a ``SwiftModel`` under plain ``fully_shard`` (PEFT's LoRA is within 5e-7 in the
same setup).

A scenario that raises on a rank records the traceback in a file and the
matching test fails with it; collectives time out after ``PG_TIMEOUT`` so a
one-sided failure cannot hang the suite.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import functuner as ft
from functuner import distributed as ftd
from functuner.errors import CheckpointError

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORLD = 2
STEPS = 3
LR = 0.5
GLOBAL_BATCH = 4
SEQ = 16
RTOL = 1e-5
PG_TIMEOUT = datetime.timedelta(seconds=120)  # generous: CI machines may be loaded


# ---------------------------------------------------------------------------
# the shared setup: same model, params and batch on every rank and in the reference
# ---------------------------------------------------------------------------
def _setup(use_dora: bool):
    from conftest import tiny_llama

    model = tiny_llama(seed=0)
    model.requires_grad_(False)
    config = ft.LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora)
    params = ft.init(model, config, generator=0)
    ids = torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return model, params, ids


def _loss(params, model, ids):
    return ft.apply(model, params, (ids,), {"labels": ids}).loss


def _sgd(params, grads):
    return ft.TunerParams({k: (params[k] - LR * grads[k]).detach() for k in params}, params.config, params.adapter_name)


def _train_single_process(use_dora: bool):
    """The reference: one process, the whole global batch, torch.func gradients."""
    model, params, ids = _setup(use_dora)
    losses = []
    for _ in range(STEPS):
        grads, loss = torch.func.grad_and_value(_loss)(params, model, ids)
        params = _sgd(params, grads)
        losses.append(loss.item())
    return model, params, losses


def _local(ids: torch.Tensor, rank: int) -> torch.Tensor:
    per = GLOBAL_BATCH // WORLD
    return ids[rank * per : (rank + 1) * per]


# ---------------------------------------------------------------------------
# scenarios run on every rank (inside the spawned processes)
# ---------------------------------------------------------------------------
def _write(out: pathlib.Path, name: str, rank: int, params, losses, **extra: torch.Tensor) -> None:
    tensors = {k: v.detach().contiguous() for k, v in params.items()}
    tensors["__losses__"] = torch.tensor(losses, dtype=torch.float64)
    tensors.update({f"__{k}__": v.contiguous() for k, v in extra.items()})
    save_file(tensors, str(out / f"{name}.rank{rank}.safetensors"))


def _scenario_ddp_functional(rank: int, out: pathlib.Path) -> None:
    """torch.func gradients on the local half batch, averaged with all_reduce_grads; rank-0 checkpoint."""
    model, params, ids = _setup(False)
    local = _local(ids, rank)
    losses = []
    for _ in range(STEPS):
        grads, loss = torch.func.grad_and_value(_loss)(params, model, local)
        grads = ftd.all_reduce_grads(grads)
        params = _sgd(params, grads)
        losses.append(ftd.all_reduce_grads(loss.detach()).item())
    folder = ftd.save_params_on_rank0(params, out / "ckpt")
    assert folder == out / "ckpt" / "default"
    loaded = ftd.load_params(out / "ckpt", like=params)  # every rank reads what rank 0 wrote
    assert loaded.keys() == params.keys()
    assert all(torch.equal(loaded[k], params[k]) for k in params), "loaded checkpoint differs from this rank's params"
    _write(out, "ddp_functional", rank, params, losses)


def _scenario_ddp_swift(rank: int, out: pathlib.Path) -> None:
    """The stateful shim: SwiftModel wrapped in DistributedDataParallel; loss.backward(); torch.optim.SGD."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, params, ids = _setup(False)
    swift, adapter = _swift_from_reference(model, params)
    ddp = DDP(swift)
    trainable = [p for p in ddp.parameters() if p.requires_grad]
    assert len(trainable) == len(params), "the shim should train exactly the LoRA tensors"
    opt = torch.optim.SGD(trainable, lr=LR)
    local = _local(ids, rank)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = ddp(local, labels=local).loss
        loss.backward()  # DDP averages the LoRA gradients across ranks here
        opt.step()
        losses.append(ftd.all_reduce_grads(loss.detach()).item())
    ftd.run_on_rank0(swift.save_pretrained, str(out / "swift_ckpt"))  # the shim's own save, rank 0 only
    _write(out, "ddp_swift", rank, adapter.params, losses)


def _swift_from_reference(model: torch.nn.Module, params: ft.TunerParams):
    """A SwiftModel whose adapter starts from the reference's init (the shim draws from the global RNG)."""
    swift = ft.SwiftModel(model, params.config)
    adapter = swift.adapters["default"]
    assert adapter.tensors.keys() == params.keys()
    with torch.no_grad():
        for k, p in adapter.tensors.items():
            p.copy_(params[k])
    return swift, adapter


def _shard(model: torch.nn.Module, per_linear: bool, tuner_keys: frozenset[str] = frozenset()):
    """fully_shard every decoder layer and the root; with ``per_linear`` every nn.Linear in a layer first.

    Returns (elements this rank holds, elements in all) of the base weights (``tuner_keys`` not counted).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        if per_linear:  # the adapted module is itself an FSDP unit: its slot must run before FSDP reshards it
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    fully_shard(module, mesh=mesh)
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local = total = 0
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), f"{name} is not sharded"
        if name not in tuner_keys:
            local += p.to_local().numel()
            total += p.numel()
    return local, total


def _scenario_fsdp2(rank: int, out: pathlib.Path, use_dora: bool, functional: bool) -> None:
    """Base weights sharded with fully_shard, tuner params replicated.

    LoRA runs with torch.func gradients and layer-level sharding; DoRA (whose
    slot reads ``module.weight``) with loss.backward() and every adapted Linear
    sharded on its own as well.
    """
    from torch.distributed.tensor import DTensor

    model, params, ids = _setup(use_dora)
    local_numel, total_numel = _shard(model, per_linear=use_dora)
    local = _local(ids, rank)
    losses = []
    for _ in range(STEPS):
        if functional:
            grads, loss = torch.func.grad_and_value(_loss)(params, model, local)
        else:
            leaves = params.map(lambda t: t.detach().requires_grad_(True))
            loss = _loss(leaves, model, local)
            loss.backward()
            grads = {k: v.grad for k, v in leaves.items()}
        grads = ftd.all_reduce_grads(grads)
        params = _sgd(params, grads)
        losses.append(ftd.all_reduce_grads(loss.detach()).item())
    name = f"fsdp2_{'dora' if use_dora else 'lora'}_{'functional' if functional else 'eager'}"
    extra = {"local_numel": torch.tensor(local_numel), "total_numel": torch.tensor(total_numel)}
    original = dict(model.named_parameters(remove_duplicate=False))
    full = ftd.merge_sharded(model, params, full=True)
    sharded = ftd.merge_sharded(model, params)
    changed = sorted(k for k in original if full[k] is not original[k])
    assert changed, "merge_sharded changed nothing"
    for k, t in original.items():
        if k not in changed:
            assert sharded[k] is t, f"{k} is not adapted but was not passed through"
            continue
        assert not isinstance(full[k], DTensor)
        assert isinstance(sharded[k], DTensor) and sharded[k].placements == t.placements, k
        assert sharded[k].to_local().shape == t.to_local().shape, k
        assert torch.equal(sharded[k].full_tensor(), full[k]), k
    extra.update({f"merged.{k}": full[k] for k in changed})
    _write(out, name, rank, params, losses, **extra)


_SMALL_CONFIG = ft.LoRAConfig(r=2, target_modules=["0", "2"], init_lora_weights="gaussian")


def _small() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def _train_fsdp2_swift(swift, ids: torch.Tensor, rank: int):
    """SGD on every trainable parameter the (sharded) model lists, as any FSDP2 user writes it; global-mean losses."""
    from torch.distributed.tensor import DTensor

    trainable = [p for p in swift.parameters() if p.requires_grad]
    assert trainable and all(isinstance(p, DTensor) for p in trainable), "fully_shard should shard the tuner params"
    opt = torch.optim.SGD(trainable, lr=LR)
    local = _local(ids, rank)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = swift(local, labels=local).loss
        loss.backward()  # FSDP2 reduce-scatters (averages) the tuner gradients into the sharded parameters
        opt.step()
        losses.append(ftd.all_reduce_grads(loss.detach()).item())
    return losses


def _scenario_fsdp2_swift(rank: int, out: pathlib.Path) -> None:
    """SwiftModel under plain FSDP2: fully_shard on the decoder layers and the root, nothing else.

    FSDP2 replaces the shim's tuner Parameters with sharded DTensors (and swaps the unsharded ones in around
    each layer's forward); the shim reads its tensors from the module tree, so it trains what the optimizer sees.
    """
    from torch.distributed.tensor import DTensor

    model, params, ids = _setup(False)
    swift, adapter = _swift_from_reference(model, params)
    local_numel, total_numel = _shard(model, per_linear=False, tuner_keys=frozenset(params))
    losses = _train_fsdp2_swift(swift, ids, rank)
    extra = {"local_numel": torch.tensor(local_numel), "total_numel": torch.tensor(total_numel)}
    # save_pretrained on sharded tensors would write one rank's slice: a typed error naming the fix, nothing written
    try:
        swift.save_pretrained(str(out / f"sharded_save_rank{rank}"))
    except CheckpointError as e:
        assert "sharded" in str(e) and "gather_params" in str(e), str(e)
    else:
        raise AssertionError("save_pretrained wrote sharded adapter tensors")
    assert not (out / f"sharded_save_rank{rank}").exists()
    full = ftd.gather_params(adapter.params)  # a collective: every rank gathers the sharded adapter whole
    assert all(not isinstance(v, DTensor) for v in full.values())
    ftd.save_params_on_rank0(full, out / "fsdp2_swift_ckpt")
    _write(out, "fsdp2_swift", rank, full, losses, **extra)


def _scenario_fsdp2_swift_reloaded(rank: int, out: pathlib.Path) -> None:
    """As above, after ``to_empty()`` and ``load_state_dict(..., assign=True)`` put new Parameter objects in the
    sharded model (FSDP2's meta-device / checkpoint-load flow): the shim follows them too."""
    from torch.distributed.tensor import DTensor

    model, params, ids = _setup(False)
    swift, adapter = _swift_from_reference(model, params)
    _shard(model, per_linear=False)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}  # incl. non-persistent ones (rotary inv_freq)
    before = {k: id(p) for k, p in model.named_parameters()}
    model.to_empty(device="cpu")
    with torch.no_grad():  # what a meta-device init re-computes: buffers that are no part of the state dict
        for k, b in buffers.items():
            model.get_buffer(k).copy_(b)
    model.load_state_dict(saved, assign=True)
    after = dict(model.named_parameters())
    assert all(id(after[k]) != before[k] for k in adapter.tensors), "assign=True should put new objects there"
    assert all(isinstance(p, DTensor) for p in after.values())
    losses = _train_fsdp2_swift(swift, ids, rank)
    _write(out, "fsdp2_swift_reloaded", rank, ftd.gather_params(adapter.params), losses)


def _scenario_collectives(rank: int, out: pathlib.Path) -> None:
    """Bucketed all-reduce over mixed dtypes, broadcast of rank-dependent init, rank-0-only calls."""
    grads = {
        "a": torch.full((3, 2), float(rank + 1)),
        "b": torch.arange(5, dtype=torch.bfloat16) * (rank + 1),
        "c": torch.tensor(2.0 * rank),
    }
    summed = ftd.all_reduce_grads(grads, average=False)
    mean = ftd.all_reduce_grads(grads)
    assert torch.equal(grads["a"], torch.full((3, 2), float(rank + 1))), "input was written to"
    mine = ft.init(_small(), _SMALL_CONFIG, generator=100 + rank)
    got = ftd.broadcast_params(mine)
    assert isinstance(got, ft.TunerParams) and got.config == mine.config

    marker = out / "rank0_calls.txt"

    def append_rank() -> str:
        with open(marker, "a") as f:
            f.write(str(dist.get_rank()))
        return "done"

    result = ftd.run_on_rank0(append_rank)
    assert result == ("done" if rank == 0 else None), result

    def fail() -> None:
        raise ValueError("disk full")

    try:
        ftd.run_on_rank0(fail)
    except ValueError as exc:
        assert rank == 0 and "disk full" in str(exc)
        raised = "ValueError"
    except RuntimeError as exc:
        assert rank == 1 and "rank 0" in str(exc)
        raised = "RuntimeError"
    else:
        raise AssertionError("run_on_rank0 swallowed the failure")
    (out / f"raised.rank{rank}.txt").write_text(raised)
    _write(
        out,
        "collectives",
        rank,
        got,
        [0.0],
        sum_a=summed["a"],
        sum_b=summed["b"],
        sum_c=summed["c"],
        mean_a=mean["a"],
        mean_b=mean["b"],
        mean_c=mean["c"],
    )


SCENARIOS = {
    "collectives": _scenario_collectives,
    "ddp_functional": _scenario_ddp_functional,
    "ddp_swift": _scenario_ddp_swift,
    "fsdp2_lora_functional": lambda r, o: _scenario_fsdp2(r, o, use_dora=False, functional=True),
    "fsdp2_dora_eager": lambda r, o: _scenario_fsdp2(r, o, use_dora=True, functional=False),
    "fsdp2_swift": _scenario_fsdp2_swift,
    "fsdp2_swift_reloaded": _scenario_fsdp2_swift_reloaded,
}


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    out = pathlib.Path(out_dir)
    for name in SCENARIOS:
        store = dist.FileStore(str(out / f"store.{name}"), WORLD)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)
        try:
            SCENARIOS[name](rank, out)
        except Exception:
            (out / f"{name}.rank{rank}.error").write_text(traceback.format_exc())
        finally:
            dist.destroy_process_group()
        assert not dist.is_initialized()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def reference_lora():
    return _train_single_process(use_dora=False)


@pytest.fixture(scope="module")
def reference_dora():
    return _train_single_process(use_dora=True)


def _results(out: pathlib.Path, name: str) -> list[dict[str, torch.Tensor]]:
    errors = [p.read_text() for p in sorted(out.glob(f"{name}.rank*.error"))]
    assert not errors, f"scenario {name} failed on a rank:\n" + "\n".join(errors)
    return [load_file(str(out / f"{name}.rank{r}.safetensors")) for r in range(WORLD)]


def _assert_close_rel(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """Elementwise within ``rtol`` relative to the tensor's scale (max |want|), fp32."""
    scale = want.abs().max().item() or 1.0
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs diff {err:.3e} exceeds {rtol} x scale {scale:.3e}"


def _assert_half_of_base(res: dict[str, torch.Tensor]) -> None:
    """Each rank holds exactly half of the base weights at rest (every dim 0 of this model is even)."""
    from conftest import tiny_llama

    total = sum(p.numel() for p in tiny_llama().parameters())
    assert res["__total_numel__"].item() == total
    assert res["__local_numel__"].item() == total // WORLD


def _assert_matches_reference(
    out: pathlib.Path, name: str, reference, rtol: float = RTOL
) -> list[dict[str, torch.Tensor]]:
    _, ref_params, ref_losses = reference
    results = _results(out, name)
    for rank, res in enumerate(results):
        losses = res["__losses__"].tolist()
        assert len(losses) == STEPS
        for step, (a, b) in enumerate(zip(losses, ref_losses, strict=True)):
            assert math.isclose(a, b, rel_tol=rtol), f"{name} rank {rank} step {step}: loss {a} vs single-process {b}"
        tuner = {k: v for k, v in res.items() if not k.startswith("__")}
        assert tuner.keys() == set(ref_params), f"{name}: params keys differ"
        for k in ref_params:
            _assert_close_rel(tuner[k], ref_params[k], f"{name} rank {rank} {k}", rtol)
    # training moved the params (a test that passes on untrained params would prove nothing)
    _, init_params, _ = _setup(ref_params.config.use_dora)
    assert any(not torch.allclose(ref_params[k], init_params[k]) for k in ref_params)
    return results


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------
def test_ddp_functional_matches_single_process(runs, reference_lora) -> None:
    _assert_matches_reference(runs, "ddp_functional", reference_lora)


def test_ddp_swift_model_matches_single_process(runs, reference_lora) -> None:
    _assert_matches_reference(runs, "ddp_swift", reference_lora)
    # SwiftModel.save_pretrained run through run_on_rank0 wrote the trained adapter
    from functuner.io.checkpoint import read_adapter

    saved = read_adapter(runs / "swift_ckpt" / "default", "default")
    ref_params = reference_lora[1]
    assert saved.state.keys() == ref_params.keys()
    for k in ref_params:
        _assert_close_rel(saved.state[k], ref_params[k], f"save_pretrained {k}")


def test_fsdp2_lora_functional_matches_single_process(runs, reference_lora) -> None:
    results = _assert_matches_reference(runs, "fsdp2_lora_functional", reference_lora)
    for res in results:
        _assert_half_of_base(res)


def test_fsdp2_swift_model_matches_single_process(runs, reference_lora) -> None:
    """Plain fully_shard (layers + root) on a SwiftModel trains exactly like one process (PEFT: 5e-7 here)."""
    results = _assert_matches_reference(runs, "fsdp2_swift", reference_lora, rtol=1e-6)
    for res in results:
        _assert_half_of_base(res)
    # gather_params + save_params_on_rank0 wrote the trained adapter, whole
    loaded = ftd.load_params(runs / "fsdp2_swift_ckpt", like=reference_lora[1])
    for k, v in reference_lora[1].items():
        _assert_close_rel(loaded[k], v, f"checkpoint {k}", 1e-6)


def test_fsdp2_swift_model_after_to_empty_and_assign_matches_single_process(runs, reference_lora) -> None:
    _assert_matches_reference(runs, "fsdp2_swift_reloaded", reference_lora, rtol=1e-6)


def test_fsdp2_dora_eager_matches_single_process(runs, reference_dora) -> None:
    results = _assert_matches_reference(runs, "fsdp2_dora_eager", reference_dora)
    for res in results:
        _assert_half_of_base(res)


@pytest.mark.parametrize(
    ("name", "ref"), [("fsdp2_lora_functional", "reference_lora"), ("fsdp2_dora_eager", "reference_dora")]
)
def test_merge_sharded_equals_single_process_merge(runs, request, name, ref) -> None:
    model, ref_params, _ = request.getfixturevalue(ref)
    want = ft.merge(model, ref_params)
    merged = {k[len("__merged.") : -2]: v for k, v in _results(runs, name)[0].items() if k.startswith("__merged.")}
    base = dict(model.named_parameters())
    changed = {k for k in base if not torch.equal(want[k], base[k])}
    assert set(merged) == changed
    for k, v in merged.items():
        _assert_close_rel(v, want[k], f"merged {k}")


def test_checkpoint_from_rank0_equals_single_process_checkpoint(runs, reference_lora, tmp_path) -> None:
    _, ref_params, _ = reference_lora
    ftd.save_params_on_rank0(ref_params, tmp_path)  # no process group: a plain save
    multi, single = runs / "ckpt" / "default", tmp_path / "default"
    assert sorted(p.name for p in (runs / "ckpt").iterdir()) == ["default"], "temp folders left behind"
    assert (
        sorted(p.name for p in multi.iterdir())
        == sorted(p.name for p in single.iterdir())
        == ["adapter_config.json", "adapter_model.safetensors"]
    )
    assert json.loads((multi / "adapter_config.json").read_text()) == json.loads(
        (single / "adapter_config.json").read_text()
    )
    a, b = load_file(str(multi / "adapter_model.safetensors")), load_file(str(single / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == len(ref_params)
    for k in a:
        _assert_close_rel(a[k], b[k], f"checkpoint {k}")
    # the shim (SWIFT's API) loads it like any SWIFT checkpoint
    from conftest import tiny_llama

    swift = ft.SwiftModel.from_pretrained(tiny_llama(), str(runs / "ckpt"))
    loaded = swift.adapters["default"].params
    assert loaded.keys() == ref_params.keys()
    for k in ref_params:
        _assert_close_rel(loaded[k].detach(), ref_params[k], f"SwiftModel.from_pretrained {k}")


# ---------------------------------------------------------------------------
# single-process behaviour (no process group)
# ---------------------------------------------------------------------------
_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
_SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(_SHAPES, _DTYPES), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_buckets_round_trip_any_pytree(leaves, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    tree = {f"t{i}": [torch.randn(shape, generator=gen).to(dtype), None] for i, (shape, dtype) in enumerate(leaves)}
    seen = []
    back = ftd._bucketed(tree, lambda flat: seen.append(flat.dtype))
    assert len(seen) == len({d for _, d in leaves}), "one bucket per dtype"
    for k, (t, none) in tree.items():
        assert none is None and back[k][1] is None
        assert back[k][0].dtype == t.dtype and back[k][0].shape == t.shape and torch.equal(back[k][0], t)
        assert back[k][0].data_ptr() != t.data_ptr() or t.numel() == 0


def test_without_process_group_helpers_are_local(reference_lora, tmp_path) -> None:
    assert not dist.is_initialized() and ftd.rank_and_world() == (0, 1)
    model, params, _ = reference_lora
    for fn in (ftd.all_reduce_grads, ftd.broadcast_params, ftd.gather_params):
        got = fn(params)
        assert got == params and all(got[k] is not params[k] for k in params)
    assert ftd.run_on_rank0(lambda x: x + 1, 1) == 2
    assert not ftd.is_sharded(model)
    merged = ftd.merge_sharded(model, params)
    want = ft.merge(model, params)
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k]) for k in want)


def test_load_params_rejects_mismatched_checkpoints(reference_lora, tmp_path) -> None:
    from functuner.io.checkpoint import write_swift_adapter

    _, params, _ = reference_lora
    first = next(iter(params))
    state = {k: v.detach() for k, v in params.items()}

    with pytest.raises(CheckpointError, match="absent"):
        ftd.load_params(tmp_path / "absent", like=params)
    garbage = tmp_path / "garbage" / "default"
    write_swift_adapter(tmp_path / "garbage", "default", params.config, state)
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="garbage"):
        ftd.load_params(tmp_path / "garbage", like=params)
    write_swift_adapter(tmp_path / "missing", "default", params.config, {k: v for k, v in state.items() if k != first})
    with pytest.raises(CheckpointError, match=rf"missing.*missing \['{first}'\]"):
        ftd.load_params(tmp_path / "missing", like=params)
    write_swift_adapter(tmp_path / "wrong", "default", params.config, {**state, first: state[first].double()})
    with pytest.raises(CheckpointError, match="torch.float64"):
        ftd.load_params(tmp_path / "wrong", like=params)
    other = dataclasses.replace(params.config, lora_alpha=99)
    write_swift_adapter(tmp_path / "other", "default", other, state)
    with pytest.raises(CheckpointError, match="lora_alpha"):
        ftd.load_params(tmp_path / "other", like=params)
    renamed = ft.TunerParams(ft.rename_adapter(state, "default", "mine"), params.config, "mine")
    with pytest.raises(CheckpointError, match="mine"):  # the folder holds 'default', not 'mine'
        ftd.load_params(tmp_path / "other", like=renamed)
    ftd.save_params_on_rank0(params, tmp_path / "good")
    got = ftd.load_params(tmp_path / "good", like=params)
    assert got == params


# ---------------------------------------------------------------------------
# the example script, under torchrun (2 processes) and alone: same checkpoint
# ---------------------------------------------------------------------------
def test_example_under_torchrun_matches_single_process(reference_lora, tmp_path) -> None:
    """The example (FSDP2, 2 processes) trains the same setup as the reference: same checkpoint, same loss."""
    _, ref_params, ref_losses = reference_lora
    script = ROOT / "examples" / "distributed_lora.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [
        *launcher,
        "--standalone",
        "--nproc_per_node",
        str(WORLD),
        str(script),
        "--fsdp",
        "--steps",
        str(STEPS),
        "--lr",
        str(LR),
        "--out",
        str(tmp_path),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = ftd.load_params(tmp_path, like=ref_params)
    for k in got:
        _assert_close_rel(got[k], ref_params[k], f"example checkpoint {k}")
    last = [line for line in r.stdout.splitlines() if line.startswith("final loss")]
    assert len(last) == 1, r.stdout  # printed by rank 0 only
    assert math.isclose(float(last[0].split()[2].rstrip(";")), ref_losses[-1], rel_tol=1e-5)
    assert "sharded: True" in last[0]
