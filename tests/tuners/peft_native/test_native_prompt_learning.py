"""Native prompt tuning and P-tuning against real PEFT (0.21) on a transformers Llama built from a config.

Prefix tuning is compared the same way (its prefixes reach the model as the initial KV cache).

Parity recipe: ``functuner.init`` gives PEFT's tensor names and shapes; PEFT's initial tensors are
copied into our params (both sides then hold the same values without relying on one RNG stream);
compared in fp32 on CPU with PEFT's fp32 tolerances (1e-5): logits and loss of
``PeftModelForCausalLM.forward`` (padding mask and labels included) and the gradients of that loss
with respect to every adapter tensor; checkpoints both ways (``functuner.save(format="peft")`` loaded
by ``PeftModel.from_pretrained``; PEFT's ``save_pretrained`` read by ``functuner.load``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import tiny_llama

import functuner as ft
from functuner.errors import ConfigError, ParamsMismatchError
from functuner.tuners.prompt_learning import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from functuner.tuners.prompt_learning.p_tuning import encode
from functuner.tuners.prompt_learning.prefix_tuning import encode as encode_prefix

ATOL = RTOL = 1e-5
N = 4  # virtual tokens


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding on the second row
    labels = ids.clone()
    labels[1, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _peft_pair(ours: Any, theirs: Any) -> tuple[torch.nn.Module, ft.TunerParams, Any]:
    """Our params and a PeftModel holding the same tensors (PEFT's initial values copied into ours)."""
    model = tiny_llama()
    pm = peft.get_peft_model(tiny_llama(), theirs).eval()
    p = ft.init(model, ours, generator=0)
    enc = dict(pm.prompt_encoder["default"].named_parameters())
    assert {f"prompt_encoder.default.{k}" for k in enc} == set(p), "names differ from PEFT's"
    p = ft.TunerParams({k: enc[k.removeprefix("prompt_encoder.default.")].detach().clone() for k in p}, p.config)
    return model, p, pm


def _check_forward_and_grads(model: torch.nn.Module, p: ft.TunerParams, pm: Any, prefix: bool = False) -> None:
    batch = _batch()
    if prefix:  # PEFT shifts position_ids by the prefix length; the other methods refuse them
        batch["position_ids"] = torch.arange(6).expand(2, -1)
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    out = ft.apply(model, ft.TunerParams(leaves, p.config), (), batch)
    ref = pm(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=RTOL)
    assert out.logits.shape == (2, 6 if prefix else 6 + N, 64)
    out.loss.backward()
    ref.loss.backward()
    enc = dict(pm.prompt_encoder["default"].named_parameters())
    for k, t in leaves.items():
        theirs = enc[k.removeprefix("prompt_encoder.default.")].grad
        assert t.grad is not None and theirs is not None
        torch.testing.assert_close(t.grad, theirs, atol=ATOL, rtol=RTOL)


def _logits(model: torch.nn.Module, p: ft.TunerParams) -> torch.Tensor:
    with torch.no_grad():
        return ft.apply(model, p, (), _batch()).logits


# -- prompt tuning -------------------------------------------------------------------------------------------------


def test_prompt_tuning_forward_and_grads_equal_peft() -> None:
    kw = {"num_virtual_tokens": N, "task_type": "CAUSAL_LM"}
    model, p, pm = _peft_pair(PromptTuningConfig(**kw), peft.PromptTuningConfig(**kw))
    assert p.config.token_dim == 32 and p.config.num_layers == 2 and p.config.num_attention_heads == 4
    assert p.config.num_transformer_submodules == 1  # filled from the model, as PEFT fills its config
    assert p["prompt_encoder.default.embedding.weight"].dtype == torch.float32
    _check_forward_and_grads(model, p, pm)


def test_init_is_pure_and_accepts_peft_config() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = ft.init(model, peft.PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"), generator=0)
    assert isinstance(p.config, PromptTuningConfig) and p.config.num_virtual_tokens == N
    q = ft.init(model, PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"), generator=0)
    torch.testing.assert_close(dict(p), dict(q), atol=0, rtol=0)  # same seed, same table
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    batch = _batch()
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():  # a call without the adapter is the base model (dormant slot)
        torch.testing.assert_close(model(**batch).logits, plain, atol=0, rtol=0)


def test_sample_vocab_init_takes_rows_of_the_word_embeddings() -> None:
    model = tiny_llama()
    cfg = PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM", prompt_tuning_init="SAMPLE_VOCAB")
    table = ft.init(model, cfg, generator=1)["prompt_encoder.default.embedding.weight"]
    vocab = model.get_input_embeddings().weight
    for row in table:
        assert any(torch.equal(row, v) for v in vocab)


def _word_level_tokenizer(path: Path) -> str:
    """A local fast tokenizer over the words ``w0 .. w63`` (ids 0..63), so TEXT init needs no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    return str(path)


def test_text_init_equals_peft(tmp_path: Path) -> None:
    """PEFT's TEXT init is deterministic (the text's token embeddings, repeated to N): both give the same table."""
    kw = {
        "num_virtual_tokens": 5,
        "task_type": "CAUSAL_LM",
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": "w7 w3",
        "tokenizer_name_or_path": _word_level_tokenizer(tmp_path / "tok"),
    }
    p = ft.init(tiny_llama(), PromptTuningConfig(**kw), generator=0)
    pm = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(**kw))
    theirs = pm.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(p["prompt_encoder.default.embedding.weight"], theirs, atol=0, rtol=0)
    vocab = tiny_llama().get_input_embeddings().weight
    # the tokenizer adds no special tokens: ids [7, 3] repeated and cut to 5 rows
    torch.testing.assert_close(theirs, vocab[[7, 3, 7, 3, 7]].float(), atol=0, rtol=0)


def test_grad_under_torch_func() -> None:
    model = tiny_llama()
    p = ft.init(model, PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"), generator=0)
    batch = _batch()

    def loss(params: ft.TunerParams) -> torch.Tensor:
        return ft.apply(model, params, (), batch).loss

    g = torch.func.grad(loss)(p)
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    loss(ft.TunerParams(leaves, p.config)).backward()
    for k, t in leaves.items():
        torch.testing.assert_close(g[k], t.grad, atol=ATOL, rtol=RTOL)


def _roundtrip_ours_to_peft(model: torch.nn.Module, p: ft.TunerParams, tmp_path: Path) -> None:
    ft.save(p, tmp_path / "ours", format="peft")
    data = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert data["peft_type"] == p.config.peft_type and "swift_type" not in data
    assert data["inference_mode"] is True  # as PeftModel.save_pretrained writes it
    mine = ft.load(tmp_path / "ours", tiny_llama())  # and back: the final embeddings, equal outputs
    torch.testing.assert_close(_logits(model, mine), _logits(model, p), atol=ATOL, rtol=RTOL)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = pm(**_batch()).logits
    torch.testing.assert_close(theirs, _logits(model, p), atol=ATOL, rtol=RTOL)


def _roundtrip_peft_to_ours(pm: Any, tmp_path: Path) -> ft.TunerParams:
    pm.save_pretrained(tmp_path / "theirs")
    model = tiny_llama()
    q = ft.load(tmp_path / "theirs", model)
    assert set(q) == {"prompt_encoder.default.embedding.weight"}
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, q), pm(**_batch()).logits, atol=ATOL, rtol=RTOL)
    return q


def test_prompt_tuning_checkpoints_both_ways(tmp_path: Path) -> None:
    kw = {"num_virtual_tokens": N, "task_type": "CAUSAL_LM"}
    model, p, pm = _peft_pair(PromptTuningConfig(**kw), peft.PromptTuningConfig(**kw))
    _roundtrip_ours_to_peft(model, p, tmp_path)
    q = _roundtrip_peft_to_ours(pm, tmp_path)
    assert q.config.num_virtual_tokens == N and q.config.token_dim == 32
    torch.testing.assert_close(dict(q), dict(p), atol=0, rtol=0)
    ft.save(q, tmp_path / "swift")  # SWIFT's layout too, read back equal
    r = ft.load(tmp_path / "swift", tiny_llama())
    torch.testing.assert_close(dict(r), dict(p), atol=0, rtol=0)


# -- P-tuning ------------------------------------------------------------------------------------------------------


def test_p_tuning_forward_and_grads_equal_peft() -> None:
    kw = {"num_virtual_tokens": N, "task_type": "CAUSAL_LM", "encoder_hidden_size": 24}
    model, p, pm = _peft_pair(PromptEncoderConfig(**kw), peft.PromptEncoderConfig(**kw))
    assert len(p) == 7 and p["prompt_encoder.default.mlp_head.0.weight"].shape == (24, 32)
    default = ft.init(model, PromptEncoderConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"), generator=0)
    assert default.config.encoder_hidden_size == 32  # token_dim, as PEFT's _prepare_prompt_learning_config
    _check_forward_and_grads(model, p, pm)


def test_p_tuning_checkpoints_both_ways(tmp_path: Path) -> None:
    """PEFT saves the encoder's output; both sides load it as an encoded (inference) table."""
    kw = {"num_virtual_tokens": N, "task_type": "CAUSAL_LM", "encoder_hidden_size": 24}
    model, p, pm = _peft_pair(PromptEncoderConfig(**kw), peft.PromptEncoderConfig(**kw))
    _roundtrip_ours_to_peft(model, p, tmp_path)
    q = _roundtrip_peft_to_ours(pm, tmp_path)
    torch.testing.assert_close(q["prompt_encoder.default.embedding.weight"], encode(p, "default").detach())
    shim = ft.Swift.from_pretrained(tiny_llama(), tmp_path / "theirs")  # SWIFT's contract: PEFT's dir -> PeftModel
    assert isinstance(shim, peft.PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(shim(**_batch()).logits, _logits(model, q), atol=ATOL, rtol=RTOL)
    ft.validate(tiny_llama(), q)


@pytest.mark.parametrize("layers", [1, 2])
def test_p_tuning_lstm_forward_grads_and_checkpoints_equal_peft(layers: int, tmp_path: Path) -> None:
    """PEFT's bidirectional LSTM encoder (``encoder_reparameterization_type="LSTM"``), written out as pure math."""
    kw = {
        "num_virtual_tokens": N,
        "task_type": "CAUSAL_LM",
        "encoder_hidden_size": 8,
        "encoder_reparameterization_type": "LSTM",
        "encoder_num_layers": layers,
    }
    model, p, pm = _peft_pair(PromptEncoderConfig(**kw), peft.PromptEncoderConfig(**kw))
    assert len(p) == 1 + 4 + 8 * layers and p["prompt_encoder.default.mlp_head.0.weight"].shape == (16, 16)
    _check_forward_and_grads(model, p, pm)
    _roundtrip_ours_to_peft(model, p, tmp_path)
    q = _roundtrip_peft_to_ours(pm, tmp_path)
    torch.testing.assert_close(q["prompt_encoder.default.embedding.weight"], encode(p, "default").detach())
    g = torch.func.grad(lambda params: ft.apply(model, params, (), _batch()).loss)(p)  # pure under torch.func
    assert set(g) == set(p)


def test_p_tuning_lstm_dropout_only_in_training() -> None:
    kw = {"num_virtual_tokens": N, "task_type": "CAUSAL_LM", "encoder_hidden_size": 8}
    cfg = PromptEncoderConfig(**kw, encoder_reparameterization_type="LSTM", encoder_num_layers=2, encoder_dropout=0.5)
    model = tiny_llama()
    p = ft.init(model, cfg, generator=0)
    ids = _batch()["input_ids"]
    with torch.no_grad():
        evals = [ft.apply(model, p, (), {"input_ids": ids}).logits for _ in range(2)]
        torch.testing.assert_close(evals[0], evals[1], atol=0, rtol=0)
        model.train()
        trained = [
            ft.apply(model, p, (), {"input_ids": ids}, generator=torch.Generator().manual_seed(s)).logits
            for s in (1, 2)
        ]
    assert not torch.equal(trained[0], trained[1])  # different dropout masks between the LSTM layers


# -- what is refused, with a typed error ---------------------------------------------------------------------------


def test_refusals_are_typed_and_name_the_cause() -> None:
    model = tiny_llama()
    p = ft.init(model, PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"), generator=0)
    batch = _batch()
    with pytest.raises(ConfigError, match="no merged form"):
        ft.merge(model, p)
    with pytest.raises(ConfigError, match="position_ids"):
        ft.apply(model, p, (), {**batch, "position_ids": torch.arange(6).expand(2, -1)})
    with pytest.raises(ConfigError, match="task_type"):
        ft.init(model, PromptTuningConfig(num_virtual_tokens=N), generator=0)
    with pytest.raises(ConfigError, match="task_type='SEQ_2_SEQ_LM'.*encoder-decoder"):
        PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_2_SEQ_LM")
    with pytest.raises(ConfigError, match="num_transformer_submodules"):
        PromptTuningConfig(num_virtual_tokens=N, num_transformer_submodules=2)
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM", prompt_tuning_init="TEXT")
    with pytest.raises(ConfigError, match="encoder_reparameterization_type"):
        PromptEncoderConfig(num_virtual_tokens=N, encoder_reparameterization_type="GRU", encoder_hidden_size=8)
    with pytest.raises(ConfigError, match="encoder_num_layers"):
        PromptEncoderConfig(num_virtual_tokens=N, encoder_num_layers=3)
    with pytest.raises(ConfigError, match="cache= and past_key_values="):
        from transformers import DynamicCache

        two = {"cache": DynamicCache(config=model.config), "past_key_values": DynamicCache(config=model.config)}
        ft.apply(model, p, (), {**batch, **two})
    with pytest.raises(ConfigError, match="token_type_ids"):
        ft.apply(model, p, (), {**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])})
    bad = ft.TunerParams({"prompt_encoder.default.embedding.weight": torch.zeros(N + 1, 32)}, p.config)
    with pytest.raises(ParamsMismatchError, match="num_virtual_tokens"):
        ft.validate(model, bad)


def test_shim_prepare_train_save_load(tmp_path: Path) -> None:
    """``Swift.prepare_model`` with functuner's config gives a SwiftModel whose forward is ``functuner.apply``'s."""
    model = tiny_llama()
    cfg = PromptEncoderConfig(num_virtual_tokens=N, task_type="CAUSAL_LM", encoder_hidden_size=8)
    sm = ft.Swift.prepare_model(model, cfg)
    assert isinstance(sm, ft.SwiftModel)
    trainable = sorted(n for n, t in sm.named_parameters() if t.requires_grad)
    assert trainable == sorted(f"base_model.{k}" for k in ft.init(tiny_llama(), cfg, generator=0))
    batch = _batch()
    out = sm(**batch)
    out.loss.backward()
    assert all(t.grad is not None for n, t in sm.named_parameters() if t.requires_grad)
    sm.save_pretrained(tmp_path / "ck")
    again = ft.Swift.from_pretrained(tiny_llama(), tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, sm(**batch).logits, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="not supported per sample"):
        sm(**batch, adapter_names=["default", "default"])


# -- prefix tuning -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_forward_and_grads_equal_peft(projection: bool) -> None:
    kw = {"num_virtual_tokens": N, "task_type": "CAUSAL_LM", "prefix_projection": projection}
    model, p, pm = _peft_pair(PrefixTuningConfig(**kw), peft.PrefixTuningConfig(**kw))
    # grouped-query attention: token_dim is the KV heads' width (2 heads x head_dim 8), as PEFT sets it
    assert p.config.token_dim == 16 and p.config.num_attention_heads == 2
    assert p.config.token_dim == pm.peft_config["default"].token_dim
    _check_forward_and_grads(model, p, pm, prefix=True)


def test_prefix_tuning_checkpoints_both_ways_and_func_grad(tmp_path: Path) -> None:
    kw = {"num_virtual_tokens": N, "task_type": "CAUSAL_LM"}
    model, p, pm = _peft_pair(PrefixTuningConfig(**kw), peft.PrefixTuningConfig(**kw))
    batch = _batch()
    with torch.no_grad():
        theirs = pm(**batch).logits
    ft.save(p, tmp_path / "ours", format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, theirs, atol=ATOL, rtol=RTOL)
    pm.save_pretrained(tmp_path / "theirs")
    q = ft.load(tmp_path / "theirs", tiny_llama())
    torch.testing.assert_close(q["prompt_encoder.default.embedding.weight"], encode_prefix(p, "default"))
    torch.testing.assert_close(_logits(model, q), theirs, atol=ATOL, rtol=RTOL)

    def loss(params: ft.TunerParams) -> torch.Tensor:
        return ft.apply(model, params, (), batch).loss

    g = torch.func.grad(loss)(p)
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    loss(ft.TunerParams(leaves, p.config)).backward()
    for k, t in leaves.items():
        torch.testing.assert_close(g[k], t.grad, atol=ATOL, rtol=RTOL)


def test_prefix_tuning_zero_init_and_refusals() -> None:
    model = tiny_llama()
    cfg = PrefixTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM", prefix_projection=True, init_weights="zero")
    p = ft.init(model, cfg, generator=0)
    assert torch.count_nonzero(encode_prefix(p, "default")) == 0  # PEFT's "zero": the last Linear is zero
    p = ft.init(model, peft.PrefixTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"), generator=0)
    assert isinstance(p.config, PrefixTuningConfig)
    ids = _batch()["input_ids"]
    positional = ft.apply(model, p, (ids,), {"labels": ids})  # input_ids given positionally
    torch.testing.assert_close(positional.logits, ft.apply(model, p, (), {"input_ids": ids}).logits)
    from transformers import StaticCache

    static = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(ConfigError, match="DynamicCache"):
        ft.apply(model, p, (), {"input_ids": ids, "cache": static})
    with pytest.raises(ConfigError, match="init_weights"):
        PrefixTuningConfig(num_virtual_tokens=N, init_weights="ones")
    with pytest.raises(ConfigError, match="no merged form"):
        ft.merge(model, p)


@pytest.mark.parametrize(
    "config",
    [
        PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"),
        PromptEncoderConfig(num_virtual_tokens=N, task_type="CAUSAL_LM", encoder_hidden_size=8),
        PrefixTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM", prefix_projection=True),
    ],
    ids=["prompt", "p-tuning", "prefix"],
)
def test_vmap_over_stacked_adapters(config: Any) -> None:
    """``torch.func.vmap`` over two adapters' params equals two separate calls."""
    model = tiny_llama()
    p1, p2 = ft.init(model, config, generator=1), ft.init(model, config, generator=2)
    stacked = ft.tree_map(lambda a, b: torch.stack([a, b]), p1, p2)
    ids = _batch()["input_ids"]
    with torch.no_grad():
        out = torch.func.vmap(lambda p: ft.apply(model, p, (), {"input_ids": ids}).logits)(stacked)
        ref = torch.stack([ft.apply(model, p, (), {"input_ids": ids}).logits for p in (p1, p2)])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
