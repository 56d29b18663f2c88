"""LoRA's ``trainable_token_indices`` (PEFT's trainable tokens) against the real ``peft``: functional, shim, disk.

PEFT's own row ("Embedding + transformers Conv1D 1 LoRA trainable_tokens") runs in
``test_lora_peft_cases.py``; here the same option on a tiny transformers model whose
``lm_head`` is tied to the input embedding (PEFT then trains the rows in both, through its tied token
adapter), the list form (the model's input embedding), merge / unmerge, the streaming merge, SWIFT and
PEFT checkpoints both ways, the shim, per-sample adapters (PEFT's ``adapter_names=``), and the typed
refusals.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError
from functuner.io.merge_shards import merge_checkpoint
from tests.models import SMALL_LLAMA, tiny_llama

IDS = [1, 5, 7]
KEY = "model.embed_tokens.token_adapter.trainable_tokens_delta.default"


def _model() -> torch.nn.Module:
    return tiny_llama(tie_word_embeddings=True, **SMALL_LLAMA)


def _inputs() -> torch.Tensor:
    return torch.tensor([[1, 2, 5, 7, 3, 1], [0, 7, 7, 5, 9, 4]])


def _kwargs() -> dict:
    return {"target_modules": ["q_proj", "v_proj"], "trainable_token_indices": IDS, "init_lora_weights": False}


def _trained(p: ft.TunerParams) -> ft.TunerParams:
    """Params whose token rows differ from the embedding's (as after training)."""
    g = torch.Generator().manual_seed(3)
    return p.replace({KEY: p[KEY] + torch.randn(p[KEY].shape, generator=g)})


def _peft_with(model: torch.nn.Module, p: ft.TunerParams) -> peft.PeftModel:
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**_kwargs())).eval()
    peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(p))
    return pm


def test_functional_matches_peft_with_tied_lm_head() -> None:
    model = _model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cfg = ft.LoRAConfig(**_kwargs())
    p = _trained(ft.init(model, cfg, generator=0))
    assert torch.equal(ft.init(model, cfg, generator=0)[KEY], model.model.embed_tokens.weight[IDS])
    pm = _peft_with(model, p)
    x = _inputs()
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    ours = ft.apply(model, p.replace(leaves), (x,)).logits
    theirs = pm(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # PEFT ties a token adapter to lm_head: functuner's forward must use the new rows there too
    hidden = ft.apply(model, p, (x,), {"output_hidden_states": True}).hidden_states[-1]
    torch.testing.assert_close(ours[..., IDS], hidden @ p[KEY].T, atol=1e-5, rtol=1e-5)
    w = torch.linspace(-1, 1, ours.numel()).reshape(ours.shape)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), [leaves[KEY]])
    (theirs * w).sum().backward()
    g_theirs = pm.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].grad
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-5, rtol=1e-4)


def test_merge_unmerge_and_streaming_merge_match_peft(tmp_path: Path) -> None:
    model = _model()
    p = _trained(ft.init(model, ft.LoRAConfig(**_kwargs()), generator=0))
    x = _inputs()
    merged = ft.merge(model, p)
    theirs = _peft_with(model, p).merge_and_unload()
    torch.testing.assert_close(
        torch.func.functional_call(model, merged, (x,)).logits, theirs(x).logits, atol=1e-4, rtol=1e-4
    )
    assert torch.equal(merged["model.embed_tokens.weight"][IDS], p[KEY])
    assert merged["lm_head.weight"] is merged["model.embed_tokens.weight"]  # the tie is kept
    # unmerge with the model restores the original rows from it (functional merge never writes the model)
    restored = ft.unmerge(model, p, merged)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(restored[k], v, atol=1e-5, rtol=1e-5)
    # a weights mapping merges the same; the streaming shard merge too
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert torch.equal(ft.merge(state, p)["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    (tmp_path / "base").mkdir()
    (tmp_path / "out").mkdir()
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    merge_checkpoint(tmp_path / "base", tmp_path / "out", dict(p), p.config, p.adapter_name)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(out["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])


@pytest.mark.parametrize("fmt", ["swift", "peft"])
def test_checkpoints_both_ways(fmt: str, tmp_path: Path) -> None:
    model = _model()
    p = _trained(ft.init(model, ft.LoRAConfig(**_kwargs()), generator=0))
    out = ft.save(p, tmp_path / "ad", format=fmt)
    back = ft.load(out, model)
    assert set(back) == set(p)
    for k in p:
        assert torch.equal(back[k], p[k])
    x = _inputs()
    if fmt == "peft":  # PEFT's own names, read by PEFT
        keys = set(load_file(str(out / "adapter_model.safetensors")))
        assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in keys
        reread = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
        torch.testing.assert_close(reread(x).logits, ft.apply(model, p, (x,)).logits, atol=1e-5, rtol=1e-5)
    else:  # SWIFT's layout: <dir>/<adapter>/, in-memory names
        assert KEY in set(load_file(str(next(Path(out).rglob("adapter_model.safetensors")))))
    # renaming the adapter renames the rows' key component-wise (the tuner's key_naming hook)
    assert KEY.replace(".default", ".x") in ft.rename_adapter(back, "default", "x")
    # a directory PEFT wrote, read by functuner
    pm = _peft_with(model, p)
    pm.save_pretrained(str(tmp_path / "by_peft"))
    from_peft = ft.load(tmp_path / "by_peft", model)
    assert torch.equal(from_peft[KEY], p[KEY])
    torch.testing.assert_close(ft.apply(model, from_peft, (x,)).logits, pm(x).logits, atol=1e-5, rtol=1e-5)


def test_shim_trains_only_the_token_rows_and_round_trips(tmp_path: Path) -> None:
    model = _model()
    x = _inputs()
    sm = ft.Swift.prepare_model(copy.deepcopy(model), ft.LoRAConfig(**{**_kwargs(), "init_lora_weights": True}))
    base_out = model(x).logits
    torch.testing.assert_close(sm(x).logits, base_out, atol=1e-6, rtol=1e-6)
    trainable = [n for n, q in sm.named_parameters() if q.requires_grad]
    assert any("trainable_tokens_delta" in n for n in trainable)
    opt = torch.optim.SGD([q for q in sm.parameters() if q.requires_grad], lr=0.5)
    sm(x).logits.sum().backward()
    opt.step()
    emb = sm.model.model.embed_tokens.weight
    assert torch.equal(emb, model.model.embed_tokens.weight)  # the base embedding is never written
    after = sm(x).logits
    sm.save_pretrained(str(tmp_path / "s"))
    again = ft.Swift.from_pretrained(copy.deepcopy(model), str(tmp_path / "s"))
    torch.testing.assert_close(again(x).logits, after, atol=1e-6, rtol=1e-6)
    ft.Swift.merge(again)
    torch.testing.assert_close(again(x).logits, after, atol=1e-4, rtol=1e-4)
    ft.Swift.unmerge(again)
    torch.testing.assert_close(again.model.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_refusals_are_typed() -> None:
    model = _model()
    with pytest.raises(ConfigError, match="out of range"):
        ft.init(model, ft.LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[10_000]), generator=0)
    with pytest.raises(ConfigError, match="matches no module"):
        ft.init(model, ft.LoRAConfig(target_modules=["q_proj"], trainable_token_indices={"nope": [1]}), generator=0)
    with pytest.raises(ConfigError, match="distinct"):
        ft.LoRAConfig(trainable_token_indices=[1, 1])
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        ft.LoRAConfig(trainable_token_indices="1,2")
    with pytest.raises(ConfigError, match="one way"):
        ft.init(
            model,
            ft.LoRAConfig(target_modules=["embed_tokens"], trainable_token_indices={"embed_tokens": [1]}),
            generator=0,
        )
    p = ft.init(model, ft.LoRAConfig(**_kwargs()), generator=0)
    with pytest.raises(ParamsMismatchError, match="trainable tokens"):
        ft.apply(model, p.replace({KEY: torch.zeros(2, 16)}), (_inputs(),))


def test_per_sample_adapters_with_trainable_tokens() -> None:
    """``adapter_names=``: each sample runs its own adapter's rows (and LoRA factors), the base where asked."""
    model = _model()
    x = _inputs()
    g = torch.Generator().manual_seed(5)
    cfg_a = ft.LoRAConfig(**_kwargs())
    cfg_b = ft.LoRAConfig(**{**_kwargs(), "trainable_token_indices": [2, 5]})
    ka, kb = KEY.replace(".default", ".a"), KEY.replace(".default", ".b")
    pa = ft.init(model, cfg_a, generator=0, adapter_name="a")
    pa = pa.replace({ka: pa[ka] + torch.randn(pa[ka].shape, generator=g)})
    pb = ft.init(model, cfg_b, generator=1, adapter_name="b")
    pb = pb.replace({kb: pb[kb] + torch.randn(pb[kb].shape, generator=g)})
    sm = ft.Swift.prepare_model(copy.deepcopy(model), {"a": cfg_a, "b": cfg_b})
    sm.load_state_dict({**pa.state_dict(), **pb.state_dict()}, strict=False)
    names = ["b", "__base__"]
    mixed = sm(x, adapter_names=names).logits
    torch.testing.assert_close(mixed[0], ft.apply(model, pb, (x,)).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], model(x).logits[1], atol=1e-5, rtol=1e-5)
    mixed = sm(x, adapter_names=["a", "b"]).logits
    torch.testing.assert_close(mixed[0], ft.apply(model, pa, (x,)).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], ft.apply(model, pb, (x,)).logits[1], atol=1e-5, rtol=1e-5)
    # PEFT's own mixed batch (adapter_names=) on the same two adapters
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**_kwargs()), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(**{**_kwargs(), "trainable_token_indices": [2, 5]}))
    peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(pa), adapter_name="a")
    peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(pb), adapter_name="b")
    pm.eval()
    for names in (["a", "b"], ["b", "__base__"]):
        theirs = pm(x, adapter_names=names).logits
        torch.testing.assert_close(sm(x, adapter_names=names).logits, theirs, atol=1e-5, rtol=1e-5)
