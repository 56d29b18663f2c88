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

The three readers are also fuzzed on their own (fast, so 3,000 examples
each take seconds): ``config_reader`` (:func:`functuner.core.fs.read_json`
plus :func:`~functuner.tuners.config_json.config_from_json` on random bytes,
random JSON, a valid config with one field set to a random JSON value, or
byte edits of it), ``header_reader``
(:func:`functuner.io.merge_shards.read_header` on random bytes, mutated
header fields, byte edits of a valid file) and the shard index reader
(``model.safetensors.index.json`` of a base checkpoint, read by ``functuner
merge``): ``random_index``, ``mutated_index`` (``weight_map``, one of its
entries, ``metadata``, ``total_size`` or a top-level field set to a random
JSON value) and ``mutated_index_bytes`` run
:func:`functuner.io.merge_shards.read_base` (the index, every shard header,
the index/shard cross-check) on a two-shard base.  Allowed: ``CheckpointError``.

Budgets: each fuzzer runs ``SMALL`` examples by default; the ``slow``-marked
variants run ``FULL`` examples with ``FUNCTUNER_FULL=1`` (else ``SMALL`` too):
``FUNCTUNER_FULL=1 python -m pytest -m slow tests/reliability/test_fuzz_readers.py``
(3,000 examples per fuzzer; the figures are in docs/reliability.md).
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
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_common import lora_llama

from functuner.core.fs import read_json
from functuner.errors import AdapterNameError, CheckpointError
from functuner.io import checkpoint as ckpt
from functuner.io import merge_shards
from functuner.tuners.config_json import config_from_json

SMALL = 40
FULL = 3000 if os.environ.get("FUNCTUNER_FULL") == "1" else SMALL
HANG_S = 20
ALLOWED = (CheckpointError, AdapterNameError)

_ROOT = Path(tempfile.mkdtemp(prefix="functuner-fuzz-"))
_GOOD = _ROOT / "good"
lora_llama(seed=4).save_pretrained(_GOOD)
GOOD_ST = (_GOOD / "default" / "adapter_model.safetensors").read_bytes()
GOOD_CFG = json.loads((_GOOD / "default" / "adapter_config.json").read_text())
_ADAPTER = ckpt.read_adapter_dir(_GOOD)["default"]
ST_NAME = "adapter_model.safetensors"


def _sharded_base(dst: Path) -> dict[str, object]:
    """A tiny Llama checkpoint in two shards with an index; returns the index."""
    from rel_common import tiny_llama
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tiny_llama().state_dict().items()}
    dst.mkdir()
    names = sorted(tensors)
    wm: dict[str, str] = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(dst / shard), metadata={"format": "pt"})
        wm.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())}, "weight_map": wm}
    (dst / merge_shards.INDEX).write_text(json.dumps(index))
    return index


_BASE = _ROOT / "base"
GOOD_INDEX = _sharded_base(_BASE)
INDEX_ALLOWED = (CheckpointError,)

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


def _alarm(what: str) -> Any:
    def hang(*_: object) -> None:
        raise TimeoutError(f"{what} took over {HANG_S} s")

    return signal.signal(signal.SIGALRM, hang)


def _direct(name: str, data: bytes, read: Callable[[Path], object]) -> None:
    """Write ``data`` as file ``name`` alone in a folder and ``read`` it; only ``CheckpointError`` may come out."""
    folder = Path(tempfile.mkdtemp(dir=_ROOT))
    try:
        (folder / name).write_bytes(data)
        old = _alarm(f"reading {name}")
        signal.alarm(HANG_S)
        try:
            read(folder / name)
        except CheckpointError:
            pass
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _read_index(index_bytes: bytes) -> None:
    """Read the two-shard base with ``index_bytes`` as its index (index, every header, the cross-check)."""
    folder = Path(tempfile.mkdtemp(dir=_ROOT))
    try:
        for f in _BASE.iterdir():
            if f.name != merge_shards.INDEX:
                os.link(f, folder / f.name)
        (folder / merge_shards.INDEX).write_bytes(index_bytes)
        old = _alarm("reading the index")
        signal.alarm(HANG_S)
        try:
            merge_shards.read_base(folder)
        except INDEX_ALLOWED:
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

    wm_keys = sorted(GOOD_INDEX["weight_map"])  # type: ignore[call-overload]

    @settings(**common)
    @given(st.binary(max_size=256) | json_values.map(lambda v: json.dumps(v).encode()))
    def random_index(data: bytes) -> None:
        _read_index(data)

    @settings(**common)
    @given(
        st.sampled_from(["weight_map", "metadata", "total_size", "entry", "extra_entry", "top"]),
        st.sampled_from(wm_keys),
        json_values,
    )
    def mutated_index(where: str, key: str, value: object) -> None:
        index = json.loads(json.dumps(GOOD_INDEX))
        if where in ("weight_map", "metadata"):
            index[where] = value
        elif where == "total_size":
            index["metadata"]["total_size"] = value
        elif where == "entry":
            index["weight_map"][key] = value
        elif where == "extra_entry":
            index["weight_map"][str(value)[:20]] = value
        else:
            index[key] = value
        _read_index(json.dumps(index).encode())

    @settings(**common)
    @given(edits)
    def mutated_index_bytes(e: list[tuple[int, int, int]]) -> None:
        _read_index(_mutate(json.dumps(GOOD_INDEX).encode(), e))

    @settings(**common)
    @given(
        st.binary(max_size=256)
        | json_values.map(lambda v: json.dumps(v).encode())
        | st.tuples(st.sampled_from(sorted(GOOD_CFG) + ["peft_type", "unknown"]), json_values).map(
            lambda fv: json.dumps({**GOOD_CFG, fv[0]: fv[1]}).encode()
        )
        | edits.map(lambda e: _mutate(json.dumps(GOOD_CFG).encode(), e))
    )
    def config_reader(data: bytes) -> None:
        _direct("adapter_config.json", data, lambda p: config_from_json(read_json(p), str(p)))

    @settings(**common)
    @given(
        st.binary(max_size=512)
        | st.tuples(st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__"]), json_values).map(
            lambda fv: _header_mutation(*fv)
        )
        | edits.map(lambda e: _mutate(GOOD_ST, e))
    )
    def header_reader(data: bytes) -> None:
        _direct("adapter_model.safetensors", data, merge_shards.read_header)

    return {
        f.__name__: f
        for f in (
            config_reader,
            header_reader,
            random_weights,
            mutated_weights,
            mutated_header,
            random_config,
            mutated_config,
            mutated_config_bytes,
            random_index,
            mutated_index,
            mutated_index_bytes,
        )
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
    """Control: the fuzzers start from a checkpoint that really loads, and a sharded base that really merges."""
    found = ckpt.read_adapter_dir(_GOOD)
    assert list(found) == ["default"] and len(found["default"].state) == 8  # q and v of 2 layers, A and B
    out = Path(tempfile.mkdtemp(dir=_ROOT))
    summary = merge_shards.merge_checkpoint(_BASE, out, _ADAPTER.state, _ADAPTER.config, "default")
    assert summary["shards"] == 2 and summary["merged"] == 4
    names, _, _, infos = merge_shards.read_base(_BASE)
    assert len(names) == 2 and len(infos) == len(GOOD_INDEX["weight_map"])  # type: ignore[arg-type]
    assert config_from_json(GOOD_CFG) is not None and merge_shards.read_header(_GOOD / "default" / ST_NAME)
