"""Serve many LoRA adapters over one base model, each request with its own adapter, in shared batches.

Adapters are values (``TunerParams``), so a server needs no adapter state: it keeps a
``{name: params}`` dict, stacks it once with ``functuner.tuners.lora.mixed.stack_adapters``, and
runs every batch with ``apply_mixed(model, stack, per_request_names, ...)``: request
``b`` uses adapter ``names[b]`` (``"__base__"`` for none), in one forward pass.  The
example decodes greedily for a queue of requests spread over the adapters, checks
each answer against running that request alone with ``functuner.apply``, and times
mixed batches against one request at a time (printed, not asserted).

Run:  python examples/multi_adapter_serving.py            (8 adapters, 64 requests, a LLaMA built from a config)
      python examples/multi_adapter_serving.py --quick    (3 adapters, 6 requests, tiny; what the test suite runs)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence

import torch
import transformers

import functuner as ft
from functuner.tuners.lora.mixed import BASE, AdapterStack, apply_mixed, stack_adapters


def build_model(quick: bool) -> transformers.LlamaForCausalLM:
    """A randomly initialised LLaMA built from a config (no download), in eval mode."""
    torch.manual_seed(0)
    size = dict(hidden_size=32, intermediate_size=64) if quick else dict(hidden_size=256, intermediate_size=512)
    config = transformers.LlamaConfig(
        vocab_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **size
    )
    return transformers.LlamaForCausalLM(config).eval()


def make_adapters(model: torch.nn.Module, n: int) -> dict[str, ft.TunerParams]:
    """``n`` adapters standing in for trained ones: different ranks, targets, and some DoRA (random B, not zero)."""
    adapters = {}
    for i in range(n):
        config = ft.LoRAConfig(
            r=4 * (1 + i % 3),
            lora_alpha=8,
            init_lora_weights=False,
            use_dora=(i % 4 == 3),
            target_modules=["q_proj", "v_proj"] if i % 2 else ["q_proj", "k_proj", "o_proj"],
        )
        adapters[f"customer{i}"] = ft.init(model, config, generator=100 + i, adapter_name=f"customer{i}")
    return adapters


@torch.no_grad()
def greedy_mixed(
    model: torch.nn.Module, stack: AdapterStack, prompts: torch.Tensor, names: Sequence[str], new_tokens: int
) -> torch.Tensor:
    """Greedy decoding of a batch whose row ``b`` uses adapter ``names[b]``; returns (batch, prompt + new) int64."""
    ids = prompts
    for _ in range(new_tokens):
        logits = apply_mixed(model, stack, names, (ids,)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def greedy_alone(
    model: torch.nn.Module, adapters: Mapping[str, ft.TunerParams], prompt: torch.Tensor, name: str, new_tokens: int
) -> torch.Tensor:
    """The reference: one request, its own adapter through ``functuner.apply`` (or the bare model)."""
    ids = prompt[None]
    for _ in range(new_tokens):
        out = model(ids) if name == BASE else ft.apply(model, adapters[name], (ids,))
        ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0]


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few requests (for CI)")
    args = parser.parse_args(argv)
    n_adapters, n_requests, batch, new_tokens = (3, 6, 3, 3) if args.quick else (8, 64, 16, 8)

    model = build_model(args.quick)
    adapters = make_adapters(model, n_adapters)
    stack = stack_adapters(model, adapters)  # once per adapter set; reuse for every batch
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (n_requests, 6), generator=g)
    choices = [*adapters, BASE]
    names = [choices[int(i)] for i in torch.randint(0, len(choices), (n_requests,), generator=g)]
    print(
        f"{n_adapters} adapters, {n_requests} requests, batches of {batch}; "
        f"requests per adapter: {dict(sorted((n, names.count(n)) for n in set(names)))}"
    )

    start = time.perf_counter()
    answers = torch.cat(
        [
            greedy_mixed(model, stack, prompts[i : i + batch], names[i : i + batch], new_tokens)
            for i in range(0, n_requests, batch)
        ]
    )
    mixed_s = time.perf_counter() - start

    start = time.perf_counter()
    alone = torch.stack([greedy_alone(model, adapters, prompts[i], names[i], new_tokens) for i in range(n_requests)])
    alone_s = time.perf_counter() - start

    same = (answers == alone).all(dim=1)
    print(f"answers equal to serving each request alone: {int(same.sum())}/{n_requests}")
    print(
        f"mixed batches {mixed_s:.2f} s, one request at a time {alone_s:.2f} s "
        f"(ratio {alone_s / mixed_s:.1f}x; timings vary with the machine)"
    )
    # Token choices could only differ on an argmax tie broken by float rounding; the logits agree to ~1e-6.
    x = prompts[:batch]
    with torch.no_grad():
        mixed_logits = apply_mixed(model, stack, names[:batch], (x,)).logits
        for b, name in enumerate(names[:batch]):
            one = model(x[b : b + 1]) if name == BASE else ft.apply(model, adapters[name], (x[b : b + 1],))
            assert torch.allclose(mixed_logits[b], one.logits[0], atol=1e-5), f"request {b} ({name}) differs"
    assert bool(same.all()), "a mixed-batch answer differs from serving the request alone"
    return alone_s / mixed_s


if __name__ == "__main__":
    main()
