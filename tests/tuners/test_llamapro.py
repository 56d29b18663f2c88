"""LLaMA-Pro block expansion on a tiny Llama: the new blocks' init, KV-cache generation, SWIFT's interleaving, grads.

Parity with SWIFT's own LLaMAPro (keys, init and trained outputs, deactivation, loading and re-saving SWIFT's
files): row llamapro of tests/tuners/test_swift_parity.py.  The shim's form (real layers inserted, as ms-swift's
prepare_model): tests/shim/test_shim_restructure.py and tests/swift_interop/scenarios.py (case llamapro).
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import SMALL_LLAMA, tiny_bert, tiny_llama
from safetensors.torch import load_file

import functuner as ft
from functuner.core.routing import routed
from functuner.errors import ConfigError, ParamsMismatchError, TargetError
from functuner.io import checkpoint as ckpt
from functuner.io import keys
from functuner.tuners.llamapro import expansion_plan

FIX = pathlib.Path(__file__).parents[1] / "fixtures" / "tuners2"


def _swift_setup():
    model = tiny_llama(**SMALL_LLAMA)
    model.load_state_dict(load_file(FIX / "llamapro_base.safetensors"))
    with tempfile.TemporaryDirectory() as d:  # SWIFT's files, read by functuner's checkpoint reader
        (pathlib.Path(d) / "default").mkdir()
        shutil.copy(FIX / "llamapro_config.json", pathlib.Path(d) / "default" / "adapter_config.json")
        # SWIFT's keys: model.layers.1.*, model.layers.3.* (the expanded list's indices)
        shutil.copy(FIX / "llamapro_adapter.safetensors", pathlib.Path(d) / "default" / "adapter_model.safetensors")
        read = ckpt.read_adapter_dir(d)["default"]
    assert isinstance(read.config, ft.LLaMAProConfig)
    return model, read.config, load_file(FIX / "llamapro_outputs.safetensors"), read.state


def test_new_blocks_start_as_identity_copies_and_leave_the_model_alone():
    # (keys as SWIFT saves them, init / trained outputs, deactivation against SWIFT's recording:
    #  test_swift_parity.py, row llamapro)
    model, config, out, swift_adapter = _swift_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = ft.init(model, config, generator=0)
    assert torch.equal(p["model.layers.0.llamapro_default.self_attn.o_proj.weight"], torch.zeros(16, 16))
    assert torch.equal(p["model.layers.1.llamapro_default.mlp.down_proj.weight"], torch.zeros(16, 32))
    assert torch.equal(
        p["model.layers.1.llamapro_default.self_attn.q_proj.weight"], model.model.layers[1].self_attn.q_proj.weight
    )
    ft.apply(model, ft.TunerParams(swift_adapter, config), (out["ids"],))
    assert len(model.model.layers) == 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_kv_cache_generation_equals_recomputation():
    model, config, out, swift_adapter = _swift_setup()
    trained = ft.TunerParams(swift_adapter, config)
    with routed(ft.functional.bind_routes(model, trained)):
        cached = model.generate(
            out["ids"], max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        plain = model.generate(
            out["ids"],
            max_new_tokens=4,
            do_sample=False,
            use_cache=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    for a, b in zip(cached.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 24), new=st.integers(1, 24), groups=st.one_of(st.none(), st.integers(1, 24)))
def test_expansion_plan_is_swifts_interleaving(layers, new, groups):
    if layers % new or layers // (groups or new) == 0:
        with pytest.raises(ConfigError):
            expansion_plan(layers, new, groups)
        return
    plan = expansion_plan(layers, new, groups)
    stride = layers // (groups or new)
    expanded = []  # literal simulation: ("old", i) / ("new", i)
    for i in range(layers):
        expanded.append(("old", i))
        if (i + 1) % stride == 0:
            expanded.append(("new", i))
    assert [(b.new_index, b.source) for b in plan] == [(j, i) for j, (kind, i) in enumerate(expanded) if kind == "new"]
    assert [b.ordinal for b in plan] == list(range(len(plan)))


def test_grads_flow_only_to_new_blocks():
    model, config, out, swift_adapter = _swift_setup()
    trained = ft.TunerParams(swift_adapter, config)
    ids = out["ids"]

    def loss(params):
        return ft.apply(model, params, (ids,), {"labels": ids}).loss

    grads = torch.func.grad(loss)(trained)
    assert set(grads) == set(trained)
    assert all(g.abs().sum() > 0 for k, g in grads.items() if not k.endswith("layernorm.weight"))
    assert all(q.grad is None for q in model.parameters())


def test_bad_configs_raise_before_anything_changes():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="num_new_blocks"):
        ft.LLaMAProConfig(model_type="llama", num_new_blocks=0)
    with pytest.raises(ConfigError, match="model_type"):
        ft.LLaMAProConfig(model_type="bert", num_new_blocks=1)
    with pytest.raises(ConfigError, match="does not divide"):
        ft.init(model, ft.LLaMAProConfig(model_type="llama", num_new_blocks=3), generator=0)
    with pytest.raises(TargetError, match="model.layers"):
        ft.init(tiny_bert(), ft.LLaMAProConfig(model_type="llama", num_new_blocks=1), generator=0)
    with pytest.raises(ConfigError, match="lacks"):
        ft.init(
            model, ft.LLaMAProConfig(model_key_mapping={"module_list": "model.layers"}, num_new_blocks=1), generator=0
        )
    p = ft.init(model, ft.LLaMAProConfig(model_type="llama", num_new_blocks=1), generator=0)
    assert sorted(keys.to_swift_state_dict(p))[0].startswith("model.layers.2.")  # one block, after the last layer
    with pytest.raises(ParamsMismatchError, match="q_proj"):
        ft.validate(model, p.replace({"model.layers.1.llamapro_default.self_attn.q_proj.weight": torch.zeros(3, 3)}))
    with pytest.raises(ConfigError, match="no merged form"):
        ft.merge(model, p)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_saved_config_names_the_groups_used_as_swift_does(tmp_path: pathlib.Path) -> None:
    # ms-swift 4.6's LLaMAPro.prepare_model sets num_groups = num_new_blocks when it is None, so the
    # adapter_config.json it writes says 2, not null (compared with ms-swift's own file in
    # tests/swift_interop/scenarios.py, case "llamapro"); the config the caller built is not changed
    cfg = ft.LLaMAProConfig(model_type="llama", num_new_blocks=2)
    assert ft.init(tiny_llama(), cfg, generator=0).config.num_groups == 2 and cfg.num_groups is None
    ft.Swift.prepare_model(tiny_llama(), cfg).save_pretrained(str(tmp_path))
    assert '"num_groups": 2' in (tmp_path / "default" / "adapter_config.json").read_text()
    explicit = ft.LLaMAProConfig(model_type="llama", num_new_blocks=2, num_groups=1)
    assert ft.init(tiny_llama(), explicit, generator=0).config.num_groups == 1
