"""``add_weighted_adapter`` beyond plain LoRA, against real PEFT (peft 0.21's ``LoraModel`` / ``IA3Model``).

Supported rows (the combined adapter's forward equals PEFT's combined adapter's, fp32, 1e-5): LoRA with MiCA
(its forward is LoRA's; PEFT keeps ``init_lora_weights="mica"`` for the result, and so do we), LoRA on
``nn.MultiheadAttention``, and (IA)³ (PEFT's ``IA3Model.add_weighted_adapter``: the weighted sum of the
vectors).  Refused rows: a ``ConfigError`` naming the field, next to what PEFT does with the same adapters:
it raises too (``target_parameters``, ``modules_to_save`` on one module, MiCA ``cat`` past the layer's
size, and the svd types on grouped convolutions and BD-LoRA), or it returns something that is not the
combination (KaSA, VeLoRA, MonteCLoRA, ``lora_bias``: the result gets fresh state in place of a combined one).  The two-adapter PEFT models (and the seeded noise on their tensors) are
``test_per_sample_all._pair``'s.
"""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners.ia3 import IA3Config
from functuner.tuners.lora.combine import add_weighted_adapter
from tests.tuners.test_per_sample_all import _out, _pair

ATOL = RTOL = 1e-5
W = [0.7, -0.4]


def _peft_combined(pm: Any, kind: str | None) -> Any:
    pm = copy.deepcopy(pm)
    extra = {} if kind is None else {"combination_type": kind}
    pm.add_weighted_adapter(["ad_a", "ad_b"], W, "c", **extra)
    pm.set_adapter("c")
    return pm


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        ("lora-mica", "svd"),
        ("lora-mica", "linear"),
        ("lora-mha-batch-first", "cat"),
        ("lora-mha-batch-first", "svd"),
        ("lora-mha", "linear"),
        ("ia3-mlp", None),
        ("ia3-conv", None),
        ("ia3-gpt2", None),
    ],
)
def test_combination_matches_peft(row: str, kind: str | None) -> None:
    model, x, pm, params = _pair(row)
    theirs = _peft_combined(pm, kind)
    combine = ft.tuner_for(params["ad_a"].config).combine
    assert combine is not None
    ours = combine(params, W, "c", kind or "linear", model=model)
    with torch.no_grad():
        got, want = _out(ft.apply(model, ours, (x,))), _out(theirs(x))
    assert (got - _out(model(x))).abs().max() > 1e-4  # not vacuous
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert all(torch.equal(params["ad_a"][k], v) for k, v in _pair(row)[3]["ad_a"].items())  # inputs unchanged


def test_ia3_one_adapter_at_weight_one_is_the_identity_and_mixing_sides_is_refused() -> None:
    model, x, _, params = _pair("ia3-mlp")
    one = ft.tuner_for(params["ad_a"].config).combine([params["ad_a"]], [1.0], "c")  # type: ignore[misc]
    torch.testing.assert_close(ft.apply(model, one, (x,)), ft.apply(model, params["ad_a"], (x,)), atol=0, rtol=0)
    other = ft.init(model, IA3Config(target_modules=["lin1"], feedforward_modules=[]), generator=0, adapter_name="o")
    with pytest.raises(ConfigError, match="'lin1' is feed-forward"):
        ft.tuner_for(other.config).combine([params["ad_a"], other], [1.0, 1.0], "c")  # type: ignore[misc]
    with pytest.raises(ConfigError, match="combination_type='ties'"):
        ft.tuner_for(other.config).combine([params["ad_a"]], [1.0], "c", "ties")  # type: ignore[misc]


def test_ia3_combination_through_the_shim() -> None:
    model, x, _, params = _pair("ia3-mlp")
    sm = ft.Swift.prepare_model(copy.deepcopy(model), {n: p.config for n, p in params.items()}).eval()
    with torch.no_grad():
        for n, p in params.items():
            for k, t in sm.adapters[n].tensors.items():
                t.copy_(p[k])
    sm.add_weighted_adapter(["ad_a", "ad_b"], W, "c")
    want = ft.tuner_for(params["ad_a"].config).combine(params, W, "c")  # type: ignore[misc]
    with torch.no_grad():
        torch.testing.assert_close(sm(x), ft.apply(model, want, (x,)), atol=ATOL, rtol=RTOL)


# row, combination type, what PEFT does (an exception type: it raises; "fresh": it runs, giving the result
# freshly initialised variant state instead of a combination), the field our error names
REFUSED: list[tuple[str, str, Any, str]] = [
    ("lora-target_parameters", "svd", ValueError, "target_parameters"),
    ("lora-modules_to_save", "svd", ValueError, "modules_to_save"),
    ("lora-mica", "cat", ValueError, "MiCA needs r <= min"),
    ("lora-grouped-conv", "svd", RuntimeError, "grouped convolution"),
    ("lora-bdlora", "svd", RuntimeError, "use_bdlora"),
    ("lora-kasa", "svd", "fresh", "kasa_config"),
    ("lora-velora", "svd", "fresh", "velora_config"),
    ("lora-monteclora", "svd", "fresh", "monteclora_config"),
]


@pytest.mark.parametrize(("row", "kind", "peft_does", "field"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refusals_name_the_field_next_to_peft(row: str, kind: str, peft_does: Any, field: str) -> None:
    model, x, pm, params = _pair(row)
    if isinstance(peft_does, type):
        with pytest.raises(peft_does):
            _peft_combined(pm, kind)
    else:  # PEFT's result holds freshly initialised variant state under the new name, not a combination of both
        theirs = _peft_combined(pm, kind)
        named = [*theirs.named_parameters(), *theirs.named_buffers()]
        fresh = [n for n, _ in named if "c" in n.split(".") and "lora_A" not in n and "lora_B" not in n]
        assert fresh, "PEFT's combined adapter should carry the variant's own (fresh) state"
    with pytest.raises(ConfigError, match=field):
        add_weighted_adapter(params, W, "c", kind, model=model)


def test_lora_bias_peft_starts_the_combined_bias_at_zero() -> None:
    """Why ``lora_bias`` is refused: PEFT's combined adapter gets a freshly initialised lora_B bias, not the
    weighted sum of the adapters' biases (0.7 * 0.5 - 0.4 * 0.5 = 0.15 here)."""
    model, _, _, _ = _pair("lora-mica")
    cfg = {"target_modules": ["lin0"], "lora_bias": True, "init_lora_weights": False}
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg), adapter_name="ad_a")
    pm.add_adapter("ad_b", peft.LoraConfig(**cfg))
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "lora_B" in n and n.endswith("bias"):
                t.fill_(0.5)
    pm.add_weighted_adapter(["ad_a", "ad_b"], W, "c", combination_type="cat")
    bias = pm.base_model.model.lin0.lora_B["c"].bias
    assert not torch.isclose(bias, torch.full_like(bias, 0.15)).any()
    p = ft.init(model, ft.LoRAConfig(**cfg), generator=0)
    with pytest.raises(ConfigError, match="lora_bias"):
        add_weighted_adapter([p], [1.0], "c", "cat")
