"""The standalone TrainableTokens tuner (:mod:`functuner.tuners.trainable_tokens`) against the real ``peft``.

One table of (model, ``token_indices``, ``target_modules``) rows, each run through the same checks as
PEFT's ``TrainableTokensConfig``: forward (eval), gradients of one weighted loss, merged forward
(``merge_and_unload``), unmerge, functuner's PEFT-format save loaded by PEFT, PEFT's save loaded by
functuner, SWIFT-format round trip, and the shim (``Swift.prepare_model``, merge/unmerge, state dict).
Rows: PEFT's ``ModelEmbConv1D`` (``tests/test_custom_models.py`` at huggingface/peft commit
5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40, its "Embedding + transformers Conv1D" toy model), a tiny Llama
with ``lm_head`` tied to the input embedding (``target_modules=None``: PEFT picks the input embedding and
ties a token adapter to ``lm_head``), the same Llama untied, and GPT-2 (``wte`` tied to ``lm_head``).
Tolerances as PEFT's ``testing_common`` for fp32 (1e-5).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import functuner as ft
from functuner.errors import ConfigError, UnsupportedModuleError
from functuner.io.merge_shards import merge_checkpoint
from tests.models import SMALL_LLAMA, tiny_gpt2, tiny_llama
from tests.tuners.peft_native.native_peft_helpers import peft_emb_conv1d

ATOL = RTOL = 1e-5
IDS = [1, 5, 7]


def _llama_tied() -> nn.Module:
    return tiny_llama(tie_word_embeddings=True, **SMALL_LLAMA)


def _llama_untied() -> nn.Module:
    return tiny_llama(tie_word_embeddings=False, **SMALL_LLAMA)


def _ids(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, vocab, (2, 8), generator=g)
    x[:, :3] = torch.tensor(IDS)  # the trained rows are read
    return {"input_ids": x}


def _emb_inputs() -> dict[str, torch.Tensor]:
    return {"X": torch.tensor([[1, 5, 7, 2, 3, 1, 0, 9, 7, 5], [7, 7, 1, 4, 8, 2, 5, 5, 1, 6]])}


# (name, model, target_modules (None: the input embedding), inputs, PEFT key of the rows, modules sharing it)
ROWS: list[tuple[str, Callable[[], nn.Module], Any, Callable[[], dict[str, torch.Tensor]], str]] = [
    ("emb_conv1d", peft_emb_conv1d, ["emb"], _emb_inputs, "emb"),
    ("llama_tied_default_target", _llama_tied, None, lambda: _ids(32), "model.embed_tokens"),
    ("llama_untied", _llama_untied, ["embed_tokens"], lambda: _ids(32), "model.embed_tokens"),
    ("gpt2_tied", tiny_gpt2, ["wte"], lambda: _ids(64), "transformer.wte"),
]


def _out(o: Any) -> torch.Tensor:
    return o if isinstance(o, torch.Tensor) else o["logits"]


def _pair(model: nn.Module, targets: Any, module: str) -> tuple[ft.TunerParams, Any, peft.TrainableTokensConfig]:
    """(our params with trained rows, PEFT's model holding the same rows, PEFT's config)."""
    theirs_cfg = peft.TrainableTokensConfig(target_modules=targets, token_indices=IDS)
    p = ft.init(model, ft.TrainableTokensConfig(target_modules=targets, token_indices=IDS), generator=0)
    key = f"{module}.trainable_tokens_delta.default"
    assert list(p) == [key]
    assert torch.equal(p[key], model.get_submodule(module).weight[IDS])  # init_weights=True: a copy of the rows
    g = torch.Generator().manual_seed(3)
    p = p.replace({key: p[key] + torch.randn(p[key].shape, generator=g)})  # as after training
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(theirs_cfg)).eval()
    peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(p))
    return p, pm, theirs_cfg


@pytest.mark.parametrize(("row", "make", "targets", "inputs", "module"), ROWS, ids=[r[0] for r in ROWS])
def test_parity_table(
    row: str, make: Callable[[], nn.Module], targets: Any, inputs: Callable[[], Any], module: str, tmp_path: Path
) -> None:
    model = make()
    x = inputs()
    p, pm, theirs_cfg = _pair(model, targets, module)
    key = next(iter(p))
    # forward and gradients
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    ours = _out(ft.apply(model, p.replace(leaves), kwargs=x))
    theirs = _out(pm(**x))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    assert (ours - _out(model(**x))).abs().max() > 1e-3  # the rows change the output: parity is not vacuous
    w = torch.linspace(-1, 1, ours.numel()).reshape(ours.shape)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), [leaves[key]])
    (theirs * w).sum().backward()
    g_theirs = dict(pm.named_parameters())[f"base_model.model.{module}.trainable_tokens_delta.default"].grad
    torch.testing.assert_close(g_ours, g_theirs, atol=ATOL, rtol=1e-4)
    # merged forward (PEFT's merge_and_unload), merged weights, unmerge
    merged = ft.merge(model, p)
    unloaded = copy.deepcopy(pm).merge_and_unload().eval()
    torch.testing.assert_close(_out(torch.func.functional_call(model, merged, (), x)), _out(unloaded(**x)))
    torch.testing.assert_close(merged[f"{module}.weight"], unloaded.state_dict()[f"{module}.weight"])
    restored = ft.unmerge(model, p, merged)
    assert torch.equal(restored[f"{module}.weight"], model.get_submodule(module).weight)
    # PEFT loads functuner's PEFT-format save; functuner loads PEFT's save
    out = ft.save(p, tmp_path / "ours", format="peft")
    assert json.loads((Path(out) / "adapter_config.json").read_text())["peft_type"] == "TRAINABLE_TOKENS"
    assert set(load_file(str(Path(out) / "adapter_model.safetensors"))) == {
        f"base_model.model.{module}.trainable_tokens_delta"
    }
    reread = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    torch.testing.assert_close(_out(reread(**x)), ours.detach(), atol=ATOL, rtol=RTOL)
    pm.save_pretrained(str(tmp_path / "theirs"))
    back = ft.load(tmp_path / "theirs", model)
    assert isinstance(back.config, ft.TrainableTokensConfig) and torch.equal(back[key], p[key])
    torch.testing.assert_close(_out(ft.apply(model, back, kwargs=x)), theirs.detach(), atol=ATOL, rtol=RTOL)
    # SWIFT layout: exact
    ft.save(p, tmp_path / "swift")
    again = ft.load(tmp_path / "swift", model)
    assert again.config == p.config and torch.equal(again[key], p[key])
    # the shim: same rows, same outputs; merge / unmerge exact
    sm = ft.Swift.prepare_model(
        copy.deepcopy(model), ft.TrainableTokensConfig(target_modules=targets, token_indices=IDS)
    )
    torch.testing.assert_close(_out(sm(**x)), _out(model(**x)), atol=1e-6, rtol=1e-6)  # a no-op before training
    sm.load_state_dict(p.state_dict(), strict=False)
    torch.testing.assert_close(_out(sm(**x)), theirs.detach(), atol=ATOL, rtol=RTOL)
    assert [n for n, q in sm.named_parameters() if q.requires_grad] == [f"base_model.{key}"]  # as SWIFT names it
    ft.Swift.merge(sm)
    torch.testing.assert_close(_out(sm(**x)), theirs.detach(), atol=ATOL, rtol=RTOL)
    ft.Swift.unmerge(sm)
    assert torch.equal(sm.model.get_submodule(module).weight, model.get_submodule(module).weight)


def test_tied_lm_head_reads_the_new_rows() -> None:
    model = _llama_tied()
    p, _, _ = _pair(model, None, "model.embed_tokens")
    x = _ids(32)["input_ids"]
    key = "model.embed_tokens.trainable_tokens_delta.default"
    out = ft.apply(model, p, (x,), {"output_hidden_states": True})
    torch.testing.assert_close(out.logits[..., IDS], out.hidden_states[-1] @ p[key].T, atol=1e-5, rtol=1e-5)
    merged = ft.merge(model, p)
    assert merged["lm_head.weight"] is merged["model.embed_tokens.weight"]  # the tie is kept
    # targeting both the embedding and the tied head ties them (one tensor, as PEFT's tied adapter)
    both_cfg = ft.TrainableTokensConfig(target_modules=["embed_tokens", "lm_head"], token_indices=IDS)
    both = ft.init(model, both_cfg, generator=0)
    assert list(both) == [key]


def test_per_sample_adapters() -> None:
    """``adapter_names=``: each sample runs its own rows.  PEFT 0.21.2 raises on a mixed batch of this tuner
    (``ValueError: TrainableTokensLayer wraps an unknown layer type``), so the reference is each adapter alone."""
    model = _llama_tied()
    x = _ids(32)["input_ids"]
    cfg_a = ft.TrainableTokensConfig(token_indices=IDS)
    cfg_b = ft.TrainableTokensConfig(token_indices=[2, 5])
    g = torch.Generator().manual_seed(5)
    pa = ft.init(model, cfg_a, generator=0, adapter_name="a")
    pa = pa.map(lambda t: t + torch.randn(t.shape, generator=g))
    pb = ft.init(model, cfg_b, generator=0, adapter_name="b")
    pb = pb.map(lambda t: t + torch.randn(t.shape, generator=g))
    sm = ft.Swift.prepare_model(copy.deepcopy(model), {"a": cfg_a, "b": cfg_b})
    sm.load_state_dict({**pa.state_dict(), **pb.state_dict()}, strict=False)
    mixed = sm(x, adapter_names=["b", "a"]).logits
    torch.testing.assert_close(mixed[0], ft.apply(model, pb, (x,)).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], ft.apply(model, pa, (x,)).logits[1], atol=1e-5, rtol=1e-5)
    mixed = sm(x, adapter_names=["__base__", "b"]).logits
    torch.testing.assert_close(mixed[0], model(x).logits[0], atol=1e-5, rtol=1e-5)


def test_weights_mapping_streaming_merge_and_random_init(tmp_path: Path) -> None:
    model = _llama_untied()
    p, pm, _ = _pair(model, ["embed_tokens"], "model.embed_tokens")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    merged = ft.merge(model, p)
    assert torch.equal(ft.merge(state, p)["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    (tmp_path / "base").mkdir()
    (tmp_path / "out").mkdir()
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    merge_checkpoint(tmp_path / "base", tmp_path / "out", dict(p), p.config, p.adapter_name)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(out["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    rnd = ft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=IDS, init_weights=False)
    a, b = ft.init(model, rnd, generator=1), ft.init(model, rnd, generator=1)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(next(iter(a.values())), p[next(iter(p))])


def test_refusals_are_typed() -> None:
    model = _llama_untied()
    with pytest.raises(ConfigError, match="token_indices"):
        ft.init(model, ft.TrainableTokensConfig(), generator=0)
    with pytest.raises(ConfigError, match="distinct"):
        ft.TrainableTokensConfig(token_indices=[1, 1])
    with pytest.raises(ConfigError, match="out of range"):
        ft.init(model, ft.TrainableTokensConfig(token_indices=[10_000]), generator=0)
    with pytest.raises(UnsupportedModuleError, match="nn.Embedding"):
        ft.init(model, ft.TrainableTokensConfig(target_modules=["input_layernorm"], token_indices=[1]), generator=0)
    p = ft.init(model, ft.TrainableTokensConfig(token_indices=IDS), generator=0)
    with pytest.raises(ConfigError, match="needs the model"):
        ft.unmerge(ft.merge(dict(model.state_dict()), p), p)
