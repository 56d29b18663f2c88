"""SWIFT drop-in configs: ms-swift 4.6's fields, names and defaults; required fields checked at init.

* every SWIFT config class builds with its defaults (``AdapterConfig()`` as in SWIFT) and
  has exactly ms-swift 4.6's fields (read from ``swift/tuners/*.py`` of the ms-swift 4.6 wheel);
* a required field left unset fails at ``functuner.init`` / ``Swift.prepare_model`` with the
  message construction used to give;
* ``adapter_config.json`` files ms-swift wrote (``tests/fixtures``) are written back byte for byte;
* ``model_key_mapping`` survives a LoRA round trip (and re-saving an ms-swift LoRA checkpoint);
* ``lorap_lr_ratio`` defaults to 16 and ``create_optimizer_param_groups`` gives SWIFT's LoRA+ groups.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
from models import tiny_bert, tiny_llama, tiny_toy, tiny_vit

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners import REGISTRY

FIX = pathlib.Path(__file__).resolve().parents[2] / "fixtures"

# ms-swift 4.6's dataclass fields per swift_type (SwiftConfig's own: swift_type, model_key_mapping)
_BASE = {"swift_type", "model_key_mapping"}
SWIFT_FIELDS: dict[str, set[str]] = {
    "ADAPTER": {"dim", "target_modules", "hidden_pos", "method_name", "adapter_length", "act_layer"},
    "PROMPT": {
        "dim",
        "target_modules",
        "embedding_pos",
        "attention_mask_pos",
        "attention_mask_value",
        "prompt_length",
        "attach_front",
        "extract_embedding",
    },
    "SIDE": {"dim", "target_modules", "side_module_name", "source_hidden_pos", "target_hidden_pos"},
    "part": {"target_modules"},
    "neftune": {"noise_alpha"},
    "LLAMAPRO": {"model_type", "num_new_blocks", "num_groups"},
    "reft": {"model_type", "layer_key", "layers", "r", "intervention_type", "args"},
    "RESTUNING": {
        "dims",
        "root_modules",
        "root_modules_hook",
        "stem_modules",
        "stem_modules_hook",
        "target_modules",
        "target_modules_hook",
        "target_hidden_pos",
        "tuner_cfg",
        "use_upsample",
        "upsample_out_channels",
        "zero_init_last",
        "use_bypass",
    },
    "SCETuning": {"dims", "target_modules", "hint_modules", "tuner_mode", "tuner_op", "down_ratio"},
}
# SWIFT's LoRAConfig extras over PEFT's LoraConfig, and LongLoRA's over LoRA
SWIFT_LORA_EXTRAS = {"use_qa_lora", "use_merged_linear", "enable_lora", "lora_dtype", "lorap_lr_ratio", "lorap_emb_lr"}
SWIFT_LONGLORA_EXTRAS = {"embedder_and_normalizer", "model_type", "group_size_ratio"}

SWIFT_TYPES = [*SWIFT_FIELDS, "LORA", "longlora"]


@pytest.mark.parametrize("swift_type", SWIFT_TYPES)
def test_every_swift_config_builds_with_its_defaults(swift_type: str) -> None:
    cls = REGISTRY[swift_type].config_cls
    cfg = cls()
    data = cfg.to_dict()
    assert data["swift_type"] == swift_type and data["model_key_mapping"] is None
    if swift_type in SWIFT_FIELDS:
        assert set(data) == SWIFT_FIELDS[swift_type] | _BASE
    else:
        assert SWIFT_LORA_EXTRAS | _BASE <= set(data)
        if swift_type == "longlora":
            assert SWIFT_LONGLORA_EXTRAS <= set(data) and "use_flash_attn" not in data  # not a 4.6 field
    assert cls(**json.loads(json.dumps(data))) == cfg  # building from its own JSON needs no required field either


def test_swift_defaults_of_lora_and_friends() -> None:
    lora = ft.LoRAConfig()
    assert lora.lorap_lr_ratio == 16.0 and lora.lorap_emb_lr == 1e-6 and lora.model_key_mapping is None
    assert ft.LongLoRAConfig().lorap_lr_ratio == 16.0
    assert ft.LongLoRAConfig().embedder_and_normalizer == ("embed", "norm")
    assert ft.LongLoRAConfig().peft_type is None  # SWIFT's LongLoRAConfig never runs PEFT's __post_init__
    assert ft.AdapterConfig().adapter_length == 128 and ft.PromptConfig().prompt_length == 16
    assert ft.ReftConfig().to_dict()["args"] == {}  # SWIFT's __post_init__ turns None into {} too
    assert ft.ResTuningConfig().target_hidden_pos == 0  # SWIFT's __post_init__ turns None into 0 too
    assert ft.LLaMAProConfig(num_new_blocks=2).num_groups is None  # SWIFT fills it in only in prepare_model


@pytest.mark.parametrize(
    ("config", "model", "message"),
    [
        (ft.AdapterConfig(target_modules=["mlp"]), tiny_llama, "AdapterConfig.dim must be a positive int"),
        (ft.PromptConfig(target_modules=r".*layer\.\d+$", embedding_pos=0), tiny_bert, "PromptConfig.dim must be"),
        (ft.PromptConfig(dim=32, target_modules=r".*layer\.\d+$"), tiny_bert, "PromptConfig.embedding_pos must be"),
        (ft.SideConfig(target_modules="backbone"), tiny_toy, "SideConfig.dim must be a positive int"),
        (ft.SideConfig(dim=32), tiny_toy, "SideConfig.target_modules must be a regex string"),
        (ft.PartConfig(), tiny_bert, "PartConfig.target_modules must be a regex string"),
        (ft.LLaMAProConfig(model_type="llama"), tiny_llama, "num_new_blocks must be a positive integer"),
        (ft.LLaMAProConfig(num_new_blocks=2), tiny_llama, "is not one LLaMA-Pro knows"),
        (
            ft.ResTuningConfig(dims=16, target_modules="x", tuner_cfg="res_adapter"),
            tiny_vit,
            "stem_modules is required",
        ),
        (ft.ResTuningConfig(dims=16, stem_modules="x", target_modules="y"), tiny_vit, "tuner_cfg is required"),
        (ft.SCETuningConfig(dims=16), tiny_vit, "target_modules is required"),
        (ft.SCETuningConfig(target_modules="x"), tiny_vit, "dims must be a positive int"),
    ],
)
def test_unset_required_fields_fail_at_init_with_the_old_message(config, model, message) -> None:
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        ft.init(m, config, generator=0)
    with pytest.raises(ConfigError, match=message):
        ft.Swift.prepare_model(m, config)
    assert all((before[k] == v).all() for k, v in m.state_dict().items()) and set(before) == set(m.state_dict())


@pytest.mark.parametrize("kwargs", [dict(dim=0), dict(adapter_length=0), dict(act_layer="nope"), dict(hidden_pos=1.5)])
def test_a_bad_value_that_is_set_still_fails_at_construction(kwargs) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ft.AdapterConfig(**kwargs)


_SWIFT_WRITTEN = sorted(
    p for p in (FIX / "tuners").glob("*/*/adapter_config.json")
)  # Adapter, Prompt, Side, Part, NEFTune, as ms-swift 4.6 wrote them


@pytest.mark.parametrize("path", _SWIFT_WRITTEN, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_swift_written_configs_round_trip_byte_for_byte(path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    cfg = ft.TunerConfig.from_pretrained(str(path.parent))
    cfg.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_config.json").read_bytes() == path.read_bytes()


def test_lora_model_key_mapping_round_trips(tmp_path: pathlib.Path) -> None:
    mapping = {"module_list": "model.layers", "o_proj": "model.layers.{}.self_attn.o_proj"}
    cfg = ft.LoRAConfig(r=2, target_modules=["q_proj"], model_key_mapping=mapping)
    cfg.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["model_key_mapping"] == mapping
    back = ft.TunerConfig.from_pretrained(str(tmp_path))
    assert back == cfg and back.model_key_mapping == mapping
    long = ft.LongLoRAConfig(r=2, target_modules=["q_proj"], model_key_mapping=mapping)
    long.save_pretrained(str(tmp_path / "long"))
    assert ft.TunerConfig.from_pretrained(str(tmp_path / "long")).model_key_mapping == mapping


def test_resaving_an_ms_swift_lora_checkpoint_keeps_model_key_mapping(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIX / "swift" / "llama_two", src)
    mapping = {"module_list": "model.layers", "attention": "model.layers.{}.self_attn"}
    path = src / "default" / "adapter_config.json"
    data = json.loads(path.read_text())
    data["model_key_mapping"] = mapping
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    sm = ft.Swift.from_pretrained(tiny_llama(), str(src), adapter_name="default")
    assert sm.adapters["default"].config.model_key_mapping == mapping
    sm.save_pretrained(str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "default" / "adapter_config.json").read_text())
    assert saved["model_key_mapping"] == mapping


def _groups(cfg: ft.LoRAConfig) -> list[dict]:
    sm = ft.Swift.prepare_model(tiny_llama(), cfg)
    return sm.create_optimizer_param_groups(lr=1e-3, weight_decay=0.1)


def test_default_lora_gets_swifts_lora_plus_groups() -> None:
    # SWIFT: lorap_lr_ratio=16 by default, so its optimizer callback always returns the four LoRA+ groups
    groups = _groups(ft.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert [g.get("lr") for g in groups] == [1e-3, 1e-6, 1e-3 * 16, 1e-3 * 16, None, None]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.1, 0.0, 0.1, 0.0]
    assert len(groups[0]["params"]) == 4 and len(groups[2]["params"]) == 4  # lora_A / lora_B of 2 x 2 modules


def test_lora_plus_off_with_ratio_none() -> None:
    groups = _groups(ft.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], lorap_lr_ratio=None))
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and "lr" not in groups[0]
    assert len(groups[0]["params"]) == 8
