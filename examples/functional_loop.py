"""Train a LoRA with the functional API in a plain ``torch.func`` loop, then save, reload, merge.

The loss is a pure function of the tuner params; ``torch.func.grad_and_value``
differentiates it; Adam is written with ``functuner.tree_map`` so the optimizer
state is a pytree too.  Nothing is stateful except the loop variables.

Run:  python examples/functional_loop.py            (a LLaMA-shaped model built from a config, 200 steps)
      python examples/functional_loop.py --quick    (a tiny one, 15 steps; what the test suite runs)
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import functuner as ft


def build_model(quick: bool) -> transformers.LlamaForCausalLM:
    """A randomly initialised LLaMA built from a config (no download), frozen and in eval mode."""
    torch.manual_seed(0)
    size = dict(hidden_size=32, intermediate_size=64) if quick else dict(hidden_size=256, intermediate_size=512)
    config = transformers.LlamaConfig(
        vocab_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **size
    )
    return transformers.LlamaForCausalLM(config).eval().requires_grad_(False)


def counting_task(n: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Counting sequences ``start, start+1, ...`` (mod ``vocab``): each next token follows from the current one.

    Shape (n, 2 * length), int64."""
    start = torch.randint(0, vocab, (n, 1), generator=generator)
    return (start + torch.arange(2 * length)) % vocab


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (for CI)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (15 if args.quick else 200)

    model = build_model(args.quick)
    vocab = model.config.vocab_size
    config = ft.LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear")
    params = ft.init(model, config, generator=0)  # explicit randomness, model only read
    print(f"LoRA params: {params.num_parameters():,} in {len(params)} tensors")

    def loss_fn(p: ft.TunerParams, batch: torch.Tensor) -> torch.Tensor:
        logits = ft.apply(model, p, (batch,)).logits  # pure: model and p are untouched
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), batch[:, 1:].reshape(-1))

    data = torch.Generator().manual_seed(1)
    dataset = counting_task(8 if args.quick else 512, 8, vocab, data)  # quick: overfit one fixed batch
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    m = ft.tree_map(torch.zeros_like, params)
    v = ft.tree_map(torch.zeros_like, params)
    losses = []
    for step in range(1, steps + 1):
        batch = dataset[torch.randint(0, len(dataset), (8,), generator=data)] if not args.quick else dataset
        grads, loss = torch.func.grad_and_value(loss_fn)(params, batch)
        m = ft.tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grads)
        v = ft.tree_map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, v, grads)
        c1, c2 = 1 - b1**step, 1 - b2**step  # Adam's bias corrections
        params = ft.tree_map(
            lambda p, m_, v_, c1=c1, c2=c2: p - lr * (m_ / c1) / ((v_ / c2).sqrt() + eps), params, m, v
        )
        losses.append(loss.item())
        if step == 1 or step % max(1, steps // 5) == 0 or step == steps:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"mean loss of the first 3 steps {first:.4f} -> last 3 steps {last:.4f}")

    # Save in SWIFT's layout (ft.save / ft.load: the functional front door), read it back: the same params, bit for bit.
    with tempfile.TemporaryDirectory() as tmp:
        root = ft.save(params, tmp)  # <tmp>/default/ plus configuration.json
        reloaded = ft.load(root, model=model)  # every reader check, then validated on the model
        same = reloaded.config == params.config and set(reloaded) == set(params)
        assert same and all(torch.equal(reloaded[k], params[k]) for k in params), (
            "the adapter did not read back unchanged"
        )
        folder = root / params.adapter_name
        print(f"saved and reloaded {folder.name}/ ({len(reloaded)} tensors)")

    # Merge: new weights; the model itself is not changed.
    batch = counting_task(2, 8, vocab, data)
    with torch.no_grad():
        merged = ft.merge(model, params)
        merged_out = torch.func.functional_call(model, merged, (batch,)).logits
        adapter_out = ft.apply(model, params, (batch,)).logits
    gap = (merged_out - adapter_out).abs().max().item()
    print(f"max |merged - adapter| = {gap:.2e}")
    assert gap < 1e-4
    return last / first


if __name__ == "__main__":
    ratio = main()
    if ratio >= 1.0:
        raise SystemExit(f"the loss did not go down (last/first = {ratio:.3f})")
