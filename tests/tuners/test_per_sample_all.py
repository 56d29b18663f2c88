"""Per-sample adapters (``apply_mixed``) for every tuner that can run per sample, against real PEFT.

One row = a toy model and a PEFT config.  A PEFT model gets two adapters ``ad_a`` and ``ad_b`` of that
config; every adapter tensor is moved off its init by seeded noise (so no adapter is the identity) and the
same tensors become functuner params (``functuner.init`` takes PEFT's config objects; the names are PEFT's).
The batch mixes ``ad_a``, ``ad_b`` and ``__base__``.  Compared, in fp32 on CPU at PEFT's fp32 tolerance
(1e-5, ``tests/testing_common.py``):

* with PEFT's own mixed batch (``PeftModel(x, adapter_names=...)``) where PEFT has one: in peft 0.21 that is
  LoRA only (``LoraModel._enable_peft_forward_hooks``; its layers' ``_mixed_batch_forward``), variants and
  ``modules_to_save`` included; PEFT refuses it for ``nn.MultiheadAttention`` (``TypeError``) and
  ``target_parameters`` (``ValueError``), which the rows assert;
* with each sample run alone through PEFT (``set_adapter``; ``disable_adapter`` for ``__base__``), for
  every row: PEFT's other tuners have no mixed batch, so this is the reference there;
* with each sample run alone through :func:`functuner.apply`.

Then gradients (the mixed batch's equal the sum of the per-sample ones) and ``torch.func.vmap`` over inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from models import tiny_gpt2, tiny_llama
from peft import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig
from torch import nn

import functuner as ft
from functuner.core.routing import current_routes
from functuner.errors import ConfigError
from functuner.tuners.lora.mixed import apply_mixed
from functuner.tuners.sub_batch import SUB_BATCH, SubBatchStack, choose_per_sample
from tests.tuners.lora.test_lora_target_parameters import tiny_moe

ATOL = RTOL = 1e-5
NAMES = ["ad_a", "__base__", "ad_b", "ad_b", "ad_a", "__base__"]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(torch.relu(self.lin0(x))))


class ConvNet(nn.Module):
    """Conv2d -> grouped Conv2d (groups=2) -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c2(torch.relu(self.c1(x))).mean((-1, -2)))


class Mha(nn.Module):
    """Self-attention over ``(batch, length, 8)``; ``batch_first=False`` transposes to PyTorch's default layout."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.batch_first else x.transpose(0, 1)
        h, _ = self.mha(h, h, h)
        return self.head(h if self.batch_first else h.transpose(0, 1))


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(cls: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return cls().eval()

    return make


N = len(NAMES)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "mlp": (_build(MLP), lambda: torch.randn(N, 10, generator=_g(1))),
    "conv": (_build(ConvNet), lambda: torch.randn(N, 4, 6, 6, generator=_g(2))),
    "mha": (_build(lambda: Mha(False)), lambda: torch.randn(N, 5, 8, generator=_g(3))),
    "mha_batch_first": (_build(lambda: Mha(True)), lambda: torch.randn(N, 5, 8, generator=_g(3))),
    "llama": (tiny_llama, lambda: torch.randint(0, 64, (N, 5), generator=_g(4))),
    "gpt2": (tiny_gpt2, lambda: torch.randint(0, 64, (N, 5), generator=_g(5))),
    "moe": (tiny_moe, lambda: torch.randint(0, 64, (N, 1), generator=_g(6))),  # one token per sample: decoding
}

# row: (model, PEFT config class, its kwargs, how PEFT's own adapter_names= behaves: "mixed" (it runs it, the
# reference) or the exception type it raises ("none": PEFT's tuner has no mixed batch at all))
ROWS: dict[str, tuple[str, type, dict[str, Any], Any]] = {
    # LoRA beyond the stacked path (those run on sub-batches)
    "lora-modules_to_save": (
        "mlp",
        peft.LoraConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["head"]},
        "mixed",
    ),
    "lora-grouped-conv": ("conv", peft.LoraConfig, {"target_modules": ["c1", "c2"], "r": 4}, "mixed"),
    "lora-mha": ("mha", peft.LoraConfig, {"target_modules": ["mha"], "r": 2}, TypeError),
    "lora-mha-batch-first": ("mha_batch_first", peft.LoraConfig, {"target_modules": ["mha"], "r": 2}, TypeError),
    "lora-target_parameters": (
        "moe",
        peft.LoraConfig,
        {"target_parameters": ["mlp.experts.gate_up_proj"], "r": 2},
        ValueError,
    ),
    "lora-kasa": ("mlp", peft.LoraConfig, {"target_modules": ["lin0"], "kasa_config": KasaConfig(), "r": 2}, "kasa"),
    "lora-mica": ("mlp", peft.LoraConfig, {"target_modules": ["lin0", "lin1"], "init_lora_weights": "mica"}, "mixed"),
    "lora-velora": (
        "mlp",
        peft.LoraConfig,
        {"target_modules": ["lin0"], "velora_config": VeloraConfig(num_groups=2, init_type="random")},
        "mixed",
    ),
    "lora-bdlora": (
        "mlp",
        peft.LoraConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
            "r": 4,
        },
        "mixed",
    ),
    "lora-monteclora": (
        "mlp",
        peft.LoraConfig,
        {"target_modules": ["lin0"], "monteclora_config": MontecloraConfig(num_samples=2)},
        "mixed",
    ),
    # PEFT's other tuners: PEFT has no mixed batch for them; the reference is each sample alone
    "ia3-mlp": ("mlp", peft.IA3Config, {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}, "none"),
    "ia3-conv": ("conv", peft.IA3Config, {"target_modules": ["c1", "c2"], "feedforward_modules": ["c2"]}, "none"),
    "ia3-gpt2": (
        "gpt2",
        peft.IA3Config,
        {"target_modules": ["c_attn", "c_fc"], "feedforward_modules": ["c_fc"]},
        "none",
    ),
    "loha-mlp": ("mlp", peft.LoHaConfig, {"target_modules": ["lin0", "lin1"], "r": 4}, "none"),
    "loha-conv": ("conv", peft.LoHaConfig, {"target_modules": ["c1"], "r": 2}, "none"),
    "lokr-mlp": ("mlp", peft.LoKrConfig, {"target_modules": ["lin0", "lin1"], "r": 4}, "none"),
    "lokr-llama": ("llama", peft.LoKrConfig, {"target_modules": ["q_proj", "down_proj"], "r": 2}, "none"),
    "vera-mlp": ("mlp", peft.VeraConfig, {"target_modules": ["lin0"], "r": 4}, "none"),
    "fourierft-mlp": ("mlp", peft.FourierFTConfig, {"target_modules": ["lin0", "lin1"], "n_frequency": 16}, "none"),
    "oft-mlp": ("mlp", peft.OFTConfig, {"target_modules": ["lin0"], "oft_block_size": 5, "r": 0}, "none"),
    "oft-conv": ("conv", peft.OFTConfig, {"target_modules": ["c1"], "oft_block_size": 0, "r": 4}, "none"),
    "boft-mlp": ("mlp", peft.BOFTConfig, {"target_modules": ["lin0"], "boft_block_size": 2}, "none"),
    "adalora-llama": (
        "llama",
        peft.AdaLoraConfig,
        {"target_modules": ["q_proj", "v_proj"], "init_r": 4, "total_step": 5},
        "none",
    ),
}


def _pair(row: str) -> tuple[nn.Module, torch.Tensor, Any, dict[str, ft.TunerParams]]:
    """(model, inputs, PeftModel with adapters ad_a / ad_b, functuner params holding the same tensors)."""
    model_id, cls, kwargs, _ = ROWS[row]
    build, inputs = MODELS[model_id]
    model = build()
    pm = peft.get_peft_model(copy.deepcopy(model), cls(**kwargs), adapter_name="ad_a")
    extra = {"inference_mode": True} if cls is peft.AdaLoraConfig else {}  # AdaLoRA: one trainable adapter
    pm.add_adapter("ad_b", cls(**kwargs, **extra))
    pm.eval()
    gen = _g(11)
    with torch.no_grad():  # every adapter tensor off its init, so no adapter is the identity
        for n, t in pm.named_parameters():
            if {"ad_a", "ad_b"} & set(n.split(".")) and "ranknum" not in n:  # AdaLoRA's ranknum: a constant
                t.add_(0.2 * torch.randn(t.shape, generator=gen).to(t.dtype))
    prefix = "base_model.model."
    theirs = {n.removeprefix(prefix): t for n, t in [*pm.named_parameters(), *pm.named_buffers()]}
    for key, buf in pm.named_buffers(remove_duplicate=False):  # VeRA's shared projections: functuner's vera_A.<ad>
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in ("vera_A", "vera_B"):
            theirs.setdefault(f"{parts[-2]}.{parts[-1]}", buf)
    params = {}
    for name in ("ad_a", "ad_b"):
        p = ft.init(model, cls(**kwargs), generator=0, adapter_name=name)
        if set(p) - set(theirs):  # PEFT's in-memory LoRA names differ for nn.MultiheadAttention and raw parameters
            state = peft.get_peft_model_state_dict(pm, adapter_name=name)
            theirs = ft.from_peft_state_dict(state, name, config=p.config)
        missing = sorted(set(p) - set(theirs))
        assert not missing, missing
        params[name] = p.replace({k: theirs[k].detach().clone() for k in p})
    if model_id.startswith("mha"):  # huggingface/peft#3774 (open): PEFT applies out_proj's LoRA delta twice
        with torch.no_grad():
            for n, t in pm.named_parameters():
                if "out_proj.lora_B" in n:
                    t.mul_(0.5)
    return model, inputs(), pm, params


def _out(o: Any) -> torch.Tensor:
    return o if isinstance(o, torch.Tensor) else o.logits


def _peft_alone(pm: Any, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    rows = []
    for i, n in enumerate(names):
        if n == "__base__":
            with pm.disable_adapter():
                rows.append(_out(pm(x[i : i + 1])))
        else:
            pm.set_adapter(n)
            rows.append(_out(pm(x[i : i + 1])))
    return torch.cat(rows)


def _ours_alone(model: nn.Module, params: dict[str, ft.TunerParams], x: torch.Tensor, names: list[str]) -> torch.Tensor:
    rows = [
        _out(model(x[i : i + 1]) if n == "__base__" else ft.apply(model, params[n], (x[i : i + 1],)))
        for i, n in enumerate(names)
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("row", list(ROWS))
def test_per_sample_matches_peft(row: str) -> None:
    model, x, pm, params = _pair(row)
    assert choose_per_sample(model, params) is SUB_BATCH  # every row here is beyond the stacked LoRA path
    with torch.no_grad():
        ours = _out(apply_mixed(model, params, NAMES, (x,)))
        alone = _ours_alone(model, params, x, NAMES)
        peft_alone = _peft_alone(pm, x, NAMES)
    base = _out(model(x)).detach()
    for i, n in enumerate(NAMES):  # parity must not be vacuous: each adapter changes its samples
        assert n == "__base__" or (ours[i] - base[i]).abs().max() > 1e-4, (row, i)
    torch.testing.assert_close(ours, alone, atol=ATOL, rtol=RTOL)
    peft_mixed = ROWS[row][3]
    keep = [i for i, n in enumerate(NAMES) if peft_mixed != "kasa" or n != "__base__"]  # see the KaSA test
    torch.testing.assert_close(ours[keep], peft_alone[keep], atol=ATOL, rtol=RTOL)
    if peft_mixed in ("mixed", "kasa"):
        with torch.no_grad():
            theirs = _out(pm(x, adapter_names=NAMES))
        torch.testing.assert_close(ours[keep], theirs[keep], atol=ATOL, rtol=RTOL)
    elif isinstance(peft_mixed, type):
        with pytest.raises(peft_mixed):
            pm(x, adapter_names=NAMES)
    assert current_routes() is None


def test_kasa_base_samples_differ_from_peft_by_design() -> None:
    """Why the KaSA row compares only the adapted samples with PEFT: PEFT's KaSA overwrites the shared base
    weight with its truncation (``W`` minus its ``r`` smallest singular components), so PEFT's ``__base__``
    samples (and ``disable_adapter``) run the truncated model; functuner never writes the model, so its
    ``__base__`` samples are the original model's output (its KaSA slot subtracts the dropped component)."""
    model, x, pm, params = _pair("lora-kasa")
    base = [i for i, n in enumerate(NAMES) if n == "__base__"]
    with torch.no_grad():
        ours = apply_mixed(model, params, NAMES, (x,))
        theirs = pm(x, adapter_names=NAMES)
        original = model(x)
    torch.testing.assert_close(ours[base], original[base], atol=0, rtol=0)
    assert not torch.allclose(theirs[base], original[base], atol=1e-3)
    assert not torch.allclose(pm.base_model.model.lin0.base_layer.weight, model.lin0.weight, atol=1e-3)


@pytest.mark.parametrize("row", ["lora-grouped-conv", "ia3-conv", "oft-mlp", "boft-mlp", "lora-mha"])
def test_gradients_equal_the_per_sample_sum(row: str) -> None:
    model, x, _, params = _pair(row)
    leaves = {n: {k: v.detach().clone().requires_grad_(True) for k, v in p.items()} for n, p in params.items()}
    live = {n: params[n].replace(leaves[n]) for n in params}
    w = torch.linspace(-1, 1, _out(model(x)).numel()).reshape(_out(model(x)).shape)
    mixed = _out(apply_mixed(model, live, NAMES, (x,)))
    flat = [t for n in leaves for t in leaves[n].values()]
    g_mixed = torch.autograd.grad((mixed * w).sum(), flat, allow_unused=True)
    alone = _ours_alone(model, live, x, NAMES)
    g_alone = torch.autograd.grad((alone * w).sum(), flat, allow_unused=True)
    for a, b in zip(g_mixed, g_alone, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_torch_func_grad_and_vmap_over_inputs() -> None:
    """``torch.func.grad`` w.r.t. the params of a mixed-tuner batch, and ``vmap`` over stacks of inputs."""
    model, x, _, params = _pair("ia3-mlp")
    _, _, _, lora = _pair("lora-modules_to_save")
    adapters = {"ia3": params["ad_a"], "lora": lora["ad_b"]}
    names = ["ia3", "lora", "__base__", "lora", "ia3", "ia3"]

    def loss(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return _out(apply_mixed(model, {**adapters, "ia3": adapters["ia3"].replace(tensors)}, names, (x,))).sum()

    g = torch.func.grad(loss)(dict(adapters["ia3"]))
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in adapters["ia3"].items()}
    ref = _ours_alone(model, {**adapters, "ia3": adapters["ia3"].replace(leaves)}, x, names).sum()
    for k, r in zip(leaves, torch.autograd.grad(ref, list(leaves.values())), strict=True):
        torch.testing.assert_close(g[k], r, atol=ATOL, rtol=RTOL)
    xs = torch.randn(3, *x.shape, generator=_g(9))
    batched = torch.func.vmap(lambda xb: _out(apply_mixed(model, adapters, names, (xb,))))(xs)
    with torch.no_grad():
        looped = torch.stack([_out(apply_mixed(model, adapters, names, (xb,))) for xb in xs])
    torch.testing.assert_close(batched, looped, atol=ATOL, rtol=RTOL)


def test_mixed_tuners_in_one_batch_match_each_alone() -> None:
    """LoRA (stackable), (IA)³, LoHa and OFT adapters in one batch, by names and by a position tensor."""
    model = MODELS["mlp"][0]()
    gen = _g(5)
    cfgs = {
        "lora": peft.LoraConfig(target_modules=["lin0"], init_lora_weights=False),
        "ia3": peft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False),
        "loha": peft.LoHaConfig(target_modules=["lin1"], init_weights=False),
        "oft": peft.OFTConfig(target_modules=["lin0"], oft_block_size=5, r=0, init_weights=False),
    }
    adapters = {n: ft.init(model, c, generator=gen, adapter_name=n) for n, c in cfgs.items()}
    names = ["oft", "lora", "__base__", "ia3", "loha", "lora", "ia3"]
    x = torch.randn(len(names), 10, generator=gen)
    with torch.no_grad():
        ours = apply_mixed(model, adapters, names, (x,))
        by_index = apply_mixed(model, list(adapters.values()), torch.tensor([3, 0, -1, 1, 2, 0, 1]), (x,))
        torch.testing.assert_close(ours, _ours_alone(model, adapters, x, names), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(by_index, ours, atol=0, rtol=0)
    stack = SUB_BATCH.stack(model, adapters)
    assert isinstance(stack, SubBatchStack) and stack.names == tuple(adapters)
    torch.testing.assert_close(apply_mixed(model, stack, names, (x,)), ours, atol=0, rtol=0)


def test_refusals_are_typed_and_change_nothing() -> None:
    model, x, _, params = _pair("ia3-mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = ft.init(tiny_llama(), peft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"), generator=0)
    with pytest.raises(ConfigError, match=r"'pt' cannot run per sample: it is a PROMPT_TUNING adapter.*not supported"):
        apply_mixed(tiny_llama(), {"pt": prompt}, ["pt"], (torch.zeros(1, 3, dtype=torch.long),))
    drop = ft.init(model, peft.LoHaConfig(target_modules=["lin0"], rank_dropout=0.5), generator=0, adapter_name="d")
    model.train()
    try:
        with pytest.raises(ConfigError, match=r"'d'.*model\.eval"):
            apply_mixed(model, {"d": drop}, ["d"], (x[:1],))
    finally:
        model.eval()
    with pytest.raises(ConfigError, match="first dimension"):  # the batch must lead every adapted module's input
        apply_mixed(model, params, NAMES, (x.reshape(2, 3, 10).transpose(0, 1),))
    with pytest.raises(ConfigError, match="batch has 3 samples"):  # one adapter for every sample: still checked
        apply_mixed(model, params, ["ad_a"] * 3, (x,))
    index = torch.tensor([0, 1, -1, 0, 1, 0])
    with pytest.raises(ConfigError, match="cannot be transformed"):
        torch.func.vmap(lambda i: apply_mixed(model, params, i, (x,)))(index.expand(2, -1))
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        apply_mixed(model, params, torch.tensor([0, 2, 0, 0, 0, 0]), (x,))
    moe, ids, _, moe_params = _pair("lora-target_parameters")  # fused experts see (tokens, hidden): batch x length
    with pytest.raises(ConfigError, match="first dimension"):
        apply_mixed(moe, moe_params, NAMES, (ids.expand(-1, 3),))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert current_routes() is None
