"""Train LoRA on a small Llama with torch.distributed: data parallel, optionally with FSDP2-sharded base weights.

Run on one machine with two processes (CPU, gloo; on GPUs the backend is nccl)::

    torchrun --standalone --nproc_per_node 2 examples/distributed_lora.py
    torchrun --standalone --nproc_per_node 2 examples/distributed_lora.py --fsdp

or alone (``python examples/distributed_lora.py``): the same numbers, one process.

Every rank builds the same model from a config (no download), draws the same
LoRA init, and trains on its slice of one global batch; gradients are
averaged with ``functuner.distributed.all_reduce_grads``, so after each step
the params equal a single-process run on the whole batch.  Rank 0 writes the
adapter in SWIFT's layout to ``<out>/default/``; every rank then reads it back, and
the merged weights are computed on the (possibly sharded) model.

``--out`` defaults to a new temporary directory (rank 0 creates it, prints where, and
tells the other ranks), so a run never writes into the current directory.  With several
machines, pass ``--out`` on storage every machine can read.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

import torch
import torch.distributed as dist
import transformers

import functuner as ft
from functuner import distributed as ftd


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--global-batch", type=int, default=4, help="sequences per step, over all ranks together")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--fsdp", action="store_true", help="shard the base weights with fully_shard (FSDP2)")
    p.add_argument("--dora", action="store_true")
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="checkpoint folder, readable by every rank (default: a new temporary directory, printed)",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank, world = ftd.rank_and_world()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by the {world} ranks")

    # the same base model on every rank (same seed), frozen
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval().to(device)
    model.requires_grad_(False)

    # tuner params: init before sharding (init reads full weights), then make sure every rank holds rank 0's
    lora = ft.LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=args.dora)
    params = ftd.broadcast_params(ft.init(model, lora, generator=0))

    if args.fsdp and distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)  # each layer's weights: 1/world per rank, gathered for its forward
        fully_shard(model, mesh=mesh)

    # one global batch, each rank takes its slice
    ids = torch.randint(0, 64, (args.global_batch, args.seq), generator=torch.Generator().manual_seed(1))
    per = args.global_batch // world
    local = ids[rank * per : (rank + 1) * per].to(device)

    def loss_fn(p: ft.TunerParams, x: torch.Tensor) -> torch.Tensor:
        return ft.apply(model, p, (x,), {"labels": x}).loss

    for step in range(args.steps):
        grads, loss = torch.func.grad_and_value(loss_fn)(params, local)
        grads = ftd.all_reduce_grads(grads)  # mean over ranks == gradient of the global-batch loss
        params = ft.TunerParams(
            {k: (v - args.lr * grads[k]).detach() for k, v in params.items()}, params.config, params.adapter_name
        )
        mean_loss = ftd.all_reduce_grads(loss.detach()).item()
        if rank == 0:
            print(f"step {step}: loss {mean_loss:.6f}", flush=True)

    out = args.out if args.out is not None else _temporary_out(rank, distributed)
    path = ftd.save_params_on_rank0(params, out)  # rank 0 writes <out>/default/; the others wait for it
    loaded = ftd.load_params(out, like=params)  # every rank reads it
    assert all(torch.equal(loaded[k], params[k]) for k in params)

    merged = ftd.merge_sharded(model, params)  # stays sharded under FSDP2; one module gathered at a time
    base = dict(model.named_parameters())
    if rank == 0:
        n = sum(1 for k in base if merged[k] is not base[k])
        print(f"final loss {mean_loss:.8f}; saved {path}; merged {n} weights (sharded: {ftd.is_sharded(model)})")
    if distributed:
        dist.barrier()  # no rank tears gloo down while another is still in a collective
        dist.destroy_process_group()


def _temporary_out(rank: int, distributed: bool) -> pathlib.Path:
    """A new temporary directory made by rank 0, its path shared with every rank (same machine or shared /tmp)."""
    chosen = [tempfile.mkdtemp(prefix="functuner-distributed-lora-") if rank == 0 else None]
    if distributed:
        dist.broadcast_object_list(chosen, src=0)
    if rank == 0:
        print(f"no --out given: writing the checkpoint to {chosen[0]}", flush=True)
    return pathlib.Path(str(chosen[0]))


if __name__ == "__main__":
    main()
