"""The stateful SWIFT shim (SwiftModel) on real transformers models built from configs.

Oracles: the functional core (``functuner.apply`` with the shim's own
tensors), the untouched base model, and numbers measured with the real
ms-swift 4.6 (noted where used).
"""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

import functuner as ft
from functuner import LoRAConfig, Swift, SwiftModel
from functuner.errors import AdapterNameError, ConfigError, ParamsMismatchError

X = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _two_adapter_llama(seed: int = 0) -> tuple[torch.nn.Module, SwiftModel]:
    base = tiny_llama()
    torch.manual_seed(seed)
    sm = Swift.prepare_model(
        tiny_llama(),
        {
            "default": LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "other": LoRAConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"], init_lora_weights=False),
        },
    )
    return base, sm


def _logits(m: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(X).logits


def _oracle(base: torch.nn.Module, sm: SwiftModel, names: list[str]) -> torch.Tensor:
    """What the functional core computes with the shim's own tensors on an untouched model."""
    with torch.no_grad():
        return ft.apply(base, [sm.adapters[n].params.detach() for n in names], (X,)).logits


def test_names_trainability_and_summary_match_real_swift() -> None:
    sm = Swift.prepare_model(
        tiny_llama(),
        {
            "default": LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]),
            "other": LoRAConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"]),
        },
    )
    trainable = [n for n, p in sm.named_parameters() if p.requires_grad]
    # names as printed by ms-swift 4.6 for the same model and configs
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in trainable
    assert "base_model.model.embed_tokens.lora_embedding_A.other" in trainable
    assert len(trainable) == 10 and all(".default." in n or n.endswith(".other") for n in trainable)
    # the exact line ms-swift 4.6 printed for this model and these configs
    assert sm.get_trainable_parameters() == (
        "trainable params: 1,088 || all params: 23,776 || trainable%: 4.5760|| cuda memory: 0.00GiB."
    )
    assert sm.active_adapters == {"default", "other"}
    assert set(sm.adapters) == {"default", "other"} and sm.adapters["other"].config.r == 2


def test_forward_equals_functional_core_and_fallthrough() -> None:
    base, sm = _two_adapter_llama()
    out = _logits(sm)
    assert torch.allclose(out, _oracle(base, sm, ["default", "other"]), atol=1e-6)
    assert not torch.allclose(out, _logits(base), atol=1e-3)
    # calling the inner model directly (as generate() does) still sees the active adapters
    assert torch.equal(_logits(sm.model), out)
    assert sm.model is sm.base_model and sm.config is sm.base_model.config  # attribute fall-through
    want = list(inspect.signature(sm.base_model.forward).parameters)
    assert list(inspect.signature(sm.forward).parameters) == want
    gen = sm.generate(X[:1, :3], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 6)


def test_activate_deactivate_and_disable_adapter() -> None:
    base, sm = _two_adapter_llama()
    both = _logits(sm)
    sm.deactivate_adapter("other")
    assert sm.active_adapters == {"default"}
    assert torch.allclose(_logits(sm), _oracle(base, sm, ["default"]), atol=1e-6)
    sm.set_active_adapters([])
    assert torch.equal(_logits(sm), _logits(base))
    sm.set_active_adapters(["default", "other"])
    assert torch.equal(_logits(sm), both)
    sm.deactivate_adapter("other")
    with sm.disable_adapter():
        assert torch.equal(_logits(sm), _logits(base))
    assert sm.active_adapters == {"default"}  # restores what was active, not every adapter (as SWIFT does)
    # SWIFT warns about an unknown name and ignores it; strict=True raises (the old default here)
    with pytest.raises(AdapterNameError):
        sm.activate_adapter("nope", strict=True)
    with pytest.warns(UserWarning, match="unknown adapter"):
        sm.activate_adapter("nope")
    assert sm.active_adapters == {"default"}


@pytest.mark.parametrize("where", ["cpu", "meta"])
def test_offload_and_back_is_bit_identical(where: str) -> None:
    base, sm = _two_adapter_llama()
    both = _logits(sm)
    before = {k: v.detach().clone() for k, v in sm.adapters["default"].tensors.items()}
    sm.deactivate_adapter("default", offload=where)
    devices = {p.device.type for n, p in sm.named_parameters() if ".default." in n}
    assert devices == {where}
    assert torch.allclose(_logits(sm), _oracle(base, sm, ["other"]), atol=1e-6)
    sm.activate_adapter("default")
    assert {p.device.type for n, p in sm.named_parameters() if ".default." in n} == {"cpu"}
    for k, v in sm.adapters["default"].tensors.items():
        assert torch.equal(v, before[k])
    assert torch.equal(_logits(sm), both)
    with pytest.raises(ConfigError):
        sm.deactivate_adapter("default", offload="disk")


def test_merge_unmerge_is_exact_and_covers_every_active_adapter() -> None:
    _, sm = _two_adapter_llama()
    both = _logits(sm)
    originals = {n: p.detach().clone() for n, p in sm.model.named_parameters() if "lora" not in n}
    Swift.merge(sm)
    merged_w = sm.model.model.layers[0].self_attn.o_proj.weight  # only 'other' adapts o_proj
    assert not torch.equal(merged_w, originals["model.layers.0.self_attn.o_proj.weight"])
    assert torch.allclose(_logits(sm), both, atol=1e-5)
    Swift.unmerge(sm)
    for n, p in sm.model.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, originals[n]), n
    assert torch.equal(_logits(sm), both)


def test_merge_and_unload_with_tied_embeddings() -> None:
    sm = Swift.prepare_model(
        tiny_gpt2(),
        {
            "default": LoRAConfig(
                r=4, target_modules=["c_attn", "lm_head"], fan_in_fan_out=False, init_lora_weights=False
            ),
            "emb": LoRAConfig(r=2, target_modules=["wte"], init_lora_weights=False),
        },
    )
    assert sm.model.lm_head.weight is sm.model.transformer.wte.weight
    wte_before = sm.model.transformer.wte.weight.detach().clone()
    want = _logits(sm)
    Swift.merge(sm)  # merge unties (lm_head and wte take different deltas); unmerge re-ties the same object
    assert torch.allclose(_logits(sm), want, atol=1e-5)
    Swift.unmerge(sm)
    assert sm.model.lm_head.weight is sm.model.transformer.wte.weight
    assert torch.equal(_logits(sm), want)
    Swift.merge_and_unload(sm)
    assert not list(sm.adapters) and not [n for n, _ in sm.named_parameters() if "lora" in n]
    assert torch.allclose(_logits(sm), want, atol=1e-5)
    # lm_head and wte took different deltas, so they are untied and the config says so
    assert sm.model.lm_head.weight is not sm.model.transformer.wte.weight
    assert sm.model.config.tie_word_embeddings is False
    assert not torch.equal(sm.model.transformer.wte.weight, wte_before)


def test_merge_and_unload_one_named_adapter() -> None:
    base, sm = _two_adapter_llama()
    want = _logits(sm)
    Swift.merge_and_unload(sm, adapter_name="other")
    assert set(sm.adapters) == {"default"}
    assert torch.allclose(_logits(sm), want, atol=1e-5)
    sm.set_active_adapters([])
    assert not torch.allclose(_logits(sm), _logits(base), atol=1e-4)  # 'other' is now in the weights


def test_prepare_again_adds_tuners_and_rejects_duplicates() -> None:
    base = tiny_llama()
    torch.manual_seed(1)
    sm = Swift.prepare_model(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    sm2 = Swift.prepare_model(
        sm, {"b": LoRAConfig(r=2, target_modules=["q_proj", "gate_proj"], init_lora_weights=False)}
    )
    assert sm2.active_adapters == {"default", "b"} and sm2.model is sm.model
    assert torch.allclose(_logits(sm2), _oracle(base, sm2, ["default", "b"]), atol=1e-6)
    with pytest.raises(AdapterNameError):
        Swift.prepare_model(sm2, LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterNameError):
        Swift.prepare_model(tiny_llama(), {"../x": LoRAConfig(r=2, target_modules=["q_proj"])})


def test_peft_config_goes_to_peft() -> None:
    import peft

    pm = Swift.prepare_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert isinstance(pm, peft.PeftModel)
    out = _logits(pm)
    base = Swift.merge_and_unload(pm)
    assert torch.allclose(_logits(base), out, atol=1e-6)


def test_training_step_and_lora_plus_groups() -> None:
    torch.manual_seed(0)
    cfg = LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], lorap_lr_ratio=16.0, lorap_emb_lr=1e-5)
    sm = Swift.prepare_model(tiny_llama(), cfg, extra_state_keys=[r"model\.norm\.weight"])
    groups = sm.create_optimizer_param_groups(lr=1e-3, weight_decay=0.1)
    named = {id(p): n for n, p in sm.named_parameters()}
    by_lr = {
        (g["lr"] if "lr" in g else None, g["weight_decay"]): sorted(named[id(p)] for p in g["params"]) for g in groups
    }
    assert all(".lora_A." in n for n in by_lr[(1e-3, 0.1)]) and len(by_lr[(1e-3, 0.1)]) == 4
    assert all(".lora_B." in n for n in by_lr[(1e-3 * 16, 0.1)]) and len(by_lr[(1e-3 * 16, 0.1)]) == 4
    assert by_lr[(1e-5, 0.1)] == [
        "base_model.model.embed_tokens.lora_embedding_A.default",
        "base_model.model.embed_tokens.lora_embedding_B.default",
    ]
    assert by_lr[(None, 0.0)] == ["base_model.model.norm.weight"]  # extra state: a norm, so no decay
    opt = torch.optim.AdamW(groups, lr=1e-3)
    frozen = sm.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    sm.train()
    losses = []
    for _ in range(5):
        loss = sm(input_ids=X, labels=X).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(sm.model.model.layers[0].self_attn.q_proj.weight, frozen)


def test_gradient_checkpointing_recomputes_with_adapters() -> None:
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        sm = Swift.prepare_model(
            tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        if checkpointing:
            # transformers 5.25 renamed gradient_checkpointing_enable (deprecated alias, warns)
            sm.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        sm.train()
        sm(input_ids=X, labels=X).loss.backward()
        return {n: p.grad.clone() for n, p in sm.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) == 8
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6), n


def test_state_dict_and_strict_load_state_dict() -> None:
    _, sm = _two_adapter_llama()
    sd = sm.state_dict(adapter_name="default")
    assert set(sd) == {
        f"model.layers.{i}.self_attn.{m}.lora_{ab}.default.weight"
        for i in range(2)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    peft_sd = sm.state_dict(adapter_name="default", peft_format=True)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in peft_sd
    torch.manual_seed(5)
    target = Swift.prepare_model(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    target.load_state_dict(peft_sd, adapter_name="default")
    sm.set_active_adapters(["default"])
    assert torch.equal(_logits(target), _logits(sm))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    broken = dict(sd)
    broken.pop(next(iter(broken)))
    broken["model.layers.0.self_attn.k_proj.lora_A.default.weight"] = torch.zeros(4, 32)
    with pytest.raises(ParamsMismatchError, match="missing .*unexpected"):
        target.load_state_dict(broken, adapter_name="default")
    wrong_shape = {k: torch.zeros(3, *v.shape[1:]) for k, v in sd.items()}
    with pytest.raises(ParamsMismatchError, match="shape"):
        target.load_state_dict(wrong_shape, adapter_name="default")
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed


def test_inference_mode_is_eval_mode_as_in_swift() -> None:
    # SWIFT 4.6's SwiftModel(inference_mode=True) only calls eval(): the new adapters stay trainable
    # (this test used to assert every parameter frozen, which differed from SWIFT)
    sm = SwiftModel(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"], bias="all"), inference_mode=True)
    trainable = {n for n, p in sm.named_parameters() if p.requires_grad}
    assert not sm.training and trainable and all(".lora_" in n for n in trainable)  # biases not marked trainable


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_add_weighted_adapter(kind: str) -> None:
    from functuner.tuners.lora.combine import add_weighted_adapter

    base = tiny_llama()
    torch.manual_seed(2)
    sm = Swift.prepare_model(
        tiny_llama(),
        {
            "a": LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "b": LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        },
    )
    both = _logits(sm)
    extra = {"svd_rank": 4} if kind == "svd" else {}
    sm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type=kind, **extra)
    assert sm.active_adapters == {"mix"}
    expect = add_weighted_adapter(
        {n: sm.adapters[n].params.detach() for n in ("a", "b")}, [1.0, 1.0], "mix", kind, model=base, **extra
    )
    with torch.no_grad():
        assert torch.allclose(_logits(sm), ft.apply(base, expect, (X,)).logits, atol=1e-5)
    if kind in ("cat", "svd"):  # full rank 4 reproduces the sum of both deltas
        assert torch.allclose(_logits(sm), both, atol=1e-4)


def test_global_activation_is_seen_by_other_threads() -> None:
    base, sm = _two_adapter_llama()
    sm.set_active_adapters(["default"])
    with ThreadPoolExecutor(2) as pool:
        pool.submit(sm.set_active_adapters, ["other"]).result()
        got = pool.submit(_logits, sm).result()
    assert sm.active_adapters == {"other"}
    assert torch.allclose(got, _oracle(base, sm, ["other"]), atol=1e-6)


def test_per_thread_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USE_UNIQUE_THREAD", "0")
    base, sm = _two_adapter_llama()
    expected = {
        ("default",): _oracle(base, sm, ["default"]),
        ("other",): _oracle(base, sm, ["other"]),
        (): _logits(base),
        ("default", "other"): _oracle(base, sm, ["default", "other"]),
    }
    choices = list(expected)

    def work(i: int) -> bool:
        names = choices[i % len(choices)]
        ok = True
        for _ in range(2):
            sm.set_active_adapters(list(names))
            ok &= torch.allclose(_logits(sm), expected[names], atol=1e-6) and sm.active_adapters == set(names)
        return ok

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(8)))
    assert all(results)
    assert sm.active_adapters == {"default", "other"}  # the main thread's choice is untouched
    # offloading an adapter another thread still uses is refused
    with ThreadPoolExecutor(1) as pool:
        pool.submit(sm.set_active_adapters, ["default"]).result()
        with pytest.raises(ConfigError, match="another thread"):
            sm.deactivate_adapter("default", offload="meta")


def test_several_tuner_types_together() -> None:
    from functuner.tuners.adapter import AdapterConfig

    base = tiny_llama()
    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(),
        {
            "ad": AdapterConfig(dim=32, target_modules=r".*mlp", hidden_pos=0, adapter_length=4),
            "lo": LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
        },
    )
    assert "base_model.model.layers.0.mlp.adapter_ad.linear1.weight" in dict(sm.named_parameters())
    want = _logits(sm)
    assert torch.allclose(want, _oracle(base, sm, ["ad", "lo"]), atol=1e-6)
    with pytest.warns(UserWarning, match="'ad'"):  # only LoRA has a merged form; the Adapter stays
        Swift.merge_and_unload(sm)
    assert set(sm.adapters) == {"ad"}
    assert torch.allclose(_logits(sm), want, atol=1e-5)


def test_transformers_trainer_trains_the_adapters(tmp_path) -> None:
    import transformers

    torch.manual_seed(0)
    sm = Swift.prepare_model(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], lorap_lr_ratio=4.0))
    data = [{"input_ids": X[i % 2], "labels": X[i % 2]} for i in range(4)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    opt = torch.optim.AdamW(sm.create_optimizer_param_groups(lr=1e-2, weight_decay=0.0))
    before = {k: v.detach().clone() for k, v in sm.adapters["default"].tensors.items()}
    frozen = sm.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    transformers.Trainer(model=sm, args=args, train_dataset=data, optimizers=(opt, None)).train()
    assert all(not torch.equal(before[k], v) for k, v in sm.adapters["default"].tensors.items())
    assert torch.equal(sm.model.model.layers[0].self_attn.q_proj.weight, frozen)


def test_failed_prepare_changes_nothing() -> None:
    model = tiny_llama()
    names_before = [n for n, _ in model.named_parameters()]
    out_before = _logits(model)
    clash = LoRAConfig(r=2, target_modules=["q_proj"])
    # the second adapter would place its tensors where the model already has a parameter called 'lora_A'
    model.model.layers[1].self_attn.q_proj.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ParamsMismatchError, match="already has"):
        Swift.prepare_model(model, {"ok": LoRAConfig(r=2, target_modules=["v_proj"]), "default": clash})
    del model.model.layers[1].self_attn.q_proj.lora_A
    assert [n for n, _ in model.named_parameters()] == names_before
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(_logits(model), out_before)
