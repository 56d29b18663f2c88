"""LoRA on the module types and options added for PEFT's test table: per-sample use and typed refusals.

The table itself (forward, gradients, merge, save / load against peft) is
``test_lora_peft_cases.py``.  Here: per-sample adapters (``apply_mixed``) on
``nn.Conv3d`` and with ``lora_bias`` against peft's ``adapter_names``; the
refusals functuner shares with peft (each checked against peft too); the merges
that cannot be done (grouped convolutions, ``lora_bias`` on a layer without
bias); a rank larger than a layer's dimensions through a PEFT directory.
"""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch
from torch import nn

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners.lora.mixed import apply_mixed, stack_adapters
from tests.tuners.lora.test_lora_peft_cases import make_inputs, make_model


def _peft_with_two(model: nn.Module, kwargs: dict[str, Any]) -> tuple[peft.PeftModel, list[ft.TunerParams]]:
    """A peft model with adapters ``a`` and ``b`` (random B), and the same tensors as functuner params."""
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **kwargs), "a")
    torch.manual_seed(1)
    pm.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **{**kwargs, "lora_alpha": 3}))
    pm.eval()
    out = []
    for name, extra in (("a", {}), ("b", {"lora_alpha": 3})):
        cfg = ft.LoRAConfig(init_lora_weights=False, **{**kwargs, **extra})
        state = peft.get_peft_model_state_dict(pm, adapter_name=name)
        tensors = ft.from_peft_state_dict(state, name, config=cfg)
        out.append(ft.TunerParams({k: v.detach().clone() for k, v in tensors.items()}, cfg, name))
    return pm, out


@pytest.mark.parametrize(
    ("model_id", "kwargs"),
    [
        ("Conv3d", {"target_modules": ["conv3d", "lin0"]}),
        ("MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
        ("Conv2d", {"target_modules": ["conv2d"], "lora_bias": True}),
    ],
    ids=["conv3d", "mlp_lora_bias", "conv2d_lora_bias"],
)
def test_per_sample_matches_peft_adapter_names(model_id: str, kwargs: dict[str, Any]) -> None:
    model = make_model(model_id)
    g = torch.Generator().manual_seed(3)
    X = {"MLP": torch.randn(6, 10, generator=g), "Conv2d": torch.randn(6, 45, generator=g)}.get(
        model_id,
        torch.randn(6, 5, 27, generator=g),  # Conv3d: one (5, 3, 3, 3) volume per sample
    )
    pm, params = _peft_with_two(model, kwargs)
    names = ["a", "__base__", "b", "b", "a", "__base__"]
    ours = apply_mixed(model, params, names, (X,))
    theirs = pm(X, adapter_names=names)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # and each sample equals its adapter applied alone
    for i, n in enumerate(names):
        alone = model(X[i : i + 1]) if n == "__base__" else ft.apply(model, params["ab".index(n)], (X[i : i + 1],))
        torch.testing.assert_close(ours[i : i + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("model_id", "kwargs"),
    [("Conv2dGroups", {"target_modules": ["conv2d"]}), ("MHA", {"target_modules": ["mha"]})],
    ids=["grouped_conv", "mha"],
)
def test_per_sample_refuses_naming_the_type(model_id: str, kwargs: dict[str, Any]) -> None:
    model = make_model(model_id)
    p = ft.init(model, ft.LoRAConfig(**kwargs), generator=0)
    with pytest.raises(ConfigError, match="Conv2d|MultiheadAttention"):
        stack_adapters(model, [p])


@pytest.mark.parametrize(
    ("model_id", "kwargs", "word"),
    [
        ("EmbConv1D", {"target_modules": ["emb"], "lora_bias": True}, "embedding"),
        ("MLP", {"target_modules": ["lin0"], "lora_bias": True, "use_dora": True}, "DoRA"),
        ("Conv2dGroups2", {"target_modules": ["conv2d"], "r": 3}, "divisible"),
        ("MHA", {"target_modules": ["mha"], "use_dora": True}, "DoRA"),
    ],
    ids=["lora_bias_embedding", "lora_bias_dora", "rank_not_divisible_by_groups", "mha_dora"],
)
def test_refusals_peft_shares(model_id: str, kwargs: dict[str, Any], word: str) -> None:
    """Rows PEFT itself refuses: functuner refuses them too, with a ConfigError naming the reason."""
    model = make_model(model_id)
    with pytest.raises(ValueError):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
    with pytest.raises(ConfigError, match=word):
        ft.init(model, ft.LoRAConfig(**kwargs), generator=0)


def test_grouped_conv_merge_is_refused_for_a_model_and_for_weights() -> None:
    model = make_model("Conv2dGroups")
    p = ft.init(model, ft.LoRAConfig(target_modules=["conv2d"], init_lora_weights=False), generator=0)
    for target in (model, dict(model.state_dict())):
        with pytest.raises(ConfigError, match=r"grouped convolution \(groups=8\)"):
            ft.merge(target, p)
    with pytest.raises(ConfigError, match="grouped"):
        ft.unmerge(dict(model.state_dict()), p)


def test_lora_bias_merge_needs_a_base_bias() -> None:
    """PEFT refuses to merge lora_bias into a layer without bias (RuntimeError); functuner: a ConfigError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).eval()
    kwargs = {"target_modules": ["0"], "lora_bias": True, "init_lora_weights": False}
    with pytest.warns(UserWarning, match="lora_bias=True"):  # PEFT warns that merging will not be possible
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
    with pytest.raises(RuntimeError):
        pm.merge_and_unload()
    p = ft.init(model, ft.LoRAConfig(**kwargs), generator=0)
    ft.apply(model, p, (torch.randn(2, 4),))  # the unmerged forward works
    with pytest.raises(ConfigError, match="'0.bias'"):
        ft.merge(model, p)


def test_lora_bias_unmerge_restores_the_bias() -> None:
    model = make_model("MLP")
    p = ft.init(
        model, ft.LoRAConfig(target_modules=["lin0", "lin1"], lora_bias=True, init_lora_weights=False), generator=0
    )
    merged = ft.merge(model, p)
    assert not torch.allclose(merged["lin0.bias"], model.lin0.bias)
    back = ft.unmerge(merged, p)
    for k in ("lin0.bias", "lin1.bias", "lin0.weight"):
        torch.testing.assert_close(back[k], model.state_dict()[k], atol=1e-6, rtol=1e-6)


def test_rank_larger_than_the_layer_loads_from_a_peft_directory(tmp_path: Any) -> None:
    """r=16 on a 5 -> 1 layer and a 10 -> 2 layer: valid in PEFT, so in functuner's reader too."""
    model = make_model("EmbConv1D")
    p = ft.init(model, ft.LoRAConfig(target_modules=["conv1d", "lin0"], r=16, init_lora_weights=False), generator=0)
    out = ft.save(p, tmp_path / "big_r", format="peft")
    back = ft.load(out, model)
    X = make_inputs()
    torch.testing.assert_close(ft.apply(model, back, (X,)), ft.apply(model, p, (X,)), atol=0, rtol=0)
    # one config for a GPT-2 Conv1D and a Linear: PEFT warns it flips fan_in_fan_out for the Linear
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        reread = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    torch.testing.assert_close(reread(X), ft.apply(model, p, (X,)), atol=1e-5, rtol=1e-5)
