"""Bad-input matrix: one test per malformed input (issue 8, item 1).

Each test damages one thing in a checkpoint written by ``save_pretrained``
(or passes one bad argument) and loads it onto a SwiftModel that already has an
adapter of its own.  Every case must raise a typed functuner error (a subclass
of the built-in type a caller would catch) whose message names the file, key or
field at fault, and leave untouched, bitwise: the model (values, storage,
identity, hooks, adapters, active set), the existing adapter's parameters, and
every byte of the checkpoint directory (and nothing new written beside it).

Documented choices: NaN/inf in adapter weights are *refused* (CheckpointError
naming file and key); integer/bool tensors for float parameters are refused
(ParamsMismatchError naming the key); a LoRA rank above both dimensions of a
targeted layer is refused before anything is allocated.  Existing tests that
cover the functional API's bad input live in tests/reliability/test_bad_input.py.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from rel_common import DirSnapshot, ModelSnapshot, lora_llama, out_of, tiny_llama
from safetensors.torch import load_file, save_file

from functuner import Swift, SwiftModel
from functuner.errors import (
    AdapterNameError,
    CheckpointError,
    FunctunerError,
    ParamsMismatchError,
    TargetError,
    UnsafeCheckpointError,
)

ST = "adapter_model.safetensors"
CFG = "adapter_config.json"
Q_A = "model.layers.0.self_attn.q_proj.lora_A.default.weight"  # SWIFT's on-disk key


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("good") / "ck"
    lora_llama(seed=1).save_pretrained(root)
    return root


@pytest.fixture
def ck(tmp_path: Path, good_ckpt: Path) -> Path:
    """A fresh copy of the good checkpoint inside this test's own directory."""
    dst = tmp_path / "ck"
    shutil.copytree(good_ckpt, dst)
    return dst


def _target() -> SwiftModel:
    """The model a load goes onto: already holds its own adapter 'mine'."""
    return lora_llama(seed=2, names=("mine",))


def refused(
    ck: Path,
    error: type[FunctunerError],
    *mentions: str,
    target: SwiftModel | None = None,
    call: Callable[[SwiftModel, Path], Any] | None = None,
) -> str:
    """Load ``ck`` onto a target; assert the typed error, its message, and that nothing changed."""
    target = target if target is not None else _target()
    before_out = out_of(target)
    snap, files = ModelSnapshot(target), DirSnapshot(ck.parent)
    with pytest.raises(error) as info:
        if call is None:
            Swift.from_pretrained(target, str(ck))
        else:
            call(target, ck)
    msg = str(info.value)
    assert isinstance(info.value, FunctunerError)
    for m in mentions:
        assert m in msg, f"{m!r} not named in: {msg}"
    snap.assert_unchanged()
    files.assert_unchanged()
    assert torch.equal(out_of(target), before_out)
    return msg


def _rewrite_tensors(ck: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = ck / "default" / ST
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _edit_config(ck: Path, **fields: Any) -> None:
    path = ck / "default" / CFG
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def _header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_with_header(path: Path, header: dict[str, Any], data: bytes) -> None:
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


# ---------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------
def test_truncated_header(ck: Path) -> None:
    f = ck / "default" / ST
    f.write_bytes(f.read_bytes()[:5])
    refused(ck, CheckpointError, str(f))


def test_empty_weights_file(ck: Path) -> None:
    f = ck / "default" / ST
    f.write_bytes(b"")
    refused(ck, CheckpointError, str(f))


def test_header_cut_in_the_middle(ck: Path) -> None:
    f = ck / "default" / ST
    f.write_bytes(f.read_bytes()[:60])
    refused(ck, CheckpointError, str(f))


def test_corrupt_header_json(ck: Path) -> None:
    f = ck / "default" / ST
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"#not json!#!"
    f.write_bytes(bytes(raw))
    refused(ck, CheckpointError, str(f))


def test_header_claims_more_bytes_than_the_file_has(ck: Path) -> None:
    f = ck / "default" / ST
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw) + 1000) + raw[8:])
    refused(ck, CheckpointError, str(f))


def test_header_claims_a_terabyte(ck: Path) -> None:
    f = ck / "default" / ST
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    refused(ck, CheckpointError, str(f))


def test_tensor_data_cut_short(ck: Path) -> None:
    f = ck / "default" / ST
    f.write_bytes(f.read_bytes()[:-16])
    refused(ck, CheckpointError, str(f))


def test_header_shape_larger_than_its_data(ck: Path) -> None:
    f = ck / "default" / ST
    header, data = _header(f)
    header[Q_A]["shape"] = [400, 400]
    _write_with_header(f, header, data)
    refused(ck, CheckpointError, str(f))


def test_unknown_dtype_in_header(ck: Path) -> None:
    f = ck / "default" / ST
    header, data = _header(f)
    header[Q_A]["dtype"] = "F99"
    _write_with_header(f, header, data)
    refused(ck, CheckpointError, str(f))


def test_nan_in_adapter_weights_is_refused(ck: Path) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[Q_A][1, 2] = float("nan")

    _rewrite_tensors(ck, poison)
    refused(ck, CheckpointError, str(ck / "default" / ST), Q_A, "NaN")


def test_inf_in_adapter_weights_is_refused(ck: Path) -> None:
    key = Q_A.replace("lora_A", "lora_B")

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[key][0, 0] = float("-inf")

    _rewrite_tensors(ck, poison)
    refused(ck, CheckpointError, str(ck / "default" / ST), key)


def test_integer_dtype_for_float_weights(ck: Path) -> None:
    def to_int(t: dict[str, torch.Tensor]) -> None:
        t[Q_A] = (t[Q_A] * 100).to(torch.int64)

    _rewrite_tensors(ck, to_int)
    refused(ck, ParamsMismatchError, str(ck), "q_proj.lora_A.default.weight", "int64")


def test_shape_that_does_not_fit_the_model(ck: Path) -> None:
    def reshape(t: dict[str, torch.Tensor]) -> None:
        t[Q_A] = torch.zeros(4, 31)

    _rewrite_tensors(ck, reshape)
    refused(ck, ParamsMismatchError, str(ck), "q_proj.lora_A.default.weight", "(4, 31)")


def test_keys_for_modules_the_model_lacks(ck: Path) -> None:
    stray = "model.layers.7.self_attn.q_proj.lora_A.default.weight"

    def add(t: dict[str, torch.Tensor]) -> None:
        t[stray] = torch.zeros(4, 32)

    _rewrite_tensors(ck, add)
    refused(ck, ParamsMismatchError, str(ck), "layers.7.self_attn.q_proj")


def test_missing_tensor(ck: Path) -> None:
    _rewrite_tensors(ck, lambda t: t.pop(Q_A))
    refused(ck, ParamsMismatchError, str(ck), "missing", "layers.0.self_attn.q_proj.lora_A")


# ---------------------------------------------------------------------------
# adapter_config.json
# ---------------------------------------------------------------------------
def test_missing_adapter_config(ck: Path) -> None:
    (ck / "default" / CFG).unlink()
    refused(ck, CheckpointError, str(ck), CFG)


def test_invalid_json(ck: Path) -> None:
    (ck / "default" / CFG).write_text('{"swift_type": "LORA", "r": 4,')
    refused(ck, CheckpointError, str(ck / "default" / CFG), "JSON")


def test_json_that_is_not_an_object(ck: Path) -> None:
    (ck / "default" / CFG).write_text("[1, 2, 3]")
    refused(ck, CheckpointError, str(ck / "default" / CFG))


def test_unknown_swift_type(ck: Path) -> None:
    _edit_config(ck, swift_type="HYPERLORA")
    refused(ck, CheckpointError, str(ck / "default" / CFG), "HYPERLORA")


def test_unknown_peft_type(ck: Path) -> None:
    data = json.loads((ck / "default" / CFG).read_text())
    data.pop("swift_type")
    data["peft_type"] = "SUPERNOVA"
    (ck / "default" / CFG).write_text(json.dumps(data))
    refused(ck, CheckpointError, str(ck / "default" / CFG), "SUPERNOVA")


def test_zero_rank(ck: Path) -> None:
    _edit_config(ck, r=0)
    refused(ck, CheckpointError, str(ck / "default" / CFG), "r=0")


def test_negative_rank(ck: Path) -> None:
    _edit_config(ck, r=-4)
    refused(ck, CheckpointError, str(ck / "default" / CFG), "r=-4")


def test_rank_of_the_wrong_type(ck: Path) -> None:
    _edit_config(ck, r="four")
    refused(ck, CheckpointError, str(ck / "default" / CFG), "r=")


def test_absurd_rank_larger_than_the_layer(ck: Path) -> None:
    _edit_config(ck, r=10**9)  # would need ~256 GB if allocated: must be refused before any allocation
    refused(ck, CheckpointError, str(ck / "default" / CFG), "r=1000000000", "q_proj")


def test_unknown_config_field(ck: Path) -> None:
    _edit_config(ck, lora_turbo=True)
    refused(ck, CheckpointError, str(ck / "default" / CFG), "lora_turbo")


def test_target_modules_the_model_lacks(ck: Path) -> None:
    _edit_config(ck, target_modules=["qkv_fused"])
    refused(ck, TargetError, str(ck / "default" / CFG), "qkv_fused")


# ---------------------------------------------------------------------------
# adapter names
# ---------------------------------------------------------------------------
def _load_as(name: str) -> Callable[[SwiftModel, Path], Any]:
    return lambda target, ck: Swift.from_pretrained(target, str(ck), adapter_name={"default": name})


def test_adapter_name_with_slash(ck: Path) -> None:
    refused(ck, AdapterNameError, "'a/b'", call=_load_as("a/b"))


def test_adapter_name_with_dot_dot(ck: Path) -> None:
    refused(ck, AdapterNameError, "'..'", call=_load_as(".."))


def test_adapter_name_with_nul(ck: Path) -> None:
    refused(ck, AdapterNameError, "'x\\x00y'", call=_load_as("x\x00y"))


def test_empty_adapter_name(ck: Path) -> None:
    refused(ck, AdapterNameError, "''", call=_load_as(""))


def test_adapter_folder_with_an_invalid_name(ck: Path) -> None:
    (ck / "default").rename(ck / "bad name")
    refused(ck, CheckpointError, str(ck / "bad name"))


def test_save_under_an_escaping_name_writes_nothing(ck: Path) -> None:
    def save(target: SwiftModel, ck: Path) -> None:
        target.save_pretrained(ck.parent / "out", adapter_name="../mine")

    refused(ck, AdapterNameError, "../mine", call=save)
    assert not (ck.parent / "out").exists()


# ---------------------------------------------------------------------------
# links and pickles
# ---------------------------------------------------------------------------
def test_symlinked_weights_pointing_outside_the_checkpoint(ck: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ck / "default" / ST, outside)
    (ck / "default" / ST).symlink_to(outside)
    refused(ck, CheckpointError, str(ck / "default" / ST), "outside the checkpoint")


def test_symlinked_config_pointing_outside_the_checkpoint(ck: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    shutil.move(ck / "default" / CFG, outside)
    (ck / "default" / CFG).symlink_to(outside)
    refused(ck, CheckpointError, str(ck / "default" / CFG), "outside the checkpoint")


class _WritesAFile:
    """A pickle payload: unpickling it would create the file ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickled_bin_is_never_unpickled(ck: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (ck / "default" / ST).unlink()
    torch.save({Q_A: _WritesAFile(str(marker))}, ck / "default" / "adapter_model.bin")
    refused(ck, UnsafeCheckpointError, str(ck / "default" / "adapter_model.bin"))
    assert not marker.exists()
    # even with torch's restricted loader allowed, the payload is refused, not run
    refused(
        ck,
        UnsafeCheckpointError,
        "adapter_model.bin",
        call=lambda t, c: Swift.from_pretrained(t, str(c), weights_only=True),
    )
    assert not marker.exists()


# ---------------------------------------------------------------------------
# in-memory state dicts
# ---------------------------------------------------------------------------
def test_load_state_dict_with_a_wrong_shape_changes_nothing(ck: Path) -> None:
    target = _target()
    state = target.state_dict(adapter_name="mine")
    bad_key = next(k for k in state if "lora_B" in k)
    state[bad_key] = torch.zeros(5, 5)
    refused(
        ck,
        ParamsMismatchError,
        "lora_B",
        target=target,
        call=lambda t, c: t.load_state_dict(state, adapter_name="mine"),
    )


def test_load_state_dict_with_an_integer_tensor_changes_nothing(ck: Path) -> None:
    target = _target()
    state = target.state_dict(adapter_name="mine")
    bad_key = next(k for k in state if "lora_A" in k)
    state[bad_key] = torch.ones_like(state[bad_key], dtype=torch.int32)
    refused(
        ck,
        ParamsMismatchError,
        "lora_A",
        "int32",
        target=target,
        call=lambda t, c: t.load_state_dict(state, adapter_name="mine"),
    )


def test_the_good_checkpoint_loads(ck: Path) -> None:
    """Control: the undamaged copy loads and gives the saved model's outputs."""
    loaded = Swift.from_pretrained(tiny_llama(), str(ck))
    assert torch.equal(out_of(loaded), out_of(lora_llama(seed=1)))
