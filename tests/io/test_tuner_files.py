"""pyreft's ``intkey_*.bin`` ReFT layout (what ms-swift 4.6 saves), read by functuner/io/tuner_files.py
through the ReFT tuner's ``read_files`` hook (functuner/tuners/_reft_files.py).

The files here are written as pyreft 0.1.0's ``save_intervention`` writes them: ``torch.save`` of an
intervention's ``state_dict`` (pyreft/interventions.py: ``LowRankRotateLayer`` under torch's
``orthogonal`` parametrization; LoReFT's own ``state_dict`` gives ``weight``/``bias``/``rotate_layer``).
Directories written by the real ms-swift + pyreft are loaded in tests/swift_interop/reft_scenario.py
(ms-swift's venv, ``.ci/run``).
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from models import tiny_llama
from torch import nn

import functuner as ft
from functuner.errors import CheckpointError, UnsafeCheckpointError
from functuner.io import checkpoint as ckpt

FILE = "intkey_comp_model_layers[{}]_output_unit_pos_nunit_1#0.bin"


def _config(folder: pathlib.Path, intervention: str) -> None:
    cfg = {"args": {}, "intervention_type": intervention, "layer_key": None, "layers": None}
    cfg |= {"model_key_mapping": None, "model_type": "llama", "r": 2, "swift_type": "reft"}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def _rotate(seed: int) -> nn.Module:
    """pyreft's LowRankRotateLayer(32, 2) under torch's orthogonal parametrization."""
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.empty(32, 2))
    torch.manual_seed(seed)
    nn.init.orthogonal_(layer.weight)
    nn.utils.parametrizations.orthogonal(layer)
    with torch.no_grad():  # trained: original moves away from its initial value
        layer.parametrizations.weight.original.add_(0.1 * torch.randn(32, 2))
    return layer


def _consreft_dir(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    folder.mkdir()
    _config(folder, "ConsreftIntervention")
    want = {}
    for i in (0, 1):
        rotate = _rotate(i)
        source = torch.randn(2, generator=torch.Generator().manual_seed(10 + i))
        state = {"learned_source": source, "embed_dim": torch.tensor(32), "interchange_dim": torch.tensor(32)}
        state |= {f"rotate_layer.{k}": v for k, v in rotate.state_dict().items()}
        torch.save(state, folder / FILE.format(i))
        want[f"model.layers.{i}.reft_default.rotate_layer"] = rotate.weight.detach()
        want[f"model.layers.{i}.reft_default.learned_source"] = source
    return want


def test_pyrefts_files_load_as_the_tensors_pyreft_runs(tmp_path: pathlib.Path):
    want = _consreft_dir(tmp_path / "default")
    read = ckpt.read_adapter_dir(tmp_path)["default"]
    assert read.state.keys() == want.keys()
    assert all(torch.allclose(read.state[k], v, rtol=0, atol=1e-6) for k, v in want.items())
    sm = ft.Swift.from_pretrained(tiny_llama(), str(tmp_path))  # the shim loads the directory as it is
    assert all(torch.allclose(sm.adapters["default"].tensors[k], v, rtol=0, atol=1e-6) for k, v in want.items())


def test_loreft_state_dict_names(tmp_path: pathlib.Path):
    folder = tmp_path / "default"
    folder.mkdir()
    _config(folder, "LoreftIntervention")
    g = torch.Generator().manual_seed(0)
    for i in (0, 1):
        rotate = torch.linalg.qr(torch.randn(32, 2, generator=g))[0]
        torch.save(
            {"weight": torch.randn(2, 32, generator=g), "bias": torch.zeros(2), "rotate_layer": rotate},
            folder / FILE.format(i),
        )
    state = ckpt.read_adapter_dir(tmp_path)["default"].state
    assert sorted(k.split("reft_default.")[1] for k in state if k.startswith("model.layers.1.")) == [
        "learned_source.bias",
        "learned_source.weight",
        "rotate_layer",
    ]


class _NotATensor:  # a pickled object torch's restricted loader refuses
    pass


@pytest.mark.parametrize(
    ("payload", "error", "match"),
    [
        ({"learned_source": _NotATensor()}, UnsafeCheckpointError, "restricted loader"),
        ([torch.zeros(2)], UnsafeCheckpointError, "dict of tensors"),
        ({"learned_source": torch.zeros(2), "surprise": torch.zeros(2)}, CheckpointError, "surprise"),
    ],
)
def test_anything_but_known_tensors_is_refused_naming_the_file(tmp_path, payload, error, match):
    _consreft_dir(tmp_path / "default")
    bad = tmp_path / "default" / FILE.format(1)
    torch.save(payload, bad)
    model = tiny_llama()
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(error, match=match) as info:
        ft.Swift.from_pretrained(model, str(tmp_path))
    assert bad.name in str(info.value)
    assert [n for n, _ in model.named_parameters()] == names  # nothing was attached
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------
# writing: save_pretrained(..., safe_serialization=False) writes pyreft's files (the ReFT tuner's write_files)
# ---------------------------------------------------------------------------
_SIZES = ["embed_dim", "interchange_dim"]
_PARAM = ["rotate_layer.parametrizations.weight.original", "rotate_layer.parametrizations.weight.0.base"]
#: pyreft 0.1.0's state_dict keys, in order, per intervention type (read from the files ms-swift 4.6 writes,
#: tests/swift_interop/reft_scenario.py compares them bitwise in .ci/run)
PYREFT_KEYS = {
    "LoreftIntervention": ["weight", "bias", "rotate_layer"],
    "NoreftIntervention": [*_SIZES, "proj_layer.weight", "learned_source.weight", "learned_source.bias"],
    "ConsreftIntervention": ["learned_source", *_SIZES, *_PARAM],
    "LobireftIntervention": ["learned_source", *_SIZES, *_PARAM],
    "DireftIntervention": [*_SIZES, *_PARAM, "learned_source.weight", "learned_source.bias"],
    "NodireftIntervention": [*_SIZES, "proj_layer.weight", "learned_source.weight", "learned_source.bias"],
}


def _trained_reft(intervention: str, dtype: torch.dtype = torch.float32, **kwargs) -> ft.SwiftModel:
    torch.manual_seed(0)
    sm = ft.Swift.prepare_model(tiny_llama().to(dtype), ft.ReftConfig(model_type="llama", r=2, **kwargs))
    with torch.no_grad():  # as after training steps: R no longer exactly orthonormal
        for t in sm.adapters["default"].tensors.values():
            t.add_(0.01 * torch.randn(t.shape).to(dtype))
    return sm


def _save_bin(sm: ft.SwiftModel, folder: pathlib.Path) -> None:
    with pytest.warns(UserWarning, match="safetensors"):
        sm.save_pretrained(str(folder), safe_serialization=False)


@pytest.mark.parametrize(
    ("intervention", "kwargs", "dtype"),
    [(name, {}, torch.float32) for name in PYREFT_KEYS]
    + [
        ("NoreftIntervention", {"args": '{"add_bias": true}'}, torch.float32),
        ("ConsreftIntervention", {}, torch.bfloat16),
        ("LoreftIntervention", {"layers": [1]}, torch.bfloat16),
    ],
)
def test_bin_save_writes_pyrefts_files_and_reads_back_bitwise(tmp_path, intervention, kwargs, dtype):
    sm = _trained_reft(intervention, dtype, intervention_type=intervention, **kwargs)
    params = dict(sm.adapters["default"].params)
    _save_bin(sm, tmp_path)
    layers = kwargs.get("layers", [0, 1])
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == sorted(
        ["adapter_config.json", *(FILE.format(i) for i in layers)]
    )
    want = list(PYREFT_KEYS[intervention])
    if "add_bias" in kwargs.get("args", ""):
        want.insert(want.index("proj_layer.weight") + 1, "proj_layer.bias")
    for i in layers:
        data = torch.load(tmp_path / "default" / FILE.format(i), weights_only=True)
        assert list(data) == want
        for key, value in data.items():
            assert value.dtype == (torch.int64 if key in _SIZES else dtype), key
        if _PARAM[1] in data:  # torch's parametrization: original -I, base = [R | orthonormal complement]
            assert torch.equal(data[_PARAM[0]], -torch.eye(32, 2, dtype=dtype))
            assert torch.equal(data[_PARAM[1]][:, :2], params[f"model.layers.{i}.reft_default.rotate_layer"])
    read = ckpt.read_adapter_dir(tmp_path)["default"].state
    assert read.keys() == params.keys()
    assert all(read[k].dtype == v.dtype and torch.equal(read[k], v) for k, v in params.items())
    again = ft.Swift.from_pretrained(tiny_llama().to(dtype), str(tmp_path)).adapters["default"].params
    assert all(torch.equal(again[k], v) for k, v in params.items())


def test_default_save_stays_safetensors_and_a_bin_save_replaces_it(tmp_path: pathlib.Path):
    sm = _trained_reft("ConsreftIntervention", intervention_type="ConsreftIntervention")
    sm.save_pretrained(str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    _save_bin(sm, tmp_path)  # no stale safetensors left to shadow the new files
    assert not (tmp_path / "default" / "adapter_model.safetensors").exists()
    sm.save_pretrained(str(tmp_path))  # and back: no stale intkey files
    assert not list((tmp_path / "default").glob("intkey_*"))


def test_a_failure_mid_write_leaves_the_checkpoint_as_it_was(tmp_path: pathlib.Path, monkeypatch):
    sm = _trained_reft("DireftIntervention", intervention_type="DireftIntervention")
    sm.save_pretrained(str(tmp_path))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real_save, calls = torch.save, []

    def save_then_fail(obj, f, *args, **kw):  # the disk fills up after the first intkey file
        calls.append(f)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.warns(UserWarning, match="safetensors"), pytest.raises(OSError, match="No space"):
        sm.save_pretrained(str(tmp_path), safe_serialization=False)
    assert len(calls) == 2
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({p.parts[0] for p in before})  # no temp dir left
