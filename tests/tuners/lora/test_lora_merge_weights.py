"""``functuner.merge`` / ``unmerge`` on a ``{name: tensor}`` weights mapping equal the model merge, bitwise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError
from functuner.io.merge_shards import merge_checkpoint
from functuner.tuners.longlora import LongLoRAConfig
from tests.conftest import tiny_gpt2, tiny_llama


class Mixed(nn.Module):
    """One of every layer kind LoRA adapts, plus a head for modules_to_save and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 6)
        self.wide = nn.Linear(6, 9, bias=False)
        self.c1 = nn.Conv1d(3, 4, 3)
        self.c2 = nn.Conv2d(3, 5, (3, 2))
        self.pw = nn.Conv2d(3, 2, 1)
        self.head = nn.Linear(9, 2)
        self.register_buffer("scale", torch.ones(2))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    return state


ALL = ["emb", "lin", "wide", "c1", "c2", "pw"]
CASES: dict[str, tuple[Callable[[], nn.Module], list[dict[str, object]]]] = {
    "linear": (Mixed, [dict(target_modules=["lin", "wide"], bias="lora_only")]),
    "embedding": (Mixed, [dict(target_modules=["emb"])]),
    "conv1d_conv2d": (Mixed, [dict(target_modules=["c1", "c2", "pw"], rank_pattern={"c2": 3})]),
    "dora": (Mixed, [dict(target_modules=ALL, use_dora=True, use_rslora=True)]),
    "modules_to_save_bias_all": (Mixed, [dict(target_modules=["lin"], modules_to_save=["head"], bias="all")]),
    "gpt2_conv1d": (tiny_gpt2, [dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)]),
    "gpt2_embedding_tied": (tiny_gpt2, [dict(target_modules=["wte", "c_attn"], fan_in_fan_out=True)]),
    "llama_two_adapters_dora": (
        tiny_llama,
        [
            dict(target_modules=["q_proj", "v_proj", "embed_tokens"]),
            dict(target_modules=["q_proj", "o_proj"], use_dora=True, r=3),
        ],
    ),
}


def _params(model: nn.Module, specs: list[dict[str, object]]) -> list[ft.TunerParams]:
    out = []
    for i, spec in enumerate(specs):
        cfg = ft.LoRAConfig(**{"r": 2, "lora_alpha": 5, "init_lora_weights": False, **spec})  # type: ignore[arg-type]
        out.append(ft.init(model, cfg, generator=i, adapter_name=f"a{i}"))
    return out


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_of_weights_equals_merge_of_model_bitwise(case: str) -> None:
    build, specs = CASES[case]
    model = build()
    params = _params(model, specs)
    want = ft.merge(model, params)
    changed = [k for k in want if want[k] is not _state(model).get(k)]
    assert changed  # the case merges something
    _assert_same(ft.merge(_state(model), params), want)
    # a plain state_dict (detached copies, persistent buffers only) gives the same values under its own names
    sd = model.state_dict()
    got = ft.merge(sd, params)
    assert set(got) == set(sd)
    for k in sd:
        if k in want and not (case == "gpt2_embedding_tied" and k == "lm_head.weight"):  # ties are invisible in sd
            assert torch.equal(got[k], want[k]), k
    # the weights path leaves its input alone
    assert all(got[k] is sd[k] for k in sd if k not in changed)


@pytest.mark.parametrize("case", ["linear", "embedding", "conv1d_conv2d", "gpt2_conv1d", "modules_to_save_bias_all"])
def test_unmerge_of_weights_equals_unmerge_of_model_bitwise(case: str) -> None:
    build, specs = CASES[case]
    model = build()
    params = _params(model, specs)
    merged = ft.merge(model, params)
    _assert_same(ft.unmerge(merged, params), ft.unmerge(model, params, merged))


def test_bf16_weights_are_rounded_once_like_the_model() -> None:
    model = Mixed().to(torch.bfloat16)
    params = _params(model, [dict(target_modules=ALL)])
    _assert_same(ft.merge(_state(model), params), ft.merge(model, params))


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["linear", "gpt2", "embedding", "conv1d", "conv2d"]),
    fan_in=st.integers(1, 7),
    fan_out=st.integers(1, 7),
    r=st.integers(1, 5),
    dora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_weights_merge_equals_model_merge(
    kind: str, fan_in: int, fan_out: int, r: int, dora: bool, seed: int
) -> None:
    import transformers.pytorch_utils as tpu

    torch.manual_seed(seed)
    layer: nn.Module = {
        "linear": lambda: nn.Linear(fan_in, fan_out),
        "gpt2": lambda: tpu.Conv1D(fan_out, fan_in),
        "embedding": lambda: nn.Embedding(fan_in, fan_out),
        "conv1d": lambda: nn.Conv1d(fan_in, fan_out, 2),
        "conv2d": lambda: nn.Conv2d(fan_in, fan_out, (2, 1)),
    }[kind]()
    model = nn.Sequential(layer)
    cfg = ft.LoRAConfig(
        r=r, target_modules=["0"], init_lora_weights=False, use_dora=dora, fan_in_fan_out=kind == "gpt2"
    )
    params = ft.init(model, cfg, generator=seed)
    want = ft.merge(model, params)
    _assert_same(ft.merge(_state(model), params), want)
    if not dora:
        _assert_same(ft.unmerge(want, params), ft.unmerge(model, params, want))


def test_square_gpt2_weight_needs_fan_in_fan_out() -> None:
    """A square Conv1D weight fits both layouts: the config's fan_in_fan_out decides, as PEFT requires."""
    model = tiny_gpt2()
    params = _params(model, [dict(target_modules=["attn.c_proj"], fan_in_fan_out=True)])
    _assert_same(ft.merge(_state(model), params), ft.merge(model, params))
    wrong = ft.TunerParams(dict(params[0]), ft.LoRAConfig(r=2, lora_alpha=5, target_modules=["attn.c_proj"]), "a0")
    assert not torch.equal(
        ft.merge(_state(model), wrong)["transformer.h.0.attn.c_proj.weight"],
        ft.merge(model, params)["transformer.h.0.attn.c_proj.weight"],
    )


def test_weights_that_do_not_fit_are_named() -> None:
    model = Mixed()
    (params,) = _params(model, [dict(target_modules=["lin", "wide"])])
    state = _state(model)
    with pytest.raises(ParamsMismatchError, match=r"'wide\.weight', which the base does not have"):
        ft.merge({k: v for k, v in state.items() if k != "wide.weight"}, params)
    with pytest.raises(ParamsMismatchError, match=r"wide\.lora_A\.a0\.weight.*does not fit weight 'wide\.weight'"):
        ft.merge({**state, "wide.weight": torch.zeros(9, 5)}, params)
    wrong_rank = ft.TunerParams(dict(params), ft.LoRAConfig(r=4, target_modules=["lin", "wide"]), "a0")
    with pytest.raises(ParamsMismatchError, match="has rank 2, but the config says r=4"):
        ft.merge(state, wrong_rank)


def test_tuner_whose_merge_reads_modules_asks_for_the_model() -> None:
    model = tiny_llama()
    cfg = LongLoRAConfig(r=2, target_modules=["q_proj"], embedder_and_normalizer=None)
    params = ft.init(model, cfg, generator=0)
    ft.merge(model, params)  # fine with the model
    with pytest.raises(ConfigError, match=r"pass the model: functuner\.merge\(model, params"):
        ft.merge(_state(model), params)
    with pytest.raises(ConfigError, match=r"pass the model: functuner\.unmerge\(model, params"):
        ft.unmerge(_state(model), params)


def test_bad_first_argument_and_duplicate_weights_are_config_errors() -> None:
    model = Mixed()
    (params,) = _params(model, [dict(target_modules=["lin"])])
    with pytest.raises(ConfigError, match="expected an nn.Module or a {name: tensor} weights mapping"):
        ft.merge([1, 2], params)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pass the weights once"):
        ft.merge(_state(model), params, _state(model))
    with pytest.raises(ConfigError, match="pass the merged weights"):
        ft.unmerge(model, params)


@pytest.mark.parametrize("case", ["dora", "modules_to_save_bias_all", "gpt2_conv1d", "conv1d_conv2d"])
def test_streaming_shard_merge_equals_weights_merge_bitwise(case: str, tmp_path: Path) -> None:
    """functuner.io.merge_shards uses LoRA's layout and formula: a streamed merge is ``functuner.merge``."""
    build, specs = CASES[case]
    model = build()
    (params,) = _params(model, specs[:1])
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "base").mkdir()
    (tmp_path / "out").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    merge_checkpoint(tmp_path / "base", tmp_path / "out", dict(params), params.config, params.adapter_name)
    _assert_same(load_file(str(tmp_path / "out" / "model.safetensors")), ft.merge(base, params))
