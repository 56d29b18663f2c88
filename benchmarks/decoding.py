"""Decoding (``generate`` with a KV cache): the per-token cost of an unmerged adapter (performance round 2).

Greedy generation of ``NEW_TOKENS`` tokens (``min_new_tokens`` = ``max_new_tokens``, so every variant produces
the same number) from a batch of prompts, at batch 1 and batch 8, measured side by side in one process
(interleaved medians, see ``benchmarks/common.py``):

* ``plain``: the frozen base model, no adapter (the floor);
* ``merged``: the base with one LoRA merged into its weights (``functuner.merge``), the reference every
  unmerged row is a ratio of: the adapter's price per token;
* ``shim``: a ``SwiftModel`` with one active, unmerged LoRA (``sm.generate``);
* ``shim per-sample``: the same ``SwiftModel`` with two adapters, each prompt its own
  (``sm.generate(..., adapter_names=[...])``);
* ``peft`` and ``peft per-sample``: real PEFT's ``PeftModel.generate`` on the same adapter values.

Checks before timing: the shim and PEFT generate identical tokens (unmerged and per-sample); the merged model's
tokens are compared too and their agreement is reported (merging rounds differently, so a greedy tie may flip).
Targets: unmerged <= 1.05x the merged model per token, per-sample <= 1.10x, and each row ahead of PEFT's.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import functuner as ft

from . import common as C

NEW_TOKENS = 64
PROMPT = 16


def _shim(base: torch.nn.Module, adapters: dict[str, ft.TunerParams]) -> Any:
    """A ``SwiftModel`` over a copy of ``base`` holding ``adapters`` (same tensors), all active."""
    sm = ft.Swift.prepare_model(copy.deepcopy(base), {n: p.config for n, p in adapters.items()})
    named = dict(sm.base_model.named_parameters())
    with torch.no_grad():
        for p in adapters.values():
            for k, v in p.items():
                named[k].copy_(v)
    sm.eval()
    return sm


def _peft(base: torch.nn.Module, adapters: dict[str, ft.TunerParams]) -> Any:
    """Real PEFT over a copy of ``base`` holding ``adapters`` (the first one active)."""
    import peft

    pm = None
    for name, p in adapters.items():
        cfg = p.config
        pcfg = peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules), init_lora_weights=False
        )
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), pcfg, adapter_name=name)
        else:
            pm.add_adapter(name, pcfg)
        res = peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(p, name), adapter_name=name)
        if getattr(res, "unexpected_keys", None):
            raise AssertionError(f"PEFT did not take keys {res.unexpected_keys[:3]}")
    assert pm is not None
    pm.set_adapter(next(iter(adapters)))
    return pm.eval()


def _gen_kwargs(new_tokens: int) -> dict[str, Any]:
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)


def _batch_rows(
    report: C.Report,
    s: C.Settings,
    bsz: int,
    new_tokens: int,
    base: Any,
    merged: Any,
    sm: Any,
    sm_multi: Any,
    pm: Any,
    vocab: int,
) -> None:
    """Check and time every variant at batch size ``bsz``; add its rows to ``report``."""
    kw = _gen_kwargs(new_tokens)
    g = torch.Generator().manual_seed(bsz)
    ids = torch.randint(1, vocab, (bsz, PROMPT), generator=g)
    names = [("one", "two")[i % 2] for i in range(bsz)]
    fns = {
        "plain": lambda: base.generate(ids, **kw),
        "merged": lambda: merged.generate(ids, **kw),
        "shim": lambda: sm.generate(ids, **kw),
        "shim per-sample": lambda: sm_multi.generate(ids, adapter_names=names, **kw),
        "peft": lambda: pm.generate(input_ids=ids, **kw),
        "peft per-sample": lambda: pm.generate(input_ids=ids, adapter_names=names, **kw),
    }
    with torch.inference_mode():
        out = {n: f() for n, f in fns.items()}
        for a, b in (("shim", "peft"), ("shim per-sample", "peft per-sample")):
            if not torch.equal(out[a], out[b]):
                raise AssertionError(f"batch {bsz}: {a} and {b} generated different tokens")
            report.check(f"batch {bsz}: {a} tokens == {b} tokens")
        same = (out["merged"] == out["shim"]).all(dim=1).sum().item()
        report.check(f"batch {bsz}: merged == unmerged tokens in {same}/{bsz} sequences")
        times = C.interleaved(fns, warmup=s.warmup, repeats=s.repeats)
    m = times["merged"]
    report.add(f"batch {bsz}: shim unmerged / merged", C.ratio(times["shim"], m), 1.05)
    report.add(f"batch {bsz}: shim per-sample / merged", C.ratio(times["shim per-sample"], m), 1.10)
    report.add(f"batch {bsz}: shim / peft (unmerged)", C.ratio(times["shim"], times["peft"]), 1.0)
    report.add(
        f"batch {bsz}: shim / peft (per-sample)", C.ratio(times["shim per-sample"], times["peft per-sample"]), 1.0
    )
    report.add(f"batch {bsz}: peft unmerged / merged", C.ratio(times["peft"], m))
    report.add(f"batch {bsz}: merged / plain", C.ratio(m, times["plain"]))
    tokens = bsz * new_tokens
    report.info(f"batch {bsz}: merged tokens/s", f"{tokens / m:.0f}")
    report.info(f"batch {bsz}: shim unmerged tokens/s", f"{tokens / times['shim']:.0f}")
    report.info(
        f"batch {bsz}: shim overhead per token over merged",
        f"{(times['shim'] - m) / new_tokens * 1e6:.0f} us",
    )


def run(s: C.Settings) -> C.Report:
    shape = s.shape
    new_tokens = 4 if s.quick else NEW_TOKENS
    report = C.Report("Decoding with a KV cache (generate)")
    base = C.build_llama(shape)
    base.generation_config.pad_token_id = 0
    base.generation_config.eos_token_id = None  # random weights: never stop early, every row makes new_tokens
    cfg = C.lora_config(shape)
    adapters = {n: ft.init(base, cfg, generator=i, adapter_name=n) for i, n in enumerate(("one", "two"))}
    merged = copy.deepcopy(base)
    weights = ft.merge(base, adapters["one"])
    merged.load_state_dict({k: weights[k] for k in merged.state_dict()})
    sm = _shim(base, {"one": adapters["one"]})
    sm_multi = _shim(base, adapters)
    pm = _peft(base, adapters)
    for bsz in (1, 8):
        _batch_rows(report, s, bsz, new_tokens, base, merged, sm, sm_multi, pm, shape.vocab)
    report.notes.append(
        f"greedy, prompt {PROMPT} tokens, {new_tokens} new tokens, KV cache; LoRA r={shape.rank} on all 7 Llama"
        f" linears; {s.repeats} interleaved repeats, medians"
    )
    return report
