"""Parity with the real ms-swift 4.6, one table row per recorded fixture case.

Every row runs the same checks against what ms-swift itself recorded (``tests/fixtures/make_tuner_fixtures.py``
and ``make_tuner_fixtures2.py`` ran SWIFT's own ``Swift.prepare_model`` / ``save_pretrained``):

* the rebuilt base model gives SWIFT's base output;
* functuner's output with SWIFT's trained tensors is SWIFT's output, and deactivation is exact (the base
  model's own output, bitwise, in this process), reactivation gives the same output again;
* ``init`` gives SWIFT's keys and shapes (and, where SWIFT's tuner starts as the identity, the base output);
* a checkpoint written by functuner has the keys, tensors and ``adapter_config.json`` SWIFT writes, and
  reads back to the same params;
* the shim loads SWIFT's own directory, and SWIFT's tensors through ``prepare_model`` + ``load_state_dict``,
  with the same outputs, exact deactivation, SWIFT's state-dict keys, and a ``save_pretrained`` round trip.

SWIFT's outputs were recorded on another CPU: they are compared within each row's tolerance
(``tol``); comparisons made inside this process stay bitwise.  Tuner-specific behaviour (grads, bad
configs, merge, composition toggles...) stays in each tuner's own test file.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from _swift_tuner_fixtures import SWIFT_OUTPUT_TOL, load_case
from models import RESTUNING_VIT, SMALL_LLAMA, logits, tiny_bert, tiny_llama, tiny_toy, tiny_unet, tiny_vit
from safetensors.torch import load_file, save_file
from torch import nn

import functuner as ft
from functuner.io import checkpoint as ckpt
from functuner.io.keys import to_swift_state_dict

FIX = pathlib.Path(__file__).parents[1] / "fixtures"
_spec = importlib.util.spec_from_file_location("make_tuner_fixtures2", FIX / "make_tuner_fixtures2.py")
assert _spec is not None and _spec.loader is not None
_fixtures2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures2)  # RESTUNING_4D: the Res-Tuning config SWIFT's side used

SWIFT_JSON = "adapter_config.json as SWIFT wrote it"  # the row's config is the one SWIFT saved beside its tensors
#: tuners2 fixtures: recorded on another CPU too; the tolerances these comparisons have always used.
TOL_1E5 = {"rtol": 1e-5, "atol": 1e-6}
TOL_1E6 = {"rtol": 1e-6, "atol": 1e-6}


def _with_recorded_base(build: Callable[[], nn.Module], fixture: str) -> Callable[[], nn.Module]:
    """``build`` with the base weights SWIFT's side saved in ``fixture`` (``base::<name>`` keys or a whole file)."""

    def make() -> nn.Module:
        model = build()
        data = load_file(FIX / fixture)
        base = {k[len("base::") :]: v for k, v in data.items() if k.startswith("base::")} or data
        model.load_state_dict(base)
        return model

    return make


class Row(NamedTuple):
    fixture: str  # under tests/fixtures: tuners/<case> (a SWIFT save_pretrained folder) or a tuners2 file[:mode]
    build: Callable[[], nn.Module]  # the base model SWIFT wrapped (same seed, or SWIFT's recorded base weights)
    config: Any  # {adapter name: functuner config}, or SWIFT_JSON
    tol: dict[str, float]  # functuner's outputs vs SWIFT's recorded ones (recorded on another CPU)
    starts_as_base: bool = False  # SWIFT's init leaves the output unchanged (checked bitwise, in process)


ROWS = [
    Row("tuners/adapter_llama", tiny_llama, SWIFT_JSON, SWIFT_OUTPUT_TOL),
    Row("tuners/adapter_bert_method", tiny_bert, SWIFT_JSON, SWIFT_OUTPUT_TOL),
    Row("tuners/prompt_bert", tiny_bert, SWIFT_JSON, SWIFT_OUTPUT_TOL),
    Row("tuners/prompt_vit_extract", tiny_vit, SWIFT_JSON, SWIFT_OUTPUT_TOL),
    Row("tuners/side_vit_mlp", tiny_vit, SWIFT_JSON, SWIFT_OUTPUT_TOL),
    Row("tuners/side_toy_fcn4", tiny_toy, SWIFT_JSON, SWIFT_OUTPUT_TOL),
    Row("tuners/part_bert", tiny_bert, SWIFT_JSON, SWIFT_OUTPUT_TOL, starts_as_base=True),
    Row("tuners/neftune_llama", tiny_llama, SWIFT_JSON, SWIFT_OUTPUT_TOL),
    Row("tuners/compose_bert", tiny_bert, SWIFT_JSON, SWIFT_OUTPUT_TOL),
    Row(
        "tuners2/scetuning.safetensors:decoder",
        _with_recorded_base(tiny_unet, "tuners2/scetuning.safetensors"),
        {
            "default": ft.SCETuningConfig(
                dims=[8, 8], target_modules=["up.0", "up.1"], tuner_mode="decoder", down_ratio=0.5
            )
        },
        TOL_1E5,
        starts_as_base=True,  # ln2 = 0
    ),
    Row(
        "tuners2/scetuning.safetensors:encoder",
        _with_recorded_base(tiny_unet, "tuners2/scetuning.safetensors"),
        {"default": ft.SCETuningConfig(dims=8, target_modules="down", tuner_mode="encoder", down_ratio=1.0)},
        TOL_1E5,
        starts_as_base=True,
    ),
    Row(
        "tuners2/restuning.safetensors",
        _with_recorded_base(functools.partial(tiny_vit, **RESTUNING_VIT), "tuners2/restuning.safetensors"),
        SWIFT_JSON,
        TOL_1E5,
    ),
    Row(
        "tuners2/restuning4d.safetensors",
        _with_recorded_base(tiny_unet, "tuners2/restuning4d.safetensors"),
        {"default": ft.ResTuningConfig(**_fixtures2.RESTUNING_4D)},
        TOL_1E5,
    ),
    Row(
        "tuners2/llamapro",
        _with_recorded_base(functools.partial(tiny_llama, **SMALL_LLAMA), "tuners2/llamapro_base.safetensors"),
        SWIFT_JSON,
        TOL_1E6,
        starts_as_base=True,
    ),
]


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What SWIFT's side recorded for one row, in one shape for every fixture layout."""

    args: tuple[torch.Tensor, ...]
    base: torch.Tensor | None  # SWIFT's base model output, where recorded
    output: torch.Tensor  # SWIFT's output with its (trained) adapters active
    init_output: torch.Tensor | None  # SWIFT's output right after prepare_model, where recorded
    swift_state: dict[str, dict[str, torch.Tensor]]  # adapter -> tensors under SWIFT's on-disk names
    swift_json: dict[str, dict[str, Any] | None]  # adapter -> adapter_config.json as SWIFT wrote it (None: not kept)
    configs: dict[str, Any]  # adapter -> functuner config
    folder: str  # a directory in SWIFT's save_pretrained layout holding SWIFT's files
    train: bool = False
    noise_seed: int | None = None


def _write_swift_dir(root: pathlib.Path, configs: dict[str, Any], state: dict[str, dict[str, torch.Tensor]]) -> str:
    for name, cfg in configs.items():
        (root / name).mkdir(parents=True)
        js = cfg if isinstance(cfg, dict) else ckpt.config_to_json(cfg)
        (root / name / "adapter_config.json").write_text(json.dumps(js))
        save_file({k: v.contiguous() for k, v in state[name].items()}, root / name / "adapter_model.safetensors")
    return str(root)


def recorded(row: Row, model: nn.Module, tmp: pathlib.Path) -> Recorded:
    """Load ``row``'s fixture; for a ``tuners/`` case also check ``model`` is the base model SWIFT used."""
    if row.fixture.startswith("tuners/"):
        case = load_case(row.fixture.split("/", 1)[1], model)  # checks the rebuilt model's checksum
        args = tuple(case.io[f"input_{i}"] for i in range(sum(k.startswith("input_") for k in case.io)))
        seed = case.meta.get("noise_seed", "None")
        return Recorded(
            args=args,
            base=case.io["base_output"],
            output=case.io["output"],
            init_output=None,
            swift_state={n: a.state for n, a in case.adapters.items()},
            swift_json={n: a.config for n, a in case.adapters.items()},
            configs={n: ckpt.config_from_json(a.config) for n, a in case.adapters.items()},
            folder=case.folder,
            train=case.meta.get("train") == "True",
            noise_seed=None if seed == "None" else int(seed),
        )
    if row.fixture == "tuners2/llamapro":
        out = load_file(FIX / "tuners2" / "llamapro_outputs.safetensors")
        swift_json = json.loads((FIX / "tuners2" / "llamapro_config.json").read_text())
        state = {"default": load_file(FIX / "tuners2" / "llamapro_adapter.safetensors")}
        configs = {"default": ckpt.config_from_json(swift_json)}
        return Recorded(
            (out["ids"],),
            out["base_out"],
            out["tuned_out"],
            out["init_out"],
            state,
            {"default": swift_json},
            configs,
            _write_swift_dir(tmp / "swift", {"default": swift_json}, state),
        )
    file, _, mode = row.fixture.partition(":")
    data = load_file(FIX / file)
    prefix = f"{mode}::" if mode else "adapter::"
    state = {"default": {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}}
    if row.config == SWIFT_JSON:
        swift_json: dict[str, Any] | None = json.loads((FIX / "tuners2" / "restuning_config.json").read_text())
        configs = {"default": ckpt.config_from_json(swift_json)}
    else:
        swift_json, configs = None, row.config
    return Recorded(
        (data["x"],),
        data.get("base_out"),
        data[f"{mode}_tuned_out" if mode else "tuned_out"],
        data.get(f"{mode}_init_out" if mode else "init_out"),
        state,
        {"default": swift_json},
        configs,
        _write_swift_dir(tmp / "swift", {"default": swift_json or configs["default"]}, state),
    )


def swift_params(rec: Recorded) -> list[ft.TunerParams]:
    """SWIFT's tensors as functuner params, read from SWIFT's directory by functuner's reader."""
    read = ckpt.read_adapter_dir(rec.folder)
    assert set(read) == set(rec.configs)
    return [ft.TunerParams(read[n].state, read[n].config, n) for n in rec.configs]


def run(model: nn.Module, rec: Recorded, params: Any) -> torch.Tensor:
    gen = None if rec.noise_seed is None else torch.Generator().manual_seed(rec.noise_seed)
    return logits(ft.apply(model, params, rec.args, generator=gen))


def ids(row: Row) -> str:
    return row.fixture.split("/", 1)[1].replace(".safetensors", "")


parity = pytest.mark.parametrize("row", ROWS, ids=ids)
# restuning4d's fixture holds SWIFT's base weights (the model is loaded from them) but no base output, so
# there is no recorded base output to compare the rebuilt model with; every other row has one
WITH_BASE_OUTPUT = [row for row in ROWS if ids(row) != "restuning4d"]


@pytest.mark.parametrize("row", WITH_BASE_OUTPUT, ids=ids)
def test_rebuilt_base_model_gives_swifts_base_output(row, tmp_path):
    model = row.build()
    rec = recorded(row, model, tmp_path)
    assert rec.base is not None, f"{row.fixture} records no base output; list it outside WITH_BASE_OUTPUT"
    torch.testing.assert_close(logits(model(*rec.args)), rec.base, **row.tol)


@parity
def test_outputs_match_swift_and_deactivation_is_exact(row, tmp_path):
    model = row.build()
    rec = recorded(row, model, tmp_path)
    with torch.no_grad():
        base = logits(model(*rec.args))
    if rec.train:
        model.train()
    params = swift_params(rec)
    for p in params:
        ft.validate(model, p)
    with torch.no_grad():
        out = run(model, rec, params)
    assert out.shape == rec.output.shape
    torch.testing.assert_close(out, rec.output, **row.tol)
    if out.shape == base.shape:
        assert not torch.allclose(out, base)
    with torch.no_grad():
        assert torch.equal(logits(model(*rec.args)), base)  # no params: the base model exactly (slots are dormant)
        assert torch.equal(run(model, rec, params), out)  # reactivated: the same outputs again


@parity
def test_init_gives_swifts_keys_and_shapes(row, tmp_path):
    model = row.build()
    rec = recorded(row, model, tmp_path)
    with torch.no_grad():
        base = logits(model(*rec.args))
    ours = {n: ft.init(model, cfg, generator=0, adapter_name=n) for n, cfg in rec.configs.items()}
    for name, p in ours.items():
        disk = to_swift_state_dict(p, name)
        assert {k: tuple(v.shape) for k, v in disk.items()} == {
            k: tuple(v.shape) for k, v in rec.swift_state[name].items()
        }
    assert {k for p in ours.values() for k in p} == {k for p in swift_params(rec) for k in p}
    if row.starts_as_base:
        with torch.no_grad():
            out = run(model, rec, list(ours.values()))
        assert torch.equal(out, base)
        if rec.init_output is not None:
            torch.testing.assert_close(out, rec.init_output, **row.tol)


@parity
def test_checkpoint_has_swifts_keys_tensors_and_config(row, tmp_path):
    model = row.build()
    rec = recorded(row, model, tmp_path)
    for p in swift_params(rec):
        name = p.adapter_name
        folder = ckpt.write_swift_adapter(tmp_path / "ours", name, p.config, p)
        if rec.swift_state[name]:
            on_disk = ckpt.read_tensors(folder)
            assert set(on_disk) == set(rec.swift_state[name])
            assert all(torch.equal(on_disk[k], rec.swift_state[name][k]) for k in on_disk)
        else:  # SWIFT writes no tensors file for a tuner without tensors (NEFTune)
            assert not (folder / "adapter_model.safetensors").exists()
        written = json.loads((folder / "adapter_config.json").read_text())
        if rec.swift_json[name] is not None:
            assert written == rec.swift_json[name]  # SWIFT's own adapter_config.json, field for field
            assert ckpt.config_to_json(ckpt.config_from_json(rec.swift_json[name])) == rec.swift_json[name]
        loaded = ckpt.read_adapter_dir(tmp_path / "ours")[name]
        assert loaded.config == p.config
        again = ft.TunerParams(loaded.state, loaded.config, name)
        assert again == p
        fresh = row.build()
        if rec.train:
            model.train()
            fresh.train()
        with torch.no_grad():
            assert torch.equal(run(fresh, rec, again), run(model, rec, p))


def _shim_output(sm: Any, rec: Recorded) -> torch.Tensor:
    if rec.noise_seed is not None:
        torch.manual_seed(rec.noise_seed)  # the shim, like SWIFT, draws NEFTune's noise from the global RNG
    with torch.no_grad():
        return logits(sm(*rec.args))


#: Rows whose shim checks fail on a library bug (strict: the test says so once the bug is fixed).
@parity
def test_shim_loads_swifts_directory(row, tmp_path):
    model = row.build()
    rec = recorded(row, model, tmp_path)
    with torch.no_grad():
        base = logits(model(*rec.args))
    sm = ft.Swift.from_pretrained(model, rec.folder)  # the directory SWIFT itself wrote
    if rec.train:
        sm.train()
    torch.testing.assert_close(_shim_output(sm, rec), rec.output, **row.tol)
    for name in rec.configs:
        sm.deactivate_adapter(name)
    assert torch.equal(_shim_output(sm, rec), base)
    assert set(sm.state_dict()) == {k for s in rec.swift_state.values() for k in s}
    sm.save_pretrained(str(tmp_path / "again"))  # re-saved: SWIFT's keys again
    for name, state in rec.swift_state.items():
        if state:
            assert set(ckpt.read_tensors(tmp_path / "again" / name)) == set(state)


@parity
def test_shim_loads_the_directory_functuner_wrote(row, tmp_path):
    model = row.build()
    rec = recorded(row, model, tmp_path)
    with torch.no_grad():
        base = logits(model(*rec.args))
    for p in swift_params(rec):
        ckpt.write_swift_adapter(tmp_path / "ours", p.adapter_name, p.config, p)
    sm = ft.Swift.from_pretrained(model, str(tmp_path / "ours"))
    if rec.train:
        sm.train()
    torch.testing.assert_close(_shim_output(sm, rec), rec.output, **row.tol)
    sm.set_active_adapters([])
    assert torch.equal(_shim_output(sm, rec), base)
    assert set(sm.state_dict()) == {k for s in rec.swift_state.values() for k in s}


@parity
def test_shim_prepare_load_toggle_save_and_reload(row, tmp_path):
    model = row.build()
    rec = recorded(row, model, tmp_path)
    with torch.no_grad():
        base = logits(model(*rec.args))
    sm = ft.Swift.prepare_model(model, rec.configs)
    for name, state in rec.swift_state.items():
        sm.load_state_dict(state, adapter_name=name)
    if rec.train:
        sm.train()
    torch.testing.assert_close(_shim_output(sm, rec), rec.output, **row.tol)
    sm.set_active_adapters([])
    assert torch.equal(_shim_output(sm, rec), base)
    sm.set_active_adapters(list(rec.configs))
    torch.testing.assert_close(_shim_output(sm, rec), rec.output, **row.tol)
    assert set(sm.state_dict()) == {k for s in rec.swift_state.values() for k in s}
    sm.save_pretrained(str(tmp_path / "saved"))
    for name, state in rec.swift_state.items():
        if state:
            assert set(ckpt.read_tensors(tmp_path / "saved" / name)) == set(state)
    fresh = ft.Swift.from_pretrained(row.build(), str(tmp_path / "saved"))
    if rec.train:
        fresh.train()
    torch.testing.assert_close(_shim_output(fresh, rec), rec.output, **row.tol)
    got, want = fresh.state_dict(), sm.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
