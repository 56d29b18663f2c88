"""Parity with real PEFT: the same A/B tensors give PEFT's outputs and gradients.

For every case, functuner params are drawn with ``init_lora_weights=False`` (so
B is non-zero and the adapter really changes the output), copied into a
``peft.get_peft_model`` wrapper of a deep copy of the same model with
``peft.set_peft_model_state_dict(pm, functuner.to_peft_state_dict(p))``, and
both are run on the same inputs.  Outputs must agree to 1e-5 (fp32 max abs
difference) and so must the gradients of a scalar loss with respect to every
adapter tensor (A, B, magnitudes, trainable biases, ``modules_to_save`` copies).

Also against PEFT: merged weights (``merge_and_unload``), two adapters active at
once (forward and merge, LoRA and DoRA), ``lora_dropout`` in training mode (PEFT's
dropout module given the mask functuner's generator draws), bf16 models with
fp32 adapters, ``init_lora_weights`` distributions, DoRA magnitude init, and
which modules a target spec selects.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import functuner as ft
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

ATOL = 1e-5


class ConvNet(nn.Module):
    """A small model with nn.Conv1d, nn.Conv2d (non-square kernel, stride), nn.Embedding and nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, (3, 2), stride=2)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.c1(x)  # (B, 6, L)
        h2 = self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 4))  # (B, 5, H', W')
        pooled = h2.mean(dim=(2, 3))  # (B, 5)
        return {"logits": self.head(pooled) + self.emb(ids).sum(dim=(1, 2))[:, None]}


def conv_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _conv_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(2, 3, 8, generator=g), "ids": torch.randint(0, 10, (2, 3), generator=g)}


def _out(o) -> torch.Tensor:
    """The model's main output; for a headless BERT, the hidden states and the pooler output together."""
    if isinstance(o, dict) and o.get("logits") is not None:
        return o["logits"]
    if o.get("pooler_output") is not None:
        return torch.cat([o["last_hidden_state"].flatten(), o["pooler_output"].flatten()])
    return o["last_hidden_state"]


def _peft_param_name(pm: nn.Module, ft_name: str) -> str:
    """PEFT's in-memory name of the parameter that holds functuner tensor ``ft_name``."""
    names = dict(pm.named_parameters())
    direct = "base_model.model." + ft_name
    if direct in names:
        return direct
    if ft_name.endswith(".bias"):
        wrapped = "base_model.model." + ft_name[: -len(".bias")] + ".base_layer.bias"
        if wrapped in names:
            return wrapped
    raise AssertionError(f"PEFT model has no parameter for functuner tensor {ft_name!r}")


def make_pair(model: nn.Module, seed: int = 0, **cfg_kwargs):
    """(functuner params, PEFT model holding the same tensors); the model itself is left untouched."""
    p = ft.init(model, ft.LoRAConfig(init_lora_weights=False, **cfg_kwargs), generator=seed)
    peft_kwargs = {k: v for k, v in cfg_kwargs.items() if k != "lora_dtype"}
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**peft_kwargs))
    result = peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(p))
    assert result.unexpected_keys == [], result.unexpected_keys
    # every tensor of ours must have landed in PEFT's model
    peft_params = dict(pm.named_parameters())
    for name, t in p.items():
        assert torch.equal(peft_params[_peft_param_name(pm, name)].detach().to(t.dtype), t), name
    pm.train(model.training)
    return p, pm


def assert_parity(model: nn.Module, inputs: dict, p, pm, *, atol: float = ATOL, generator=None) -> None:
    """Outputs and gradients (w.r.t. every adapter tensor) agree between functuner and PEFT."""
    base = _out(model(**inputs)).detach()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    p_grad = p.replace(leaves)
    ours = _out(ft.apply(model, p_grad, kwargs=inputs, generator=generator))
    theirs = _out(pm(**inputs))
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
    # the adapter must change the output, or parity would be vacuous
    assert (ours.detach().float() - base.float()).abs().max() > 1e-3

    weights = torch.linspace(-1, 1, ours.numel(), dtype=torch.float32).reshape(ours.shape)
    g_ours = torch.autograd.grad((ours.float() * weights).sum(), list(leaves.values()))
    peft_params = dict(pm.named_parameters())
    targets = [peft_params[_peft_param_name(pm, k)] for k in leaves]
    for t in targets:
        t.requires_grad_(True)
    g_theirs = torch.autograd.grad((theirs.float() * weights).sum(), targets, allow_unused=True)
    for name, a, b in zip(leaves, g_ours, g_theirs, strict=True):
        assert b is not None, f"PEFT has no gradient for {name}"
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------
# one case per layer kind / option set
# ---------------------------------------------------------------------------
CASES = {
    "llama_linear": (
        tiny_llama,
        lambda: {"input_ids": _ids()},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
    ),
    "llama_regex_targets": (
        tiny_llama,
        lambda: {"input_ids": _ids()},
        dict(r=3, lora_alpha=5, target_modules=r".*layers\.1\.self_attn\.(q|k)_proj"),
    ),
    "llama_dora_linear": (
        tiny_llama,
        lambda: {"input_ids": _ids()},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    ),
    "llama_embedding": (
        tiny_llama,
        lambda: {"input_ids": _ids()},
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"]),
    ),
    "llama_dora_embedding": (
        tiny_llama,
        lambda: {"input_ids": _ids()},
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens"], use_dora=True),
    ),
    "llama_rslora": (
        tiny_llama,
        lambda: {"input_ids": _ids()},
        dict(r=8, lora_alpha=4, target_modules=["q_proj", "up_proj"], use_rslora=True),
    ),
    "llama_rank_alpha_pattern": (
        tiny_llama,
        lambda: {"input_ids": _ids()},
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "embed_tokens"],
            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
            alpha_pattern={"layers.0.self_attn.q_proj": 3},
        ),
    ),
    "llama_dropout_eval": (
        tiny_llama,
        lambda: {"input_ids": _ids()},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.3),
    ),
    "bert_linear_bias_all": (
        tiny_bert,
        lambda: {"input_ids": _ids()},
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all"),
    ),
    "bert_bias_lora_only": (
        tiny_bert,
        lambda: {"input_ids": _ids()},
        dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], bias="lora_only"),
    ),
    "bert_dora_bias_all": (
        tiny_bert,
        lambda: {"input_ids": _ids()},
        dict(r=2, lora_alpha=8, target_modules=["key", "dense"], use_dora=True, bias="all"),
    ),
    "bert_cls_modules_to_save": (
        lambda: tiny_bert(num_labels=3),
        lambda: {"input_ids": _ids()},
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
    "gpt2_conv1d": (
        tiny_gpt2,
        lambda: {"input_ids": _ids()},
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "gpt2_dora_conv1d": (
        tiny_gpt2,
        lambda: {"input_ids": _ids()},
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True),
    ),
    "gpt2_conv1d_bias_lora_only": (
        tiny_gpt2,
        lambda: {"input_ids": _ids()},
        dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only"),
    ),
    "gpt2_tied_embedding": (
        tiny_gpt2,
        lambda: {"input_ids": _ids()},
        dict(r=2, lora_alpha=4, target_modules=["wte", "c_attn"], fan_in_fan_out=True),
    ),
    "bert_word_embeddings_padding_idx": (
        tiny_bert,
        lambda: {"input_ids": _ids(4).index_fill(1, torch.tensor([0]), 0)},
        dict(r=2, lora_alpha=4, target_modules=["word_embeddings"]),
    ),
    "vit_linear_and_patch_conv2d": (
        tiny_vit,
        lambda: {"pixel_values": _pixels()},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "fc1", "projection"]),
    ),
    "vit_dora": (
        tiny_vit,
        lambda: {"pixel_values": _pixels()},
        dict(r=4, lora_alpha=8, target_modules=["v_proj", "projection"], use_dora=True),
    ),
    "convnet_conv_embedding": (
        conv_net,
        _conv_inputs,
        dict(r=2, lora_alpha=4, target_modules=["c1", "c2", "emb", "head"]),
    ),
    "convnet_dora_conv_embedding": (
        conv_net,
        _conv_inputs,
        dict(r=2, lora_alpha=4, target_modules=["c1", "c2", "emb"], use_dora=True),
    ),
    "convnet_conv_bias_all": (conv_net, _conv_inputs, dict(r=3, lora_alpha=2, target_modules=["c1", "c2"], bias="all")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_grads_match_peft(case: str) -> None:
    make_model, make_inputs, cfg = CASES[case]
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p, pm = make_pair(model, **cfg)
    assert_parity(model, make_inputs(), p, pm)
    # functuner never wrote to the model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_modules_to_save_copy_is_what_changes_the_classifier() -> None:
    """With only the classifier copy changed, the output differs from the base exactly as PEFT's does."""
    model = tiny_bert(num_labels=3)
    p = ft.init(model, ft.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), generator=0)
    key = "classifier.modules_to_save.default.weight"
    p = p.replace({key: p[key] + 0.5})
    pm = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    )
    peft.set_peft_model_state_dict(pm, ft.to_peft_state_dict(p))
    pm.eval()
    inputs = {"input_ids": _ids()}
    with torch.no_grad():
        torch.testing.assert_close(_out(ft.apply(model, p, kwargs=inputs)), _out(pm(**inputs)), atol=ATOL, rtol=0)
        assert not torch.allclose(_out(ft.apply(model, p, kwargs=inputs)), _out(model(**inputs)))


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_model_with_fp32_lora_dtype_matches_peft_autocast(use_dora: bool) -> None:
    """A bf16 base with SWIFT's lora_dtype='fp32' matches PEFT, whose default autocast keeps adapters in fp32."""
    model = tiny_llama().to(torch.bfloat16)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dtype="fp32", use_dora=use_dora)
    p, pm = make_pair(model, **cfg)
    assert all(t.dtype == torch.float32 for t in p.values())
    assert all(t.dtype == torch.float32 for n, t in pm.named_parameters() if "lora_" in n)
    inputs = {"input_ids": _ids()}
    with torch.no_grad():
        ours, theirs = _out(ft.apply(model, p, kwargs=inputs)), _out(pm(**inputs))
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


# ---------------------------------------------------------------------------
# lora_dropout in training mode: the same mask on both sides
# ---------------------------------------------------------------------------
class FixedMaskDropout(nn.Module):
    """Inverted dropout with a given keep-mask (so PEFT can be fed the mask functuner's generator draws)."""

    def __init__(self, keep: torch.Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep / (1.0 - self.p)


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_in_train_mode_matches_peft_with_same_mask(use_dora: bool) -> None:
    """PEFT semantics in training: dropout on the LoRA input; for DoRA the base term is recomputed on dropped x.

    One module is adapted, so functuner draws exactly one mask from the generator;
    PEFT's dropout module is given that same mask.
    """
    rate = 0.4
    model = tiny_llama().train()
    cfg = dict(
        r=4, lora_alpha=8, target_modules=r"model\.layers\.0\.self_attn\.q_proj", lora_dropout=rate, use_dora=use_dora
    )
    p, pm = make_pair(model, **cfg)
    inputs = {"input_ids": _ids()}
    x_shape = (2, 7, 32)  # q_proj input: (batch, seq, hidden)
    keep = torch.empty(x_shape).bernoulli_(1.0 - rate, generator=torch.Generator().manual_seed(7))
    assert 0 < keep.sum() < keep.numel()
    pm.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"] = FixedMaskDropout(keep, rate)
    assert_parity(model, inputs, p, pm, generator=torch.Generator().manual_seed(7))

    # the mask matters: another seed gives another output
    with torch.no_grad():
        a = _out(ft.apply(model, p, kwargs=inputs, generator=torch.Generator().manual_seed(7)))
        b = _out(ft.apply(model, p, kwargs=inputs, generator=torch.Generator().manual_seed(8)))
    assert (a - b).abs().max() > 1e-4


def test_training_mode_without_generator_is_refused() -> None:
    model = tiny_llama().train()
    p = ft.init(model, ft.LoRAConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1), generator=0)
    with pytest.raises(ft.errors.ConfigError, match="lora_dropout"):
        ft.apply(model, p, kwargs={"input_ids": _ids()})


# ---------------------------------------------------------------------------
# merged weights: functuner.merge equals PEFT's merge_and_unload
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [
        "llama_linear",
        "llama_dora_linear",
        "gpt2_dora_conv1d",
        "convnet_dora_conv_embedding",
        "llama_dora_embedding",
        "bert_linear_bias_all",
        "gpt2_tied_embedding",
    ],
)
def test_merge_matches_peft_merge_and_unload(case: str) -> None:
    """Merged weights equal PEFT's.  For GPT-2's tied wte/lm_head both names get the merged weight, as in PEFT
    (whose in-place merge changes the shared tensor), so there the merged model differs from the adapter forward."""
    make_model, _, cfg = CASES[case]
    model = make_model()
    p, pm = make_pair(model, **cfg)
    merged = ft.merge(model, p)
    theirs = pm.merge_and_unload().state_dict()
    assert set(theirs) <= set(merged)
    changed = 0
    for k, v in theirs.items():
        torch.testing.assert_close(merged[k], v, atol=ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
        changed += not torch.equal(merged[k], model.state_dict()[k])
    assert changed > 0


# ---------------------------------------------------------------------------
# several adapters active together (PEFT: base_model.set_adapter([...]))
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True])
def test_two_active_adapters_match_peft_forward_and_merge(use_dora: bool) -> None:
    """Adapters run in order; DoRA norms use the unmerged base weight (PEFT's rule), in the forward and in merge."""
    model = tiny_llama()
    cfgs = {
        "a": dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], use_dora=use_dora),
        "b": dict(r=4, lora_alpha=12, target_modules=["q_proj", "o_proj"], use_dora=use_dora),
    }
    ps = [
        ft.init(model, ft.LoRAConfig(init_lora_weights=False, **c), generator=i, adapter_name=n)
        for i, (n, c) in enumerate(cfgs.items())
    ]
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfgs["a"]), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(**cfgs["b"]))
    for p in ps:
        loaded = peft.set_peft_model_state_dict(
            pm, ft.to_peft_state_dict(p, p.adapter_name), adapter_name=p.adapter_name
        )
        assert loaded.unexpected_keys == []
    pm.base_model.set_adapter(["a", "b"])
    pm.eval()
    inputs = {"input_ids": _ids()}
    with torch.no_grad():
        ours = _out(ft.apply(model, ps, kwargs=inputs))
        theirs = _out(pm(**inputs))
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        merged_fwd = _out(torch.func.functional_call(model, ft.merge(model, ps), (), inputs))
        torch.testing.assert_close(merged_fwd, ours, atol=ATOL, rtol=0)
        theirs_merged = pm.merge_and_unload().state_dict()
    merged = ft.merge(model, ps)
    for k, v in theirs_merged.items():
        torch.testing.assert_close(merged[k], v, atol=ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------
# init_lora_weights: the same distributions and zero patterns as PEFT's own init
# ---------------------------------------------------------------------------
def _by_suffix(named: dict[str, torch.Tensor], part: str) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for n, t in named.items() if f".{part}." in n or n.endswith(f".{part}")])


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_distributions_match_peft(init) -> None:
    model = tiny_llama()
    cfg = dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "embed_tokens"], init_lora_weights=init
    )
    p = ft.init(model, ft.LoRAConfig(**cfg), generator=0)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    theirs = {n[len("base_model.model.") :]: t for n, t in pm.named_parameters() if "lora_" in n}
    assert set(theirs) == set(p)
    for name, t in p.items():
        assert t.shape == theirs[name].shape and t.dtype == theirs[name].dtype, name
        # B (and the embedding's A) start at zero in both: the adapted model starts as the base model
        assert bool((t == 0).all()) == bool((theirs[name] == 0).all()), name
    linear_a = {n: t for n, t in p.items() if ".lora_A." in n}
    ours_a, theirs_a = _by_suffix(linear_a, "lora_A"), _by_suffix({n: theirs[n] for n in linear_a}, "lora_A")
    if init is True:  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 32
        bound = 1 / 32**0.5
        assert ours_a.abs().max() <= bound and theirs_a.abs().max() <= bound
        expected_std = bound / 3**0.5
    else:  # normal with std 1/r
        expected_std = 1 / 8
    for a in (ours_a, theirs_a):
        assert abs(float(a.std()) / expected_std - 1) < 0.1
    emb_b = _by_suffix({n: t for n, t in p.items() if "lora_embedding_B" in n}, "default")
    assert abs(float(emb_b.std()) - 1) < 0.15  # normal(0, 1), as PEFT
    with torch.no_grad():
        ids = {"input_ids": _ids()}
        assert torch.equal(_out(ft.apply(model, p, kwargs=ids)), _out(model(**ids)))


def test_dora_magnitude_init_equals_peft() -> None:
    """With B = 0 the magnitude is the row norm of the base weight: exactly PEFT's for every kind."""
    for make_model, cfg in [
        (tiny_gpt2, dict(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
        (tiny_llama, dict(r=2, target_modules=["q_proj", "embed_tokens"])),
        (conv_net, dict(r=2, target_modules=["c1", "c2"])),
    ]:
        model = make_model()
        p = ft.init(model, ft.LoRAConfig(use_dora=True, **cfg), generator=0)
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(use_dora=True, **cfg))
        theirs = dict(pm.named_parameters())
        mags = [k for k in p if "lora_magnitude_vector" in k]
        assert mags
        for k in mags:
            torch.testing.assert_close(p[k], theirs["base_model.model." + k].detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_dropout_in_train_mode_matches_peft_with_same_mask(use_dora: bool) -> None:
    rate = 0.5
    model = conv_net().train()
    p, pm = make_pair(model, r=2, lora_alpha=4, target_modules=["c2"], lora_dropout=rate, use_dora=use_dora)
    keep = torch.empty(2, 6, 8, 4).bernoulli_(1.0 - rate, generator=torch.Generator().manual_seed(3))
    pm.base_model.model.c2.lora_dropout["default"] = FixedMaskDropout(keep, rate)
    assert_parity(model, _conv_inputs(), p, pm, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------
# target selection: the same modules as PEFT
# ---------------------------------------------------------------------------
TARGET_SPECS = [
    (tiny_llama, dict(target_modules="all-linear")),
    (tiny_gpt2, dict(target_modules="all-linear")),
    (tiny_bert, dict(target_modules="all-linear")),
    (tiny_vit, dict(target_modules="all-linear")),
    (tiny_llama, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    (tiny_llama, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0, layers_pattern="layers")),
    (tiny_llama, dict(target_modules=r".*proj", exclude_modules=r".*mlp.*")),
    (tiny_bert, dict(target_modules=["dense"], exclude_modules=["output.dense"])),
    (tiny_llama, dict(target_modules=["self_attn.q_proj", "mlp.up_proj"])),
]


@pytest.mark.parametrize(("make_model", "spec"), TARGET_SPECS, ids=lambda v: getattr(v, "__name__", None) or repr(v))
def test_target_selection_matches_peft(make_model, spec: dict) -> None:
    model = make_model()
    ours = set(ft.init(model, ft.LoRAConfig(r=2, **spec), generator=0))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, **spec))
    theirs = {n[len("base_model.model.") :] for n, _ in pm.named_parameters() if "lora_" in n}
    assert ours == theirs


def test_targets_matching_nothing_fail_in_both() -> None:
    model = tiny_llama()
    spec = dict(target_modules=["proj"])  # list entries match whole name components, not substrings
    with pytest.raises(ValueError):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, **spec))
    with pytest.raises(ft.errors.TargetError, match="target_modules"):
        ft.init(model, ft.LoRAConfig(r=2, **spec), generator=0)
