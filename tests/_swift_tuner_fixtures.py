"""Load the SWIFT parity fixtures written by ``tests/fixtures/make_tuner_fixtures.py`` (real ms-swift 4.6).

Each case folder holds SWIFT's own ``save_pretrained`` output per adapter and an
``io.safetensors`` with the inputs and SWIFT's outputs.  The base models are
rebuilt from the same configs and seeds (``tests/models.py``); :func:`load_case`
checks the rebuilt model against the checksum SWIFT's side recorded.

The outputs were recorded on another CPU: float kernels (and the vectorised
weight initialisers) differ between CPUs / ISAs in the last bits, so our outputs
are compared with them within :data:`SWIFT_OUTPUT_TOL`, never bitwise.  Comparisons inside one process stay bitwise.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import torch
from models import checksum
from safetensors import safe_open
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "tuners")

#: Our outputs vs the ones ms-swift recorded: recorded on another CPU; float kernels differ in the last bits.
#: Measured: at most 3.6e-7 absolute on x86 AVX2 (BERT's last hidden state, |values| <= 3.3; 0 to 7e-8 on
#: the other models), and 1.2e-6 at |value| 1.1 with ATEN_CPU_CAPABILITY=default (scalar kernels, whose
#: initialisers also round the weights differently).  1e-6 absolute + 1e-6 relative (a few float32 ulps,
#: the bottom of PEFT's forward tolerances) holds for both; a wrong tuner is off by 1e-3 or more.
SWIFT_OUTPUT_TOL: dict[str, float] = {"rtol": 1e-6, "atol": 1e-6}
#: The rebuilt base model's float64 state sum vs SWIFT's: bitwise on x86 AVX2; scalar initialisers
#: (ATEN_CPU_CAPABILITY=default) move it by 5e-8 relative, a different seed or config by far more.
_CHECKSUM_RTOL = 1e-6


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
        got = checksum(model)
        want = float(meta["base_checksum"])
        assert abs(got - want) <= _CHECKSUM_RTOL * max(1.0, abs(want)), (
            f"rebuilt base model differs from the one SWIFT's fixture used ({got!r} vs {want!r});"
            " regenerate the fixtures with tests/fixtures/make_tuner_fixtures.py"
        )
    return Case(io, meta, adapters, folder)
