"""Merging adapters into quantized bases: float merge, re-quantized layers with their rounding error, the shim.

* ``functuner.quant.merge_quantized``: the float merged weights run (``functional_call`` on the float model of
  the same architecture) as the adapted quantized model does; each adapted quantized layer comes back
  re-quantized, with the max-abs and relative error of its weight against the float merge, and that error
  is what re-quantizing really did (recomputed here from the returned layer);
* against PEFT's own merge where PEFT has one on CPU (bitsandbytes 4/8-bit, HQQ): the same re-quantized
  weights (PEFT re-quantizes the same float merge);
* the shim: ``Swift.merge`` swaps a re-quantized weight in, ``Swift.unmerge`` puts the original quantized
  storage object back (bit-exact), ``merge_and_unload`` leaves a working quantized model (the issue's
  ``'Parameter' object has no attribute 'CB'`` on bitsandbytes 8-bit); HQQ, whose storage is a tensor plus a
  dict, is refused by the shim before anything changes (``merge_quantized`` handles it).
"""

from __future__ import annotations

import peft
import pytest
import torch
from torch.func import functional_call

import functuner as ft
from functuner import LoRAConfig, Swift
from functuner.errors import UnsupportedModuleError
from functuner.quant import dense_weight, merge_quantized, rounding_error
from tests.quant.quant_models import BACKENDS, TARGETS, float_llama, ids, quantized_llama

pytestmark = pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated without:UserWarning")

# re-quantization error bounds of a merged weight, relative (Frobenius): what each format's step allows
REL_BOUND = {"bnb4": 0.15, "bnb8": 0.02, "torchao8": 0.02, "quanto8": 0.02, "quanto4": 0.15, "hqq4": 0.15}
CFG = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_quantized_float_weights_and_requantized_layers(backend: str) -> None:
    model = quantized_llama(backend)
    p = ft.init(model, LoRAConfig(**CFG), generator=0)
    x = ids()
    with torch.no_grad():
        adapted = ft.apply(model, p, kwargs={"input_ids": x}).logits
    res = merge_quantized(model, p)
    # float merge: every quantized layer's weight is dense fp32 and the storage keys are gone
    for name, module in model.named_modules():
        if dense_weight(module) is not None:
            w = res.weights[f"{name}.weight"]
            assert w.dtype == torch.float32 and type(w) is torch.Tensor
    with torch.no_grad():
        merged_float = functional_call(float_llama(), res.weights, (), {"input_ids": x}).logits
    # the quantized kernels compute x @ dequant(W) in their own order (bnb 4-bit on CPU: bf16 on AVX512-BF16)
    torch.testing.assert_close(merged_float, adapted, atol=2e-2, rtol=0)
    # re-quantized layers, with the error they introduced against the float merge
    adapted_layers = {n for n, _ in model.named_modules() if n.endswith(tuple(TARGETS))}
    assert set(res.layers) == adapted_layers == set(res.errors)
    for name, layer in res.layers.items():
        assert type(layer) is type(model.get_submodule(name))
        err = res.errors[name]
        again = rounding_error(dense_weight(layer), res.weights[f"{name}.weight"])
        assert err == again
        assert 0 < err.max_abs and 0 < err.relative < REL_BOUND[backend], (name, err)
    # the model itself is untouched
    torch.testing.assert_close(_logits(model, x), _logits(quantized_llama(backend), x), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["bnb4", "bnb8", "hqq4"])
def test_requantized_merge_matches_peft_merge(backend: str) -> None:
    """PEFT merges into these layers on CPU by re-quantizing the float merge: the same weights come out."""
    model = quantized_llama(backend)
    p = ft.init(model, LoRAConfig(**CFG), generator=0)
    res = merge_quantized(model, p)
    pm = peft.get_peft_model(quantized_llama(backend), peft.LoraConfig(**{**CFG, "init_lora_weights": True}))
    peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(p))
    if backend.startswith("bnb"):  # PEFT says re-quantizing rounds (functuner reports how much instead)
        with pytest.warns(UserWarning, match="may get different generations due to rounding errors"):
            unloaded = pm.merge_and_unload()
    else:
        unloaded = pm.merge_and_unload()
    for name, layer in res.layers.items():
        theirs = dense_weight(unloaded.get_submodule(name))
        assert theirs is not None
        torch.testing.assert_close(dense_weight(layer), theirs, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("backend", ["bnb4", "bnb8", "torchao8", "quanto8", "quanto4"])
def test_shim_merge_swaps_requantized_storage_and_unmerge_restores_the_original(backend: str, tmp_path) -> None:
    model = quantized_llama(backend)
    p = ft.init(model, LoRAConfig(**CFG), generator=0)
    ft.save(p, tmp_path / "a")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    original = layer.weight
    sm = Swift.from_pretrained(model, str(tmp_path / "a"))
    x = ids()
    adapted = _logits(sm, x)
    # what the merged model must compute: the layers merge_quantized re-quantizes, in a copy of the base
    expected = quantized_llama(backend)
    for name, new in merge_quantized(expected, p).layers.items():
        expected.set_submodule(name, new)
    Swift.merge(sm)
    assert layer.weight is not original
    merged = _logits(sm, x)
    torch.testing.assert_close(merged, _logits(expected, x), atol=0, rtol=0)
    Swift.unmerge(sm)
    assert layer.weight is original
    torch.testing.assert_close(_logits(sm, x), adapted, atol=0, rtol=0)
    # merge_and_unload leaves a working quantized model (bitsandbytes 8-bit raised "no attribute 'CB'")
    Swift.merge_and_unload(sm)
    torch.testing.assert_close(_logits(model, x), merged, atol=0, rtol=0)
    torch.testing.assert_close(_logits(model, x), _logits(model, x), atol=0, rtol=0)


def test_shim_refuses_hqq_merge_before_any_change() -> None:
    model = quantized_llama("hqq4")
    sm = Swift.prepare_model(model, LoRAConfig(**CFG))
    x = ids()
    before = _logits(sm, x)
    storage = {n: t for n, t in model.named_parameters()}
    with pytest.raises(UnsupportedModuleError, match=r"layers\.0\..*HQQLinear.*merge_quantized"):
        Swift.merge(sm)
    assert {n: t for n, t in model.named_parameters()} == storage
    torch.testing.assert_close(_logits(sm, x), before, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["quanto8", "hqq4"])
def test_dora_merge_on_a_quantized_base_is_the_adapted_model(backend: str) -> None:
    """DoRA's merged weight uses the dequantized base for its norm, as its forward does (exact kernels here)."""
    model = quantized_llama(backend)
    p = ft.init(model, LoRAConfig(**CFG, use_dora=True), generator=0)
    x = ids()
    with torch.no_grad():
        adapted = ft.apply(model, p, kwargs={"input_ids": x}).logits
        merged = functional_call(float_llama(), merge_quantized(model, p).weights, (), {"input_ids": x}).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
