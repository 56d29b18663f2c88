"""Load the SWIFT parity fixtures written by ``tests/fixtures/make_tuner_fixtures.py`` (real ms-swift 4.6).

Each case folder holds SWIFT's own ``save_pretrained`` output per adapter and an
``io.safetensors`` with the inputs and SWIFT's outputs.  The base models are
rebuilt here from the same configs and seeds; :func:`load_case` checks the
rebuilt model against the checksum SWIFT's side recorded.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "tuners")

_spec = importlib.util.spec_from_file_location(
    "make_tuner_fixtures", os.path.join(HERE, "fixtures", "make_tuner_fixtures.py")
)
assert _spec is not None and _spec.loader is not None
builders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(builders)  # the model builders SWIFT's side used (tiny_bert, tiny_vit, tiny_toy...)


class SwiftAdapterFiles(NamedTuple):
    config: dict[str, Any]  # adapter_config.json as SWIFT wrote it
    state: dict[str, torch.Tensor]  # adapter_model.safetensors (empty when SWIFT wrote none)
    folder: str


class Case(NamedTuple):
    io: dict[str, torch.Tensor]
    meta: dict[str, str]
    adapters: dict[str, SwiftAdapterFiles]
    folder: str


def load_case(name: str, model: torch.nn.Module | None = None) -> Case:
    folder = os.path.join(FIXTURES, name)
    io_path = os.path.join(folder, "io.safetensors")
    io = load_file(io_path)
    with safe_open(io_path, "pt") as f:
        meta = dict(f.metadata())
    adapters = {}
    for adapter in json.loads(meta["adapters"]):
        sub = os.path.join(folder, adapter)
        with open(os.path.join(sub, "adapter_config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
        weights = os.path.join(sub, "adapter_model.safetensors")
        state = load_file(weights) if os.path.exists(weights) else {}
        adapters[adapter] = SwiftAdapterFiles(cfg, state, sub)
    if model is not None:
        got = builders.checksum(model)
        want = float(meta["base_checksum"])
        assert abs(got - want) <= 1e-9 * max(1.0, abs(want)), (
            f"rebuilt base model differs from the one SWIFT's fixture used ({got!r} vs {want!r});"
            " regenerate the fixtures with tests/fixtures/make_tuner_fixtures.py"
        )
    return Case(io, meta, adapters, folder)


def logits(out: Any) -> torch.Tensor:
    """The tensor the fixtures recorded: a tensor output, else ``.logits``, else ``.last_hidden_state``."""
    return builders.logits(out)
