"""Shared benchmark machinery: model builders, interleaved median timing, peak-memory measurement.

Timing: every compared variant runs in one process, interleaved (round-robin
with a rotating start), after warm-up; we report medians and ratios, because
absolute times on a shared machine are noise.

Memory: CPU tensors do not go through Python's allocator, so ``tracemalloc``
cannot see them; :func:`peak_bytes` replays torch's own allocation events
(``torch.profiler`` with ``profile_memory=True``) and returns the highest
running total of bytes allocated during one call, relative to its start. On
CUDA it uses ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "LLAMA_TARGETS",
    "Report",
    "Shape",
    "assert_close",
    "build_llama",
    "interleaved",
    "peak_bytes",
    "peft_lora",
    "ratio",
    "sync",
]

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """The model and batch one benchmark runs on."""

    hidden: int = 512
    layers: int = 4
    heads: int = 8
    vocab: int = 1024
    batch: int = 4
    seq: int = 128
    rank: int = 16

    @property
    def intermediate(self) -> int:
        return self.hidden * 2


FULL = Shape()
QUICK = Shape(hidden=32, layers=1, heads=2, vocab=64, batch=2, seq=8, rank=4)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_llama(shape: Shape, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A transformers ``LlamaForCausalLM`` built from a config (no download), eval mode, frozen."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max(shape.seq, 64),
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(cfg).to(device=device(), dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def batch(shape: Shape, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of shape ``(batch, seq)``, int64."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device())
    return ids, ids.clone()


def peft_lora(model: torch.nn.Module, params: Any, *, use_dora: bool = False) -> torch.nn.Module:
    """Real PEFT's LoRA on a deep copy of ``model``, loaded with the same tensors as ``params``."""
    import peft

    import functuner as ft

    cfg = params.config
    pcfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=0.0,
        use_dora=use_dora,
        use_rslora=cfg.use_rslora,
        bias="none",
    )
    pm = peft.get_peft_model(copy.deepcopy(model), pcfg)
    sd = ft.to_peft_state_dict(params, params.adapter_name)
    res = peft.set_peft_model_state_dict(pm, {k: v.detach().clone() for k, v in sd.items()})
    if getattr(res, "unexpected_keys", None):
        raise AssertionError(f"PEFT did not take keys {res.unexpected_keys[:3]}")
    return pm


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, *, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Raise ``AssertionError`` naming the benchmark if ``got`` and ``want`` differ; return the max abs diff."""
    got, want = got.detach().float(), want.detach().float()
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shapes differ {tuple(got.shape)} vs {tuple(want.shape)}")
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        raise AssertionError(f"{name}: outputs differ (max abs diff {diff:.3g})")
    return diff


def interleaved(
    fns: Mapping[str, Callable[[], Any] | tuple[Callable[[], Any], Callable[[Any], Any]]], *, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin (rotating start) after ``warmup`` calls each.

    A value may be a pair ``(setup, run)``: ``setup()`` runs untimed before every call and its result is
    passed to ``run`` (for operations that consume their input, such as PEFT's in-place merge).
    """
    names = list(fns)

    def once(n: str) -> float:
        f = fns[n]
        if isinstance(f, tuple):
            setup, run = f
            state = setup()
            sync()
            t0 = time.perf_counter()
            run(state)
        else:
            sync()
            t0 = time.perf_counter()
            f()
        sync()
        return time.perf_counter() - t0

    for _ in range(warmup):
        for n in names:
            once(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            times[n].append(once(n))
    return {n: statistics.median(v) for n, v in times.items()}


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by torch during one call of ``fn``, above what was allocated before it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda t: t[0])
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass
class Report:
    """Rows of one benchmark group: ``(label, value, target)`` plus the correctness checks that ran."""

    group: str
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # label, value, target, met
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, label: str, value: float, target: float | None = None, unit: str = "x") -> None:
        met = "" if target is None else ("yes" if value <= target else "NO")
        tgt = "" if target is None else f"<= {target:g}{unit}"
        self.rows.append((label, f"{value:.3f}{unit}", tgt, met))

    def info(self, label: str, value: str) -> None:
        self.rows.append((label, value, "", ""))

    def check(self, what: str) -> None:
        self.checks.append(what)

    def markdown(self) -> str:
        lines = [f"### {self.group}", "", "| measurement | value | target | met |", "| --- | --- | --- | --- |"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows]
        if self.checks:
            lines += ["", "Correctness checks passed before timing: " + "; ".join(self.checks) + "."]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Settings:
    """One suite run: the shape, how many timed repeats, and the mode's name."""

    shape: Shape
    warmup: int
    repeats: int
    quick: bool


def settings(quick: bool) -> Settings:
    return Settings(QUICK, 1, 2, True) if quick else Settings(FULL, 2, 9, False)


def lora_config(shape: Shape, *, dora: bool = False, rank: int | None = None) -> Any:
    """LoRA on all seven linear kinds of every Llama layer; random B so outputs differ from the base."""
    import functuner as ft

    r = rank or shape.rank
    return ft.LoRAConfig(
        r=r, lora_alpha=2 * r, target_modules=list(LLAMA_TARGETS), init_lora_weights=False, use_dora=dora
    )
