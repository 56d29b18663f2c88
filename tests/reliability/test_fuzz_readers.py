"""Fuzzing the checkpoint readers (issue 8, item 6): random and mutated files never crash or hang.

Inputs: random bytes as ``adapter_model.safetensors``; a valid file with
bytes flipped, cut or inserted; a valid header with mutated JSON fields;
``adapter_config.json`` as random bytes, random JSON, or a valid config with
fields replaced by random JSON values.  Each example goes through
:func:`functuner.io.checkpoint.read_adapter_dir` (what ``from_pretrained`` reads
with).  Allowed outcomes: it loads, or it raises one of the documented
:class:`~functuner.errors.CheckpointError` / ``AdapterNameError`` types.
Anything else (``KeyError``, ``AttributeError``, a crash) fails, and so does a
single example running past ``HANG_S`` seconds (an alarm: a hang detector, not
a speed assertion).

Budgets: each fuzzer runs ``SMALL`` examples by default; the ``slow``-marked
variants run ``FULL`` examples with ``FUNCTUNER_FULL=1`` (else ``SMALL`` too):
``FUNCTUNER_FULL=1 python -m pytest -m slow tests/reliability``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_common import lora_llama

from functuner.errors import AdapterNameError, CheckpointError
from functuner.io import checkpoint as ckpt

SMALL = 40
FULL = 3000 if os.environ.get("FUNCTUNER_FULL") == "1" else SMALL
HANG_S = 20
ALLOWED = (CheckpointError, AdapterNameError)

_ROOT = Path(tempfile.mkdtemp(prefix="functuner-fuzz-"))
_GOOD = _ROOT / "good"
lora_llama(seed=4).save_pretrained(_GOOD)
GOOD_ST = (_GOOD / "default" / "adapter_model.safetensors").read_bytes()
GOOD_CFG = json.loads((_GOOD / "default" / "adapter_config.json").read_text())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _read(st_bytes: bytes | None, cfg_bytes: bytes | None) -> None:
    """Write one damaged checkpoint and read it; only documented outcomes are allowed."""
    folder = Path(tempfile.mkdtemp(dir=_ROOT))
    try:
        sub = folder / "default"
        sub.mkdir()
        (sub / "adapter_model.safetensors").write_bytes(GOOD_ST if st_bytes is None else st_bytes)
        (sub / "adapter_config.json").write_bytes(json.dumps(GOOD_CFG).encode() if cfg_bytes is None else cfg_bytes)

        def hang(*_: object) -> None:
            raise TimeoutError(f"reading took over {HANG_S} s")

        old = signal.signal(signal.SIGALRM, hang)
        signal.alarm(HANG_S)
        try:
            ckpt.read_adapter_dir(folder)
        except ALLOWED:
            pass
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, pos, val in edits:
        if not out:
            break
        pos %= len(out)
        if kind == 0:
            out[pos] = val
        elif kind == 1:
            del out[pos:]
        else:
            out[pos:pos] = bytes([val])
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=6)


def _header_mutation(field: str, value: object) -> bytes:
    (n,) = struct.unpack("<Q", GOOD_ST[:8])
    header = json.loads(GOOD_ST[8 : 8 + n])
    key = sorted(k for k in header if k != "__metadata__")[0]
    if field == "__metadata__":
        header["__metadata__"] = value
    else:
        header[key][field] = value
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + GOOD_ST[8 + n :]


def _fuzzers(budget: int) -> dict[str, Callable[[], None]]:
    common = dict(
        max_examples=budget,
        deadline=None,
        derandomize=budget == SMALL,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    @settings(**common)
    @given(st.binary(max_size=512))
    def random_weights(data: bytes) -> None:
        _read(data, None)

    @settings(**common)
    @given(edits)
    def mutated_weights(e: list[tuple[int, int, int]]) -> None:
        _read(_mutate(GOOD_ST, e), None)

    @settings(**common)
    @given(st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__"]), json_values)
    def mutated_header(field: str, value: object) -> None:
        _read(_header_mutation(field, value), None)

    @settings(**common)
    @given(st.binary(max_size=256) | json_values.map(lambda v: json.dumps(v).encode()))
    def random_config(data: bytes) -> None:
        _read(None, data)

    @settings(**common)
    @given(st.sampled_from(sorted(GOOD_CFG) + ["peft_type", "unknown_field"]), json_values)
    def mutated_config(field: str, value: object) -> None:
        _read(None, json.dumps({**GOOD_CFG, field: value}).encode())

    @settings(**common)
    @given(edits)
    def mutated_config_bytes(e: list[tuple[int, int, int]]) -> None:
        _read(None, _mutate(json.dumps(GOOD_CFG).encode(), e))

    return {
        f.__name__: f
        for f in (random_weights, mutated_weights, mutated_header, random_config, mutated_config, mutated_config_bytes)
    }


NAMES = sorted(_fuzzers(SMALL))


@pytest.mark.parametrize("name", NAMES)
def test_fuzz_small_budget(name: str) -> None:
    _fuzzers(SMALL)[name]()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_fuzz_full_budget(name: str) -> None:
    _fuzzers(FULL)[name]()


def test_the_unmutated_files_load() -> None:
    """Control: the fuzzers start from a checkpoint that really loads."""
    found = ckpt.read_adapter_dir(_GOOD)
    assert list(found) == ["default"] and len(found["default"].state) == 8  # q and v of 2 layers, A and B
