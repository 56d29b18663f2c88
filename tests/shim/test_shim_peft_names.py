"""PEFT's model-level names on SwiftModel behave as on ``peft.PeftModel`` for the same tiny model.

Oracle: a real ``PeftModel`` built from the same adapter values (saved by the
shim in PEFT's layout and loaded by peft), driven through the same calls:
counts, printed lines, active adapters, trainability and outputs must match.
Every name of transformers' ``PeftAdapterMixin`` is defined by the shim (never
forwarded to the wrapped model's own PEFT integration).
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_llama
from transformers.integrations.peft import PeftAdapterMixin

from functuner import LoRAConfig, Swift, SwiftModel
from functuner.errors import AdapterNameError, ConfigError
from functuner.shim.peft_names import PEFT_MIXIN_NAMES, PeftNames

X = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
CFG = {"r": 4, "target_modules": ["q_proj", "v_proj"]}


def _logits(m: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(X).logits


def _pair(tmp_path: Path) -> tuple[SwiftModel, peft.PeftModel]:
    torch.manual_seed(0)
    sm = Swift.prepare_model(tiny_llama(), LoRAConfig(**CFG, init_lora_weights=False))
    sm.save_pretrained(tmp_path / "a", peft_format=True)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), is_trainable=True)
    assert torch.allclose(_logits(sm), _logits(pm), atol=1e-6)
    return sm, pm


def test_every_transformers_peft_name_is_defined_not_forwarded() -> None:
    mixin = {n for n in vars(PeftAdapterMixin) if not n.startswith("__")}
    assert mixin == set(PEFT_MIXIN_NAMES)
    for name in mixin:
        assert any(name in vars(c) for c in SwiftModel.__mro__ if issubclass(c, PeftNames)), name
    sm = Swift.prepare_model(tiny_llama(), LoRAConfig(**CFG))
    assert sm._hf_peft_config_loaded is False
    for name in ("enable_peft_hotswap", "_prepare_peft_hotswap_kwargs", "_dispatch_accelerate_model"):
        with pytest.raises(ConfigError, match=name):
            getattr(sm, name)()
    with pytest.raises(ConfigError, match="PEFT LoraConfig"):
        sm.add_adapter("p", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert not any(type(m).__module__.startswith("peft") for m in sm.modules())


def test_counts_and_printed_line_match_peft(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sm, pm = _pair(tmp_path)
    assert sm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    pm.print_trainable_parameters()
    theirs = capsys.readouterr().out
    sm.print_trainable_parameters()
    assert capsys.readouterr().out == theirs


def test_add_set_load_delete_adapters_as_peft(tmp_path: Path) -> None:
    sm, pm = _pair(tmp_path)
    sm.add_adapter("b", LoRAConfig(r=2, target_modules=["o_proj"]))
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules=["o_proj"]))
    assert sm.active_adapter == pm.active_adapter == "default"  # added, not activated
    assert sm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()  # and frozen
    sm.set_adapter("b")
    pm.set_adapter("b")
    assert sm.active_adapter == pm.active_adapter == "b" and sm.active_adapters == set(pm.active_adapters)
    assert sm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    sm.set_adapter("default", inference_mode=True)
    pm.set_adapter("default", inference_mode=True)
    assert sm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()

    # load_adapter: a PEFT directory under a new name, inactive, frozen unless is_trainable
    torch.manual_seed(1)
    other = Swift.prepare_model(tiny_llama(), LoRAConfig(**CFG, init_lora_weights=False))
    other.save_pretrained(tmp_path / "c", peft_format=True)
    sm.load_adapter(str(tmp_path / "c"), "c")
    pm.load_adapter(str(tmp_path / "c"), "c")
    assert sm.active_adapter == pm.active_adapter == "default"
    assert sm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    sm.set_adapter("c")
    pm.set_adapter("c")
    assert torch.allclose(_logits(sm), _logits(pm), atol=1e-6)
    assert torch.allclose(_logits(sm), _logits(other), atol=1e-6)
    with pytest.raises(AdapterNameError, match="already exists"):
        sm.load_adapter(str(tmp_path / "c"), "c")

    # delete_adapter: deleting the active one activates the first remaining (PEFT warns too)
    with pytest.warns(UserWarning, match="activating 'default'"):
        sm.delete_adapter("c")
    with pytest.warns(UserWarning, match="Adapter c was active which is now deleted"):
        pm.delete_adapter("c")
    assert sorted(sm.adapters) == sorted(pm.peft_config) and sm.active_adapters == set(pm.active_adapters)
    assert torch.allclose(_logits(sm), _logits(pm), atol=1e-6)


def test_disable_base_model_merge_and_unload_as_peft(tmp_path: Path) -> None:
    sm, pm = _pair(tmp_path)
    base = _logits(tiny_llama())
    with sm.disable_adapter(), pm.disable_adapter():
        assert torch.equal(_logits(sm), base) and torch.allclose(_logits(pm), base, atol=1e-6)
    sm.disable_adapters()
    assert torch.equal(_logits(sm), base)
    sm.enable_adapters()
    assert sm.active_adapters == {"default"} and torch.allclose(_logits(sm), _logits(pm), atol=1e-6)
    assert type(sm.get_base_model()) is type(pm.get_base_model())
    assert sm.get_base_model() is sm.model

    theirs_sd = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(pm).items()}
    mine_sd = sm.get_adapter_state_dict("default")
    assert sorted(mine_sd) == sorted(theirs_sd)
    assert all(torch.equal(mine_sd[k], theirs_sd[k]) for k in mine_sd)

    want = _logits(pm)
    merged_pm = pm.merge_and_unload()
    merged_sm = sm.merge_and_unload()
    assert type(merged_sm) is type(merged_pm) and merged_sm is sm.model
    assert torch.allclose(_logits(merged_sm), _logits(merged_pm), atol=1e-5)
    assert torch.allclose(_logits(merged_sm), want, atol=1e-5)


def test_unload_gives_back_the_base_model(tmp_path: Path) -> None:
    sm, pm = _pair(tmp_path)
    base = _logits(tiny_llama())
    unloaded = sm.unload()
    assert type(unloaded) is type(pm.unload())
    assert torch.equal(_logits(unloaded), base)
    assert not sm.adapters and [n for n, _ in unloaded.named_parameters()] == [
        n for n, _ in tiny_llama().named_parameters()
    ]


def test_to_peft_config_is_lossless(tmp_path: Path) -> None:
    from functuner.shim.peft_names import to_peft_config

    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, use_rslora=True)
    pc = to_peft_config(cfg)
    assert isinstance(pc, peft.LoraConfig)
    torch.manual_seed(0)
    sm = Swift.prepare_model(tiny_llama(), {"default": LoRAConfig(**{**cfg.__dict__, "init_lora_weights": False})})
    sm.eval()
    pm = peft.get_peft_model(tiny_llama(), pc).eval()
    peft.set_peft_model_state_dict(pm, sm.state_dict(peft_format=True))
    assert torch.allclose(_logits(sm), _logits(pm), atol=1e-6)
    sm.save_pretrained(tmp_path, peft_format=True)  # the same JSON PEFT would write for that config
    import json

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = pc.to_dict()
    assert {k: saved[k] for k in ("r", "lora_alpha", "use_rslora", "lora_dropout")} == {
        k: theirs[k] for k in ("r", "lora_alpha", "use_rslora", "lora_dropout")
    }
    assert sorted(saved["target_modules"]) == sorted(theirs["target_modules"])


def test_add_adapter_leaves_other_threads_active_sets_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setenv("USE_UNIQUE_THREAD", "0")
    sm = Swift.prepare_model(
        tiny_llama(), {"a": LoRAConfig(r=2, target_modules=["q_proj"]), "b": LoRAConfig(r=2, target_modules=["o_proj"])}
    )
    ready, done = threading.Event(), threading.Event()
    seen: list[set[str]] = []

    def other() -> None:
        sm.set_active_adapters(["b"])  # this thread's own choice
        ready.set()
        done.wait(10)
        seen.append(sm.active_adapters)

    t = threading.Thread(target=other)
    t.start()
    ready.wait(10)
    sm.set_active_adapters(["a"])
    sm.add_adapter("c", LoRAConfig(r=2, target_modules=["v_proj"]))
    done.set()
    t.join()
    assert sm.active_adapters == {"a"} and seen == [{"b"}]
