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
