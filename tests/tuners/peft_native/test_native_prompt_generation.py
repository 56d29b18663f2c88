"""Generation with a KV cache for native prompt tuning, P-tuning and prefix tuning, against real PEFT (0.21).

Reference: greedy decoding by PEFT's own forward (``PeftModelForCausalLM.forward`` on the whole sequence at
every step, no cache), the tokens PEFT's ``generate`` is meant to give.  For prompt tuning and P-tuning PEFT's
``generate(use_cache=False)`` gives the same tokens and is compared too.  PEFT 0.21.2's cached ``generate`` is
not a reference on transformers 5: its ``prepare_inputs_for_generation`` reads ``past_key_values`` /
``cache_position``, which transformers 5 renamed to ``cache`` / dropped, so it prepends the virtual tokens
again at every step (prompt tuning) or loses the prefixes (prefix tuning); and for prefix tuning its uncached
``generate`` departs from its own forward after the first token (measured on transformers 5.25).
Positions as ``generate`` makes them (``transformers.generation.utils._prepare_position_ids_for_generation``:
``cumsum(mask) - 1``, padding at 0): PEFT's forward drops them for prompt tuning / P-tuning and shifts them by
``num_virtual_tokens`` for prefix tuning, as its ``prepare_inputs_for_generation`` does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from transformers import DynamicCache

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners.prompt_learning import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

N, NEW = 4, 5
KW = {"num_virtual_tokens": N, "task_type": "CAUSAL_LM"}
METHODS = [
    ("prompt", PromptTuningConfig(**KW), peft.PromptTuningConfig(**KW)),
    (
        "p-tuning",
        PromptEncoderConfig(**KW, encoder_hidden_size=8),
        peft.PromptEncoderConfig(**KW, encoder_hidden_size=8),
    ),
    (
        "p-tuning-lstm",
        PromptEncoderConfig(**KW, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"),
        peft.PromptEncoderConfig(**KW, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"),
    ),
    ("prefix", PrefixTuningConfig(**KW), peft.PrefixTuningConfig(**KW)),
    (
        "prefix-proj",
        PrefixTuningConfig(**KW, prefix_projection=True),
        peft.PrefixTuningConfig(**KW, prefix_projection=True),
    ),
]
BATCHES = {
    "batch1": (torch.tensor([[5, 6, 7, 8, 9]]), torch.ones(1, 5, dtype=torch.long)),
    "batch2-left-pad": (torch.tensor([[5, 6, 7, 8, 9], [1, 1, 3, 4, 5]]), torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])),
}


def _pair(build: Callable[[], torch.nn.Module], ours: Any, theirs: Any) -> tuple[ft.SwiftModel, Any]:
    """A SwiftModel and a PeftModel holding the same adapter tensors (PEFT's initial values copied into ours)."""
    pm = peft.get_peft_model(build(), copy.deepcopy(theirs)).eval()  # PEFT fills the config it is given
    sm = ft.Swift.prepare_model(build(), ours)
    enc = dict(pm.prompt_encoder["default"].named_parameters())
    with torch.no_grad():
        for k, t in sm.named_parameters():
            if t.requires_grad:
                t.copy_(enc[k.removeprefix("base_model.prompt_encoder.default.")])
    return sm, pm


def _peft_greedy(pm: Any, ids: torch.Tensor, mask: torch.Tensor, prefix: bool) -> torch.Tensor:
    """Greedy decoding by PEFT's forward on the whole sequence (no cache), positions as ``generate`` makes them."""
    for _ in range(NEW):
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if prefix:
            kw["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            nxt = pm(**kw).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat((ids, nxt), 1), torch.cat((mask, torch.ones_like(nxt)), 1)
    return ids


CASES = [(tiny_llama, batch, *m) for m in METHODS for batch in BATCHES] + [
    (tiny_gpt2, "batch2-left-pad", *m) for m in METHODS if m[0] in ("prompt", "prefix")
]


@pytest.mark.parametrize(
    ("build", "batch", "name", "ours", "theirs"), CASES, ids=[f"{c[0].__name__}-{c[2]}-{c[1]}" for c in CASES]
)
def test_generate_gives_peft_tokens(build: Any, batch: str, name: str, ours: Any, theirs: Any) -> None:
    sm, pm = _pair(build, ours, theirs)
    ids, mask = BATCHES[batch]
    want = _peft_greedy(pm, ids, mask, prefix=name.startswith("prefix"))
    greedy = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 1}
    cached = sm.generate(input_ids=ids, attention_mask=mask, **greedy)
    torch.testing.assert_close(cached, want, atol=0, rtol=0)
    uncached = sm.generate(input_ids=ids, attention_mask=mask, use_cache=False, **greedy)
    torch.testing.assert_close(uncached, want, atol=0, rtol=0)
    if not name.startswith("prefix"):  # PEFT's own uncached generate agrees for these (see the module docstring)
        with pytest.warns(UserWarning, match="Position ids are not supported"):  # PEFT drops generate's positions
            theirs_tokens = pm.generate(input_ids=ids, attention_mask=mask, use_cache=False, **greedy)
        torch.testing.assert_close(cached, theirs_tokens, atol=0, rtol=0)


@pytest.mark.parametrize(("name", "ours", "theirs"), METHODS, ids=[m[0] for m in METHODS])
def test_functional_decoding_step_with_a_cache(name: str, ours: Any, theirs: Any) -> None:
    """``functuner.apply`` on a prefill and then on one decoding step (the cache holds the virtual tokens) gives the
    logits of PEFT's forward on the whole sequence; the caller's cache object is the one that grows."""
    sm, pm = _pair(tiny_llama, ours, theirs)
    model, params = sm.model, sm.adapters["default"].params
    ids, mask = BATCHES["batch2-left-pad"]
    nxt = torch.tensor([[11], [12]])
    full_mask = torch.cat((mask, torch.ones_like(nxt)), 1)
    with torch.no_grad():
        want = pm(input_ids=torch.cat((ids, nxt), 1), attention_mask=full_mask).logits[:, -1]
        cache = DynamicCache(config=model.config)
        first = ft.apply(model, params, (), {"input_ids": ids, "attention_mask": mask, "cache": cache})
        assert first.cache is cache and cache.get_seq_length() == N + ids.shape[1]
        step = ft.apply(model, params, (), {"input_ids": nxt, "attention_mask": full_mask, "cache": cache})
    assert step.logits.shape[1] == 1 and cache.get_seq_length() == N + ids.shape[1] + 1
    torch.testing.assert_close(step.logits[:, -1], want, atol=1e-5, rtol=1e-5)


def test_generation_refusals_name_the_cause() -> None:
    model = tiny_llama()
    p = ft.init(model, PromptTuningConfig(**KW), generator=0)
    ids = BATCHES["batch1"][0]
    with pytest.raises(ConfigError, match="position_ids"):  # outside generate, as PEFT's forward would drop them
        ft.apply(model, p, (), {"input_ids": ids, "position_ids": torch.arange(5)[None]})
    with pytest.raises(ConfigError, match="2-D"):
        ft.apply(model, p, (), {"input_ids": ids, "attention_mask": torch.ones(1, 1, 5, 5)})
    with pytest.raises(ConfigError, match="Cache"):
        ft.apply(model, p, (), {"input_ids": ids, "cache": ((torch.zeros(1), torch.zeros(1)),)})
    with pytest.raises(ConfigError, match="inputs_embeds"):
        ft.apply(model, p, (), {"attention_mask": torch.ones(1, 5)})
