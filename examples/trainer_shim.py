"""Fine-tune with the SWIFT-compatible shim and a plain ``transformers.Trainer``.

The conventional, stateful route: ``Swift.prepare_model`` wraps the model in a
``SwiftModel`` whose adapter tensors are ``nn.Parameter``s, so ``Trainer`` (or any
optimizer) trains them as usual; the base weights stay frozen.  Then the adapter is
saved in SWIFT's layout, reloaded onto a fresh copy of the base model, converted to
PEFT's layout and loaded with real ``peft``; every route must give the same logits.

Run:  python examples/trainer_shim.py            (a LLaMA-shaped model built from a config, 120 steps)
      python examples/trainer_shim.py --quick    (a tiny one, 8 steps; what the test suite runs)
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import transformers

from functuner import LoRAConfig, Swift, SwiftModel


def build_model(quick: bool) -> transformers.LlamaForCausalLM:
    """The same randomly initialised LLaMA (built from a config, no download) on every call."""
    torch.manual_seed(0)
    size = dict(hidden_size=32, intermediate_size=64) if quick else dict(hidden_size=256, intermediate_size=512)
    config = transformers.LlamaConfig(
        vocab_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **size
    )
    return transformers.LlamaForCausalLM(config).eval()


class CountingTask(torch.utils.data.Dataset):
    """Causal-LM counting sequences ``start, start+1, ...`` mod ``vocab`` (``input_ids`` = ``labels``, int64, length 16)."""

    def __init__(self, n: int, vocab: int, seed: int) -> None:
        start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (start + torch.arange(16)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (for CI)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (8 if args.quick else 120)

    torch.manual_seed(1)  # the shim, like SWIFT and PEFT, draws its init from torch's global RNG
    model = Swift.prepare_model(build_model(args.quick), LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    print(model.get_trainable_parameters())
    vocab = model.config.vocab_size
    train = CountingTask(8 if args.quick else 1024, vocab, seed=2)  # quick: overfit one batch
    evaluation = CountingTask(8, vocab, seed=2 if args.quick else 3)

    with tempfile.TemporaryDirectory(prefix="functuner-trainer-") as work:
        return _train_save_reload(model, train, evaluation, steps, work, args.quick)


def _train_save_reload(
    model: SwiftModel, train: CountingTask, evaluation: CountingTask, steps: int, work: str, quick: bool
) -> tuple[float, float]:
    training_args = transformers.TrainingArguments(
        output_dir=os.path.join(work, "trainer"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_steps=steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=max(1, steps // 4),
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )  # no label_names: Trainer reads them off the SwiftModel class's forward signature (the wrapped model's)
    # Trainer builds its usual AdamW over the trainable parameters: the adapters' (the base model is frozen).
    # For LoRA+ pass optimizers=(torch.optim.AdamW(model.create_optimizer_param_groups(lr=...)), None).
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation)
    before = trainer.evaluate()["eval_loss"]
    frozen = model.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"eval loss {before:.4f} -> {after:.4f}")
    assert torch.equal(model.model.model.layers[0].self_attn.q_proj.weight, frozen), "a base weight changed"

    # Save in SWIFT's layout; reload on a fresh base model; convert to PEFT and load with real peft.
    model.eval()
    x = evaluation.ids[:2]
    with torch.no_grad():
        want = model(x).logits
        swift_dir, peft_dir = os.path.join(work, "swift"), os.path.join(work, "peft")
        model.save_pretrained(swift_dir)
        reloaded = Swift.from_pretrained(build_model(quick), swift_dir)
        gap_swift = (reloaded(x).logits - want).abs().max().item()

        import peft

        Swift.save_to_peft_format(swift_dir, peft_dir)
        peft_model = peft.PeftModel.from_pretrained(build_model(quick), peft_dir)
        gap_peft = (peft_model(x).logits - want).abs().max().item()

        Swift.merge_and_unload(model)
        gap_merged = (model(x).logits - want).abs().max().item()
    print(
        f"max |reloaded - trained| = {gap_swift:.2e}, |peft - trained| = {gap_peft:.2e}, "
        f"|merged - trained| = {gap_merged:.2e}"
    )
    assert gap_swift == 0.0 and gap_peft < 1e-5 and gap_merged < 1e-4
    return before, after


if __name__ == "__main__":
    first, last = main()
    if last >= first:
        raise SystemExit(f"the eval loss did not go down ({first:.4f} -> {last:.4f})")
