"""EVA and CorDA through the shim (:mod:`functuner.shim.data_init`) against the real ``peft`` on the same data.

PEFT's routes: ``get_peft_model`` + ``initialize_lora_eva_weights(peft_model, dataloader, ...)`` and
``preprocess_corda(model, config, run_model=...)`` + ``get_peft_model``; functuner's:
``Swift.prepare_model`` + ``initialize_lora_eva_weights(swift_model, dataloader, ...)`` and
``preprocess_corda(model, config, run_model=...)`` (returns the ``SwiftModel``).  Compared: ``A``, ``B``,
the base weights, EVA's redistributed ranks, and the forward.  The models: PEFT's toy ``MLP``
(``tests/test_custom_models.py`` at commit 5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40) and a tiny Llama.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda
from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_initialize_eva
from torch import nn

import functuner as ft
from functuner.errors import ConfigError
from functuner.shim.data_init import initialize_lora_eva_weights, preprocess_corda
from tests.models import SMALL_LLAMA, tiny_llama
from tests.tuners.lora.test_lora_peft_cases import MLP

X = torch.arange(90).view(9, 10)
ATOL = RTOL = 1e-5


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def _factors(pm: Any, sm: ft.SwiftModel, name: str) -> None:
    layer = pm.base_model.model.get_submodule(name)
    ours = sm.state_dict()
    torch.testing.assert_close(
        ours[f"{name}.lora_B.default.weight"], layer.lora_B["default"].weight, atol=ATOL, rtol=RTOL
    )
    torch.testing.assert_close(sm.model.get_submodule(name).weight, layer.base_layer.weight, atol=ATOL, rtol=RTOL)


def test_eva_through_the_shim_equals_peft(tmp_path: Path) -> None:
    model = _mlp()
    kwargs: dict[str, Any] = {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 8, "init_lora_weights": "eva"}
    eva = {"rho": 2.0, "use_label_mask": False}
    layer_fn = lambda layer_input, model_input, layer_name: layer_input[0].float()  # noqa: E731
    with pytest.warns(UserWarning, match="low_cpu_mem_usage"):  # PEFT's advice for large models
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs, eva_config=peft.EvaConfig(**eva)))
    peft_initialize_eva(
        pm,
        dataloader=[X],
        forward_fn=lambda m, inputs: m(inputs),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=layer_fn,
        show_progress_bar=False,
    )
    pm.eval()
    sm = ft.Swift.prepare_model(copy.deepcopy(model), ft.LoRAConfig(**kwargs, eva_config=eva))
    out = initialize_lora_eva_weights(
        sm,
        dataloader=[X],
        forward_fn=lambda m, inputs: m(inputs),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=layer_fn,
        show_progress_bar=False,
    )
    assert out is sm
    cfg, pcfg = sm.adapters["default"].config, pm.peft_config["default"]
    assert cfg.init_lora_weights == "eva"
    assert cfg.rank_pattern == pcfg.rank_pattern
    assert cfg.alpha_pattern == pytest.approx(pcfg.alpha_pattern)
    for name in cfg.target_modules:
        A = pm.base_model.model.get_submodule(name).lora_A["default"].weight.detach()
        ours = sm.state_dict()[f"{name}.lora_A.default.weight"].detach()
        # PEFT fits incrementally with a randomized SVD: same components up to sign and fp32 round-off
        torch.testing.assert_close(ours.abs(), A.abs(), atol=1e-4, rtol=1e-3)
        _factors(pm, sm, name)
    assert all(p.requires_grad for k, p in sm.named_parameters() if "lora_" in k)
    torch.testing.assert_close(sm(X), pm(X), atol=1e-6, rtol=1e-6)
    # the adapter is a plain functuner LoRA adapter afterwards: its params run functionally too
    params = sm.adapters["default"].params
    torch.testing.assert_close(ft.apply(model, params, (X,)), pm(X), atol=1e-6, rtol=1e-6)
    # saved and loaded again (SWIFT's layout; PEFT's layout read by PEFT): the same adapter
    sm.save_pretrained(str(tmp_path / "swift"))
    again = ft.Swift.from_pretrained(copy.deepcopy(model), str(tmp_path / "swift"))
    assert again.adapters["default"].config.rank_pattern == cfg.rank_pattern
    torch.testing.assert_close(again(X), pm(X), atol=1e-6, rtol=1e-6)
    ft.save(params, tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(theirs(X), pm(X), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_through_the_shim_equals_peft(method: str) -> None:
    model = _mlp()
    kwargs: dict[str, Any] = {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 8, "init_lora_weights": "corda"}
    peft_cfg = peft.LoraConfig(**kwargs, corda_config=CordaConfig(corda_method=method))
    pmodel = copy.deepcopy(model)
    peft_preprocess_corda(pmodel, peft_cfg, run_model=lambda: pmodel(X))
    pm = peft.get_peft_model(pmodel, peft_cfg).eval()
    ours = copy.deepcopy(model)
    sm = preprocess_corda(
        ours, ft.LoRAConfig(**kwargs, corda_config={"corda_method": method}), run_model=lambda: ours(X)
    )
    assert isinstance(sm, ft.SwiftModel)
    for name in ["lin0", "lin1"]:
        A = pm.base_model.model.get_submodule(name).lora_A["default"].weight
        torch.testing.assert_close(sm.state_dict()[f"{name}.lora_A.default.weight"], A, atol=ATOL, rtol=RTOL)
        _factors(pm, sm, name)
    torch.testing.assert_close(sm(X), pm(X), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sm(X), model(X), atol=1e-4, rtol=1e-4)
    # the residual base is guarded as for any CorDA adapter: a merge/unmerge round trip is exact
    ft.Swift.merge(sm)
    torch.testing.assert_close(sm(X), pm(X), atol=1e-5, rtol=1e-5)
    ft.Swift.unmerge(sm)


def test_data_inits_refuse_other_configs_and_leave_the_model_alone() -> None:
    model = _mlp()
    sm = ft.Swift.prepare_model(copy.deepcopy(model), ft.LoRAConfig(target_modules=["lin0"]))
    with pytest.raises(ConfigError, match="init_lora_weights='eva'"):
        initialize_lora_eva_weights(sm, [X], forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None)
    plain = copy.deepcopy(model)
    with pytest.raises(ConfigError, match="init_lora_weights='corda'"):
        preprocess_corda(plain, ft.LoRAConfig(target_modules=["lin0"]), run_model=lambda: plain(X))
    # a run that never reaches a targeted module: refused, the model keeps no hook and no adapter
    cfg = ft.LoRAConfig(target_modules=["lin0"], r=2, init_lora_weights="corda")
    with pytest.raises(ConfigError, match="never called"):
        preprocess_corda(plain, cfg, run_model=lambda: None)
    assert not plain.lin0._forward_hooks
    assert torch.equal(plain.lin0.weight, model.lin0.weight)


# PEFT's constructor reads transformers' deprecated `is_gradient_checkpointing` on a transformers model (pyproject's
# filter covers it, but pytest.warns re-emits it from this module when it leaves the block)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_eva_with_peft_default_input_functions_on_llama() -> None:
    """PEFT's defaults (``model(**batch)``, padding and ``labels == -100`` masked out) on a tiny Llama, whose q/v
    projections share their input (PEFT computes that SVD once): the same ranks, the same components up to sign.
    PEFT fits its PCA incrementally by randomized SVD until the components stop moving (``tau``), functuner
    exactly: the entries agree to 1e-2 here, not to fp32 round-off."""
    model = tiny_llama(**SMALL_LLAMA)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 18:] = 0
    mask[2, 20:] = 0
    labels = ids.clone()
    labels[1, :5] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    kw: dict[str, Any] = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 2, "init_lora_weights": "eva"}
    with pytest.warns(UserWarning, match="low_cpu_mem_usage"):
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw, eva_config=peft.EvaConfig(rho=2.0)))
    peft_initialize_eva(pm, dataloader=[batch], show_progress_bar=False)
    sm = ft.Swift.prepare_model(copy.deepcopy(model), ft.LoRAConfig(**kw, eva_config={"rho": 2.0}))
    initialize_lora_eva_weights(sm, [batch])
    assert sm.adapters["default"].config.rank_pattern == pm.peft_config["default"].rank_pattern
    ours = sm.state_dict()
    theirs = {n.removeprefix("base_model.model."): p for n, p in pm.named_parameters() if "lora_A" in n}
    assert set(theirs) == {k for k in ours if "lora_A" in k}
    for k, a in theirs.items():
        torch.testing.assert_close(ours[k].abs(), a.detach().abs(), atol=1e-2, rtol=0, msg=k)
    pm.eval()
    torch.testing.assert_close(sm(**batch).logits, pm(**batch).logits)
