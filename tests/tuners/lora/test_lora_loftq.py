"""LoftQ (``init_lora_weights="loftq"``) against PEFT's formulas, run with the real ``bitsandbytes`` and ``peft``.

peft 0.21.2 cannot run its own LoftQ on a CPU: ``peft.utils.loftq_utils.loftq_init``
moves the weight to ``compute_device = "xpu" if is_xpu_available() else "cuda"``
(hard-coded; its pure-torch quantizer for CPUs was removed in peft 0.20), and
``replace_lora_weights_loftq`` does the same.  :func:`test_peft_loftq_needs_cuda`
pins that down (it fails, and tells us to compare with PEFT directly, the day
PEFT runs it on a CPU).  The reference here is therefore PEFT's ``loftq_init``
body (peft 0.21.2, ``src/peft/utils/loftq_utils.py``) with ``compute_device`` set
to the CPU: the same bitsandbytes quantizers (``Params4bit`` NF4,
``Int8Params``; bitsandbytes 0.50 runs both on CPUs), the same
``_low_rank_decomposition`` (imported from peft), the same loop; and PEFT's
``LoraLayer.loftq_init`` assignment (``lora_A = R``, ``lora_B = L``, base weight
``= Q`` in its dtype).  The model is PEFT's toy ``MLP`` (``tests/test_custom_models.py``
at commit 5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40, ported in ``test_lora_peft_cases.py``).
"""

from __future__ import annotations

import copy
from typing import Any

import bitsandbytes as bnb
import peft
import pytest
import torch
from peft.utils.loftq_utils import _low_rank_decomposition, loftq_init
from torch import nn

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners.lora.inits.loftq import int8_roundtrip, nf4_roundtrip
from tests.tuners.lora.test_lora_peft_cases import MLP

X = torch.arange(90).view(9, 10)


def _peft_loftq_on_cpu(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int) -> tuple[Any, ...]:
    """peft 0.21.2 ``loftq_init`` with ``compute_device = "cpu"`` (the only change), returning ``(Q, A, B)``."""
    dtype = weight.dtype
    weight = weight.to(dtype=torch.float32)
    res = weight.clone()
    for i in range(num_iter):
        if num_bits == 4:
            qweight = bnb.nn.Params4bit(
                res.to("cpu"), requires_grad=False, compress_statistics=False, quant_type="nf4"
            ).to("cpu")
            dequantized_weight = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
        else:
            qweight = bnb.nn.Int8Params(res.to("cpu"), requires_grad=False).to("cpu")
            dequantized_weight = bnb.functional.int8_vectorwise_dequant(qweight.data, qweight.SCB)
        res = weight - dequantized_weight
        output = _low_rank_decomposition(res, reduced_rank=reduced_rank)
        L, R = output["L"], output["R"]
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(L, R)
    return dequantized_weight.to(dtype=dtype), R, L


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = MLP().eval().to(dtype)
    model.dtype = dtype
    return model


@pytest.mark.parametrize("shape", [(16, 40), (7, 13), (33, 65), (3, 64)])
def test_quantizers_equal_bitsandbytes_bit_for_bit(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.1
    q4 = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
    assert torch.equal(nf4_roundtrip(w), bnb.functional.dequantize_4bit(q4.data, q4.quant_state))
    q8 = bnb.nn.Int8Params(w.clone(), requires_grad=False).to("cpu")
    assert torch.equal(int8_roundtrip(w), bnb.functional.int8_vectorwise_dequant(q8.data, q8.SCB))


# (loftq_bits, loftq_iter, model dtype): every bit width peft 0.21 accepts, one and several rounds
CASES = [(4, 1, torch.float32), (4, 3, torch.float32), (8, 1, torch.float32), (8, 2, torch.float32)]
CASES += [(4, 2, torch.bfloat16), (8, 1, torch.bfloat16)]


@pytest.mark.parametrize(("bits", "iters", "dtype"), CASES)
def test_loftq_equals_peft_formulas(bits: int, iters: int, dtype: torch.dtype) -> None:
    model = _mlp(dtype)
    loftq = peft.LoftQConfig(loftq_bits=bits, loftq_iter=iters)
    cfg = ft.LoRAConfig(
        target_modules=["lin0", "lin1"], r=2, lora_alpha=4, init_lora_weights="loftq", loftq_config=loftq
    )
    assert cfg.loftq_config == {"loftq_bits": bits, "loftq_iter": iters}  # PEFT keeps vars(LoftQConfig) too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = ft.lora_init(model, cfg, generator=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # never written
    assert set(res.base_weights) == {"lin0.weight", "lin1.weight"}
    for name in ["lin0", "lin1"]:
        Q, A, B = _peft_loftq_on_cpu(model.get_submodule(name).weight.detach(), bits, 2, iters)
        torch.testing.assert_close(res.params[f"{name}.lora_A.default.weight"], A.to(dtype), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.params[f"{name}.lora_B.default.weight"], B.to(dtype), atol=1e-5, rtol=1e-5)
        assert res.base_weights[f"{name}.weight"].dtype == dtype
        torch.testing.assert_close(res.base_weights[f"{name}.weight"], Q, atol=1e-6, rtol=0)
    # the adapter on Q approximates the original model better than Q alone (LoftQ's purpose, with s = 2 here)
    clone = copy.deepcopy(model)
    clone.load_state_dict(res.base_weights, strict=False)
    w = model.lin0.weight.float()
    q = res.base_weights["lin0.weight"].float()
    ba = (res.params["lin0.lora_B.default.weight"] @ res.params["lin0.lora_A.default.weight"]).float()
    assert (w - q - ba).norm() < (w - q).norm()
    assert ft.apply(clone, res.params, (X,)).shape == model(X).shape


def test_shim_writes_the_quantized_base_as_peft_does() -> None:
    model = _mlp()
    cfg = ft.LoRAConfig(target_modules=["lin0"], r=2, init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    res = ft.lora_init(model, cfg, generator=0)
    sm = ft.Swift.prepare_model(copy.deepcopy(model), cfg)
    Q, A, B = _peft_loftq_on_cpu(model.lin0.weight.detach(), 4, 2, 1)
    assert torch.equal(sm.model.lin0.weight.detach(), res.base_weights["lin0.weight"])
    torch.testing.assert_close(sm.model.lin0.weight.detach(), Q, atol=1e-6, rtol=0)
    torch.testing.assert_close(sm.state_dict()["lin0.lora_A.default.weight"], A, atol=1e-5, rtol=1e-5)
    clone = copy.deepcopy(model)
    clone.load_state_dict(res.base_weights, strict=False)
    torch.testing.assert_close(sm(X), ft.apply(clone, res.params, (X,)), atol=1e-6, rtol=1e-6)
    # merging into the quantized base is exact; onto the original weights it is refused (the adapter fits Q)
    merged = ft.merge(clone, res.params)
    torch.testing.assert_close(merged["lin0.weight"], Q + 4.0 * (B @ A), atol=1e-5, rtol=1e-5)  # s = 8 / 2
    with pytest.raises(ConfigError, match="ORIGINAL"):
        ft.merge(copy.deepcopy(model), res.params)


def test_peft_loftq_needs_cuda() -> None:
    """peft 0.21.2 hard-codes compute_device='cuda' (or 'xpu'): on this CPU-only torch it raises."""
    if torch.cuda.is_available():  # then the comparison above should call PEFT's loftq_init directly
        pytest.fail("CUDA is available: compare with peft.utils.loftq_utils.loftq_init directly instead")
    with pytest.raises((AssertionError, RuntimeError)):
        loftq_init(torch.randn(8, 8), num_bits=4, reduced_rank=2, num_iter=1)


def test_loftq_refusals_are_typed() -> None:
    with pytest.raises(ConfigError, match="loftq_config"):
        ft.LoRAConfig(init_lora_weights="loftq")  # PEFT: "`loftq_config` must be specified"
    with pytest.raises(ConfigError, match="loftq_bits"):
        ft.LoRAConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2})  # peft 0.21: "Only nf4 and int8"
    with pytest.raises(ConfigError, match="loftq_iter"):
        ft.LoRAConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0})
    with pytest.raises(ConfigError, match="only read with"):
        ft.LoRAConfig(loftq_config={"loftq_bits": 4})
    cfg = ft.LoRAConfig(target_modules=["0"], r=2, init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    with pytest.raises(ConfigError, match=r"nn\.Linear"):
        ft.init(nn.Sequential(nn.Embedding(10, 4)), cfg, generator=0)
    big = ft.LoRAConfig(target_modules=["lin1"], r=4, init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    with pytest.raises(ConfigError, match="rank bound"):
        ft.init(_mlp(), big, generator=0)
    res = ft.lora_init(
        _mlp(),
        ft.LoRAConfig(target_modules=["lin0"], r=2, init_lora_weights="loftq", loftq_config={"loftq_bits": 4}),
        generator=0,
    )
    with pytest.raises(ConfigError, match="not low-rank"):
        ft.lora_to_plain(res.params, res.params)


def test_replace_lora_weights_loftq_on_a_bnb_4bit_layer() -> None:
    """PEFT's ``replace_lora_weights_loftq`` needs CUDA too (``_loftq_init_new`` moves to ``compute_device``);
    the reference is its body on the CPU: bitsandbytes' ``dequantize_4bit`` of the layer and PEFT's
    ``_low_rank_decomposition`` of ``W - Q`` (``lora_A = R``, ``lora_B = L``)."""
    torch.manual_seed(0)
    lin, head = nn.Linear(64, 64), nn.Linear(64, 8)
    original = {"0.weight": lin.weight.detach().clone()}
    q = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    model = nn.Sequential(q.to("cpu"), nn.ReLU(), head).eval()
    reference = nn.Sequential(lin, nn.ReLU(), head).eval()
    cfg = ft.LoRAConfig(target_modules=["0"], r=4, lora_alpha=4)
    p = ft.init(model, cfg, generator=0)
    new = ft.lora_replace_weights_loftq(model, p, original)
    deq = bnb.functional.dequantize_4bit(model[0].weight.data, model[0].weight.quant_state)
    out = _low_rank_decomposition(original["0.weight"] - deq, reduced_rank=4)
    torch.testing.assert_close(new["0.lora_A.default.weight"], out["R"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new["0.lora_B.default.weight"], out["L"], atol=1e-5, rtol=1e-5)
    x = torch.randn(16, 64)
    before = (ft.apply(model, p, (x,)) - reference(x)).norm()
    after = (ft.apply(model, new, (x,)) - reference(x)).norm()
    assert after < before  # the quantization error shrinks (PEFT's purpose; s = 1 here)
    kept = ft.lora_replace_weights_loftq(model, p, original, callback=lambda name, cand: False)
    assert all(torch.equal(kept[k], p[k]) for k in p)  # a refused replacement is rolled back, as PEFT's callback
    with pytest.raises(ConfigError, match="quantized"):
        ft.lora_replace_weights_loftq(reference, ft.init(reference, cfg, generator=0), original)
    with pytest.raises(ConfigError, match="original_weights"):
        ft.lora_replace_weights_loftq(model, p, {})
