"""Full-weight checkpoints of GaLore / Q-GaLore / LISA: save, read, merge (= replace), load, shim, CLI, refusals.

Real files on disk, real safetensors; every refusal is a CheckpointError naming the file and the key,
raised before the model (or the previous checkpoint directory) changes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

import functuner as ft
from functuner.cli.main import main as cli
from functuner.errors import CheckpointError
from functuner.io.full_weights import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME
from functuner.optim import (
    GaLoreConfig,
    LISACallback,
    LISAConfig,
    apply_updates,
    create_galore_optimizer,
    galore_adamw,
    galore_targets,
    load_checkpoint,
    merge_checkpoint,
    quantize_model,
    read_checkpoint,
    save_checkpoint,
)
from functuner.shim.swift import Swift

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _galore_trained() -> tuple[torch.nn.Module, dict[str, torch.Tensor], GaLoreConfig]:
    model = tiny_llama()
    cfg = GaLoreConfig(rank=4, update_proj_gap=2, target_modules=TARGETS)
    targets = galore_targets(model, cfg)
    params = {n: t for n, t in _weights(model).items() if n in targets}  # train only the GaLore targets
    tx = galore_adamw(1e-2, config=cfg, targets=targets)
    state = tx.init(params)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        grads = torch.func.grad(
            lambda p: torch.func.functional_call(model, p, (), {"input_ids": ids, "labels": ids}, strict=False).loss
        )(params)
        updates, state = tx.update(grads, state, params)
        params = apply_updates(params, updates)
    return model, params, cfg


def test_galore_round_trip_functional_and_sharded(tmp_path: Path) -> None:
    model, trained, cfg = _galore_trained()
    base = _weights(model)
    out = save_checkpoint(trained, tmp_path / "ck", cfg, base=base)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = read_checkpoint(out)
    assert loaded.config == cfg and loaded.checkpoint.method == "galore"
    assert set(loaded.checkpoint.tensors) == set(trained)  # exactly the changed weights
    merged = merge_checkpoint(base, loaded)  # functional: merge = replace
    assert all(torch.equal(merged[n], trained[n]) for n in trained)
    assert all(torch.equal(merged[n], base[n]) for n in base if n not in trained)
    assert all(torch.equal(base[n], t) for n, t in _weights(model).items())  # the input is untouched

    # sharded: one tensor of 4 KiB per shard
    sharded = save_checkpoint(trained, tmp_path / "sh", cfg, base=base, max_shard_size="4KiB")
    index = json.loads((sharded / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == len(trained) and shards[0] == f"model-00001-of-{len(trained):05d}.safetensors"
    again = read_checkpoint(sharded).checkpoint
    assert all(torch.equal(again.tensors[n], trained[n]) for n in trained)


def test_lisa_eager_checkpoint_loads_into_a_fresh_model(tmp_path: Path) -> None:
    base = tiny_llama().train()
    model = copy.deepcopy(base)
    cb = LISACallback(model, LISAConfig(n_layers=1, step_interval=5, seed=3))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    cfg = LISAConfig(n_layers=1, step_interval=5, seed=3)
    out = save_checkpoint(model, tmp_path / "lisa", cfg, base=base)
    saved = set(read_checkpoint(out).checkpoint.tensors)
    (layer,) = cb.active
    assert any(n.startswith(f"model.layers.{layer}.") for n in saved)
    assert not any(n.startswith(f"model.layers.{1 - layer}.") for n in saved)  # the frozen layer did not change
    assert read_checkpoint(out).config == cfg

    fresh = copy.deepcopy(base)
    assert set(load_checkpoint(fresh, out)) == saved
    want = _weights(model)
    assert all(torch.equal(p, want[n]) for n, p in fresh.named_parameters())


def test_load_through_the_shim_and_q_galore(tmp_path: Path) -> None:
    model, trained, cfg = _galore_trained()
    out = save_checkpoint(trained, tmp_path / "ck", cfg, base=_weights(model))
    sm = Swift.prepare_model(copy.deepcopy(model), ft.LoRAConfig(r=2, target_modules=["k_proj"]))
    load_checkpoint(sm, out)
    inner = dict(sm.model.named_parameters())
    assert all(torch.equal(inner[n], trained[n]) for n in trained)
    assert "default" in sm.adapters  # the adapter stays
    Swift.merge(sm)
    with pytest.raises(CheckpointError, match="merged adapters"):
        load_checkpoint(sm, out)

    # Q-GaLore: int8 layers are saved dequantized and re-quantized on load
    q = copy.deepcopy(model)
    qcfg = GaLoreConfig(rank=4, target_modules=TARGETS, quantize=True)
    quantize_model(q, qcfg)
    opt = create_galore_optimizer(q, qcfg, lr=1e-2, generator=0)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    q(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    qout = save_checkpoint(q, tmp_path / "q", qcfg, base=model)
    qck = read_checkpoint(qout)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert qck.config == qcfg and qck.checkpoint.tensors[name].dtype == torch.float32
    assert torch.equal(qck.checkpoint.tensors[name], q.get_submodule(name[: -len(".weight")]).dequantized_weight())
    q2 = copy.deepcopy(model)
    quantize_model(q2, qcfg)
    load_checkpoint(q2, qout)
    assert torch.equal(
        q2.get_submodule(name[: -len(".weight")]).weight, q.get_submodule(name[: -len(".weight")]).weight
    )


def test_cli_inspect_shows_a_full_weight_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, trained, cfg = _galore_trained()
    out = save_checkpoint(trained, tmp_path / "ck", cfg, base=_weights(model))
    assert cli(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "full-weight checkpoint (galore)" in text and "rank=4" in text and "F32" in text
    assert cli(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "galore" and data["num_tensors"] == len(trained)
    assert data["tensors"]["model.layers.0.self_attn.q_proj.weight"] == [32, 32]


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_bad_checkpoints_are_refused_naming_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, trained, cfg = _galore_trained()
    base = _weights(model)
    good = save_checkpoint(trained, tmp_path / "good", cfg, base=base)
    key = "model.layers.0.self_attn.q_proj.weight"

    def variant(name: str) -> Path:
        d = tmp_path / name
        save_checkpoint(trained, d, cfg, base=base)
        return d

    d = variant("nan")
    tensors = load_file(str(d / WEIGHTS_NAME))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(d / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*{key}.*NaN"):
        read_checkpoint(d)
    assert cli(["inspect", str(d)]) == 1 and "NaN" in capsys.readouterr().err

    d = variant("key")
    _edit_json(d / CONFIG_NAME, surprise=1)
    with pytest.raises(CheckpointError, match=rf"{CONFIG_NAME}: unknown key 'surprise'"):
        read_checkpoint(d)

    d = variant("field")
    data = json.loads((d / CONFIG_NAME).read_text())
    _edit_json(d / CONFIG_NAME, method_config={**data["method_config"], "rnak": 4})
    with pytest.raises(CheckpointError, match="method_config key 'rnak'"):
        read_checkpoint(d)

    d = variant("method")
    _edit_json(d / CONFIG_NAME, method="dora")
    with pytest.raises(CheckpointError, match="key 'method' is 'dora'"):
        read_checkpoint(d)

    d = variant("count")
    _edit_json(d / CONFIG_NAME, num_tensors=1)
    with pytest.raises(CheckpointError, match="num_tensors"):
        read_checkpoint(d)

    # sharded: a shard holding a key the index does not map to it, and a missing shard
    d = save_checkpoint(trained, tmp_path / "sh", cfg, base=base, max_shard_size=1)
    index = json.loads((d / INDEX_NAME).read_text())
    first = index["weight_map"][key]
    other = next(f for k, f in index["weight_map"].items() if f != first)
    extra = load_file(str(d / other))
    extra[key] = torch.zeros(32, 32)
    save_file(extra, str(d / other))
    with pytest.raises(CheckpointError, match=rf"{other}: holds key '{key}'"):
        read_checkpoint(d)
    (d / other).unlink()
    with pytest.raises(CheckpointError, match=rf"{other}: missing"):
        read_checkpoint(d)

    # the model side: unknown keys and shapes are refused before anything is copied
    small = tiny_llama(hidden_size=16, intermediate_size=32)
    before = _weights(small)
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(small, good)
    assert all(torch.equal(p, before[n]) for n, p in small.named_parameters())
    with pytest.raises(CheckpointError, match=r"good: key 'model\.layers\.0\.mlp\.up_proj\.weight' \(6 unknown\)"):
        merge_checkpoint({"lm_head.weight": base["lm_head.weight"]}, good)

    # atomic save: a failing save (NaN weights) leaves the previous checkpoint as it was
    bad = {**trained, key: torch.full((32, 32), float("nan"))}
    with pytest.raises(CheckpointError, match="NaN"):
        save_checkpoint(bad, good, cfg)
    assert set(read_checkpoint(good).checkpoint.tensors) == set(trained)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(CheckpointError, match="nothing changed"):
        save_checkpoint(base, tmp_path / "same", cfg, base=base)
