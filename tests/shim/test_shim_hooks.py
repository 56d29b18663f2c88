"""The shim asks tuners through ``Tuner`` hooks, never by type; it registers no process-wide hook.

* per-sample ``adapter_names=`` with a LongLoRA adapter (a ``LoRAConfig``
  subclass without a per-sample form) is a clear :class:`ConfigError`;
* LoRA+ groups come from LoRA's ``optimizer_groups`` hook; LongLoRA has none, as in ms-swift 4.6;
* ``add_weighted_adapter`` goes through the tuner's ``combine`` hook;
* ``merge_and_unload`` with a non-mergeable adapter active merges the rest and warns;
* no ``torch.optim`` global step hook after creating, training and using a SwiftModel;
* ``forward``'s signature is the wrapped model's, on the class too, so a real
  ``transformers.Trainer`` reports ``eval_loss`` without ``label_names``;
* the shim imports no specific tuner module (AST check).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from conftest import tiny_llama

import functuner as ft
from functuner import AdapterConfig, LoRAConfig, Swift, SwiftModel
from functuner.errors import ConfigError
from functuner.tuners import tuner_for

X = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(1))
SHIM = Path(ft.__file__).parent / "shim"


def _long() -> ft.LongLoRAConfig:
    return ft.LongLoRAConfig(r=2, target_modules=["q_proj", "v_proj"], lorap_lr_ratio=4.0)


def test_longlora_is_not_supported_per_sample() -> None:
    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(), {"lora": LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "long": _long()}
    )
    sm.eval()
    with pytest.raises(
        ConfigError, match=r"adapter\(s\) \['long'\] that cannot run per sample are active.*longlora.*not supported per"
    ):
        sm(X, adapter_names=["lora", "__base__", "lora", "lora"])
    sm.deactivate_adapter("long")
    with pytest.raises(ConfigError, match=r"'long'.*longlora is not supported per sample"):
        sm(X, adapter_names=["long", "__base__", "lora", "lora"])
    with pytest.raises(ConfigError, match=r"'long'.*longlora is not supported per sample"):
        sm.generate(X, adapter_names=["long", "lora", "lora", "lora"], max_new_tokens=1)
    with torch.no_grad():  # the LoRA adapter alone still runs per sample
        out = sm(X, adapter_names=["lora", "__base__", "lora", "lora"]).logits
        sm.set_active_adapters(["lora"])
        assert torch.allclose(out[0], sm(X[:1]).logits[0], atol=1e-5)


def test_hooks_of_lora_and_longlora() -> None:
    lora, long, adapter = tuner_for(LoRAConfig()), tuner_for(_long()), tuner_for(AdapterConfig(dim=4))
    assert lora.per_sample is not None and lora.per_sample.kind == "LoRA"
    assert long.per_sample is None and adapter.per_sample is None
    assert lora.optimizer_groups is not None and long.optimizer_groups is None  # SWIFT's LongLoRA: no LoRA+
    assert adapter.optimizer_groups is None
    assert lora.combine is not None and long.combine is None and adapter.combine is None


def test_longlora_has_swifts_plain_groups() -> None:
    # ms-swift 4.6's LongLoRA returns no optimizer_group_callback: lorap_lr_ratio is ignored and its LoRA factors
    # share the decay group at the default lr (run side by side in tests/swift_interop/scenarios.py; this test
    # used to assert LoRA+ groups, which differed from SWIFT)
    sm = Swift.prepare_model(tiny_llama(), {"long": _long()})
    groups = sm.create_optimizer_param_groups(lr=1e-3, weight_decay=0.1)
    assert all("lr" not in g for g in groups) and [g["weight_decay"] for g in groups] == [0.1, 0.0]
    b = {id(p) for k, p in sm.adapters["long"].tensors.items() if ".lora_B." in k}
    assert b and b <= {id(p) for p in groups[0]["params"]}
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in sm.parameters() if p.requires_grad)  # each exactly once


def test_add_weighted_adapter_needs_a_combinable_tuner() -> None:
    sm = Swift.prepare_model(
        tiny_llama(),
        {
            "lora": LoRAConfig(r=2, target_modules=["q_proj"]),
            "ad": AdapterConfig(dim=32, target_modules=r".*mlp", hidden_pos=0, adapter_length=4),
        },
    )
    with pytest.raises(ConfigError, match=r"one tuner that supports it.*ad: ADAPTER"):
        sm.add_weighted_adapter(["lora", "ad"], [1.0, 1.0], "mix")
    with pytest.raises(ConfigError, match=r"ad: ADAPTER"):
        sm.add_weighted_adapter(["ad"], [1.0], "mix")
    with pytest.raises(ConfigError, match="at least one adapter"):
        sm.add_weighted_adapter([], [], "mix")
    assert set(sm.adapters) == {"lora", "ad"}


@pytest.mark.parametrize("via", ["Swift", "SwiftModel"])
def test_merge_and_unload_warns_about_adapters_it_cannot_merge(via: str) -> None:
    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(),
        {
            "ad": AdapterConfig(dim=32, target_modules=r".*mlp", hidden_pos=0, adapter_length=4),
            "lo": LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
        },
    )
    with torch.no_grad():
        want = sm(X).logits
    with pytest.warns(UserWarning, match=r"\{'ad': 'ADAPTER'\}.*no merged form.*merged \['lo'\]"):
        out = Swift.merge_and_unload(sm) if via == "Swift" else sm.merge_and_unload()
    # Swift.merge_and_unload returns the SwiftModel (SWIFT); the method is PEFT's and returns the wrapped model
    assert (out is sm if via == "Swift" else out is sm.model) and set(sm.adapters) == {"ad"}
    with torch.no_grad():
        assert torch.allclose(sm(X).logits, want, atol=1e-5)


def test_no_process_wide_optimizer_hook() -> None:
    before = dict(torch_optimizer._global_optimizer_post_hooks)
    pre = dict(torch_optimizer._global_optimizer_pre_hooks)
    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(),
        {
            "a": LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
            "b": LoRAConfig(r=2, target_modules=["v_proj"], init_lora_weights=False, use_dora=True),
        },
    )
    opt = torch.optim.AdamW(sm.create_optimizer_param_groups(lr=1e-2), fused=True)
    sm.eval()
    with torch.no_grad():
        first = sm(X, adapter_names=["a", "b", "__base__", "a"]).logits
    sm(X).logits.square().mean().backward()
    opt.step()
    with torch.no_grad():
        after = sm(X, adapter_names=["a", "b", "__base__", "a"]).logits
    assert not torch.allclose(first, after)  # the cached stack followed the fused step
    assert torch.equal(after[2], first[2])
    assert dict(torch_optimizer._global_optimizer_post_hooks) == before
    assert dict(torch_optimizer._global_optimizer_pre_hooks) == pre


def test_forward_signature_is_the_wrapped_models_on_the_class_too() -> None:
    sm = Swift.prepare_model(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    want = inspect.signature(sm.base_model.forward)
    assert inspect.signature(sm.forward) == want
    assert list(inspect.signature(type(sm).forward).parameters)[1:] == list(want.parameters)
    assert isinstance(sm, SwiftModel) and type(sm).__name__ == "SwiftModel"
    again = SwiftModel(sm, {"other": LoRAConfig(r=2, target_modules=["v_proj"])})  # re-wrapping keeps it
    assert inspect.signature(again.forward) == want and type(again) is type(sm)


def test_trainer_evaluate_reports_eval_loss_without_label_names(tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    sm = Swift.prepare_model(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    data = [{"input_ids": X[i], "labels": X[i]} for i in range(4)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=sm, args=args, eval_dataset=data)
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_shim_imports_no_specific_tuner_module() -> None:
    tuners = SHIM.parent / "tuners"
    for path in sorted(SHIM.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(node.level, node.module)
                assert target in ("functuner.tuners", "functuner.tuners.base") or not target.startswith(
                    "functuner.tuners"
                ), f"{path.name} imports {target}"
                if target == "functuner.tuners":  # names, not submodules
                    for alias in node.names:
                        sub = tuners / alias.name
                        assert not sub.is_dir() and not sub.with_suffix(".py").exists(), f"{path.name}: {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("functuner.tuners."), f"{path.name} imports {alias.name}"


def _resolve(level: int, module: str | None) -> str:
    """The absolute name of a ``from <level dots><module> import`` inside ``functuner.shim``."""
    if level == 0:
        return module or ""
    package = ["functuner", "shim"][: 3 - level]
    return ".".join([*package, *([module] if module else [])])
