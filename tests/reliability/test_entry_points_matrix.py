"""One malformed-input matrix, run against every entry point that reads an adapter directory (issue 20).

Entry points: ``functuner.load`` (functional), ``Swift.from_pretrained`` and
``SwiftModel.load_adapter`` (shim), ``functuner.distributed.load_params``
(distributed), and the console script's ``inspect``, ``convert`` and ``merge``
(``functuner.cli.main.main`` in-process).  Each case damages one thing in a
copy of a good checkpoint written by ``save_pretrained`` and every entry point
must give the same answer:

* a functuner typed error (:class:`~functuner.errors.FunctunerError`, of the
  case's types) whose message names the culprit (the file, and the key or field);
* for the CLI: exit status 1, nothing on stdout, and on stderr exactly one
  line, ``functuner <command>: error: <the typed error's message>`` (the error
  is captured by a first run with ``FUNCTUNER_DEBUG=1``, which re-raises it),
  never ``internal error``;
* the model bitwise unchanged (values, storage, identity, hooks, adapters);
* no file written anywhere (the whole test directory and the base checkpoint
  are compared byte for byte): no output and no half-written output.

Entry points that read one adapter's folder (``functuner.load``,
``load_params``) do not read SWIFT's ``extra_states/`` (shim state, not
params): the extra-state cases run on the shim and the CLI.  Cases that only a
base checkpoint can have (shard index, base headers, base symlinks) run on
``merge``; argument cases (names, output paths) on the entry points taking them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from rel_common import DirSnapshot, ModelSnapshot, lora_llama, tiny_llama
from safetensors.torch import load_file, save_file

import functuner as ft
from functuner import LoRAConfig, Swift
from functuner.cli.main import main as cli_main
from functuner.distributed import load_params
from functuner.errors import AdapterNameError, CheckpointError, ConfigError, FunctunerError, ParamsMismatchError

ST, CFG = "adapter_model.safetensors", "adapter_config.json"
Q_A = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
Q_B = Q_A.replace("lora_A", "lora_B")
EXTRA = "model.norm.weight"

ADAPTER_ENTRIES = ("functional", "shim", "load_adapter", "distributed", "inspect", "convert", "merge")
EXTRA_ENTRIES = ("shim", "load_adapter", "inspect", "convert", "merge")


# ---------------------------------------------------------------------------
# good inputs, built once
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    lora_llama(seed=1).save_pretrained(root / "plain")
    model = tiny_llama()
    torch.manual_seed(3)
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with_extra = Swift.prepare_model(model, {"default": cfg}, extra_state_keys=[r"model\.norm\.weight"])
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    with_extra.save_pretrained(root / "extra")
    tiny_llama().save_pretrained(root / "base")
    return {"plain": root / "plain", "extra": root / "extra", "base": root / "base"}


# ---------------------------------------------------------------------------
# damage helpers
# ---------------------------------------------------------------------------
def _rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _set(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        t[key] = fn(t[key].clone())

    return change


def _poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[3] = value
        return t

    return fn


def _config_raw(path: Path, fld: str, raw: str) -> None:
    """Set ``fld`` to the raw JSON text ``raw`` (``NaN``, ``Infinity``, ``1e400``... which json.dumps cannot write)."""
    data = json.loads(path.read_text())
    data[fld] = "__RAW__"
    path.write_text(json.dumps(data).replace('"__RAW__"', raw))


def _header_edit(path: Path, key: str, fld: str, raw: str) -> None:
    """Replace one header field of tensor ``key`` by raw JSON text ``raw`` (keeping the data bytes)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header[key][fld] = "__RAW__"
    hb = json.dumps(header).replace('"__RAW__"', raw).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + blob[8 + n :])


@dataclass(frozen=True)
class Case:
    """One malformed input: what to damage, which errors are right, and what the message must name."""

    name: str
    damage: Callable[[Path], None]  # gets the checkpoint copy
    errors: tuple[type[FunctunerError], ...]
    mentions: Callable[[Path], list[str]]  # strings the message must contain (file, key/field)
    source: str = "plain"
    entries: tuple[str, ...] = ADAPTER_ENTRIES
    extra: dict[str, Any] = field(default_factory=dict)


def _cfg(ck: Path) -> Path:
    return ck / "default" / CFG


def _st(ck: Path) -> Path:
    return ck / "default" / ST


def _xst(ck: Path) -> Path:
    return ck / "extra_states" / ST


def _cfg_case(name: str, fld: str, raw: str, *, errors: tuple[type[FunctunerError], ...] = (CheckpointError,)) -> Case:
    return Case(name, lambda ck: _config_raw(_cfg(ck), fld, raw), errors, lambda ck: [str(_cfg(ck)), fld])


def _edit_cfg(**fields: Any) -> Callable[[Path], None]:
    def damage(ck: Path) -> None:
        data = json.loads(_cfg(ck).read_text())
        data.update(fields)
        _cfg(ck).write_text(json.dumps(data))

    return damage


CK = (CheckpointError,)
CASES = [
    # config vs tensors
    Case("config r vs tensor rank", _edit_cfg(r=8), CK, lambda ck: [str(_cfg(ck)), "r=8", Q_A]),
    Case(
        "lora_A/lora_B rank disagreement",
        lambda ck: _rewrite(_st(ck), _set(Q_B, lambda t: t[:, :3].contiguous())),
        CK,
        lambda ck: [str(_cfg(ck)), Q_B],
    ),
    # tensor values and dtypes
    Case(
        "NaN tensor", lambda ck: _rewrite(_st(ck), _set(Q_A, _poison(float("nan")))), CK, lambda ck: [str(_st(ck)), Q_A]
    ),
    Case(
        "inf tensor",
        lambda ck: _rewrite(_st(ck), _set(Q_B, _poison(float("-inf")))),
        CK,
        lambda ck: [str(_st(ck)), Q_B],
    ),
    Case(
        "int32 tensor",
        lambda ck: _rewrite(_st(ck), _set(Q_A, lambda t: (t * 100).to(torch.int32))),
        (CheckpointError, ParamsMismatchError),
        lambda ck: [str(ck), "q_proj.lora_A", "int32"],
    ),
    # every numeric config field: NaN, infinities, values beyond float32 / JSON numbers beyond float64
    _cfg_case("lora_alpha Infinity", "lora_alpha", "Infinity"),
    _cfg_case("lora_alpha -Infinity", "lora_alpha", "-Infinity"),
    _cfg_case("lora_alpha NaN", "lora_alpha", "NaN"),
    _cfg_case("lora_alpha 1e300", "lora_alpha", "1e300"),
    _cfg_case("lora_alpha 1e400", "lora_alpha", "1e400"),
    _cfg_case("lora_alpha 10**400", "lora_alpha", "1" + "0" * 400),
    _cfg_case("r NaN", "r", "NaN"),
    _cfg_case("r 1e400", "r", "1e400"),
    _cfg_case("r 10**30", "r", "1" + "0" * 30),
    _cfg_case("lora_dropout NaN", "lora_dropout", "NaN"),
    _cfg_case("lorap_lr_ratio Infinity", "lorap_lr_ratio", "Infinity"),
    _cfg_case("lorap_emb_lr NaN", "lorap_emb_lr", "NaN"),
    _cfg_case("lorap_emb_lr 1e300", "lorap_emb_lr", "1e300"),
    _cfg_case("alpha_pattern value NaN", "alpha_pattern", '{"q_proj": NaN}'),
    _cfg_case("alpha_pattern value 1e300", "alpha_pattern", '{"q_proj": 1e300}'),
    _cfg_case("rank_pattern value Infinity", "rank_pattern", '{"q_proj": Infinity}'),
    _cfg_case("layers_to_transform 1e400", "layers_to_transform", "[1e400]"),
    # config types
    _cfg_case("modules_to_save true", "modules_to_save", "true"),
    _cfg_case("target_modules a number", "target_modules", "5"),
    _cfg_case("rank_pattern a list", "rank_pattern", '["q_proj"]'),
    # patterns: invalid, or able to hang a matcher
    _cfg_case("target_modules invalid regex", "target_modules", '"(("'),
    _cfg_case("target_modules nested quantifier", "target_modules", '"(.*.*)*X"'),
    _cfg_case("target_modules (a+)+", "target_modules", '"(a+)+q_proj"'),
    _cfg_case("exclude_modules (a|a)*", "exclude_modules", '"(a|a)*"'),
    _cfg_case("target_modules many stars", "target_modules", '".*.*.*.*q_proj"'),
    _cfg_case("alpha_pattern invalid key", "alpha_pattern", '{"((": 3}'),
    _cfg_case("rank_pattern nested key", "rank_pattern", '{"(a*)*": 3}'),
    _cfg_case("layers_pattern invalid", "layers_pattern", '"(("'),
    # config files that are no valid JSON text
    Case(
        "non-UTF-8 config",
        lambda ck: _cfg(ck).write_bytes(b'{"swift_type": "LORA", "r": 4, "x": "\xff\xfe"}'),
        CK,
        lambda ck: [str(_cfg(ck)), "UTF-8"],
    ),
    Case(
        "deeply nested config",
        lambda ck: _cfg(ck).write_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        CK,
        lambda ck: [str(_cfg(ck)), "nested"],
    ),
    # safetensors header sanity
    Case(
        "header shape negative",
        lambda ck: _header_edit(_st(ck), Q_A, "shape", "[-4, -32]"),
        CK,
        lambda ck: [str(_st(ck)), Q_A, "'shape'"],
    ),
    Case(
        "header shape 1e400",
        lambda ck: _header_edit(_st(ck), Q_A, "shape", "[1e400, 32]"),
        CK,
        lambda ck: [str(_st(ck)), Q_A, "'shape'"],
    ),
    Case(
        "header offsets as floats",
        lambda ck: _header_edit(_st(ck), Q_A, "data_offsets", "[0.0, 512.0]"),
        CK,
        lambda ck: [str(_st(ck)), Q_A, "'data_offsets'"],
    ),
    Case(
        "header dtype a list",
        lambda ck: _header_edit(_st(ck), Q_A, "dtype", '["F32"]'),
        CK,
        lambda ck: [str(_st(ck)), Q_A, "'dtype'"],
    ),
    Case(
        "header metadata a number",
        lambda ck: _header_edit(_st(ck), "__metadata__", "format", "5"),
        CK,
        lambda ck: [str(_st(ck)), "__metadata__"],
    ),
    # symlinks out of the source
    Case(
        "weights symlinked outside",
        lambda ck: (
            shutil.move(_st(ck), ck.parent / "elsewhere.safetensors"),
            _st(ck).symlink_to(ck.parent / "elsewhere.safetensors"),
        ),
        CK,
        lambda ck: [str(_st(ck)), "outside"],
    ),
    # extra_states: the same rules as adapter weights
    Case(
        "extra_states NaN",
        lambda ck: _rewrite(_xst(ck), _set(EXTRA, _poison(float("nan")))),
        CK,
        lambda ck: [str(_xst(ck)), EXTRA],
        source="extra",
        entries=EXTRA_ENTRIES,
    ),
    Case(
        "extra_states int32",
        lambda ck: _rewrite(_xst(ck), _set(EXTRA, lambda t: t.to(torch.int32))),
        CK,
        lambda ck: [str(ck), EXTRA, "int32"],
        source="extra",
        entries=("shim", "load_adapter", "merge"),  # the dtype kind is checked against a model or base
    ),
    Case(
        "extra_state_keys invalid regex",
        lambda ck: (ck / "extra_states" / CFG).write_text('{"extra_state_keys": ["(("]}'),
        CK,
        lambda ck: [str(ck / "extra_states" / CFG), "extra_state_keys"],
        source="extra",
        entries=EXTRA_ENTRIES,
    ),
    Case(
        "extra_state_keys nested quantifier",
        lambda ck: (ck / "extra_states" / CFG).write_text('{"extra_state_keys": ["(a+)+"]}'),
        CK,
        lambda ck: [str(ck / "extra_states" / CFG), "extra_state_keys"],
        source="extra",
        entries=EXTRA_ENTRIES,
    ),
    Case(
        "extra_state_keys a number",
        lambda ck: (ck / "extra_states" / CFG).write_text('{"extra_state_keys": 5}'),
        CK,
        lambda ck: [str(ck / "extra_states" / CFG), "extra_state_keys"],
        source="extra",
        entries=EXTRA_ENTRIES,
    ),
    Case(
        "extra_states header dtype a list",
        lambda ck: _header_edit(_xst(ck), EXTRA, "dtype", '["F32"]'),
        CK,
        lambda ck: [str(_xst(ck)), EXTRA, "'dtype'"],
        source="extra",
        entries=EXTRA_ENTRIES,
    ),
]


# ---------------------------------------------------------------------------
# running one entry point
# ---------------------------------------------------------------------------
@dataclass
class Outcome:
    error: BaseException | None
    snapshots: list[Any]


def _cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[BaseException | None, int, str, str]:
    """Run the CLI twice: with FUNCTUNER_DEBUG=1 (the typed error comes out) and as a user does (rc, out, err)."""
    with monkeypatch.context() as m:
        m.setenv("FUNCTUNER_DEBUG", "1")
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                cli_main(argv)
            raised: BaseException | None = None
        except Exception as e:  # noqa: BLE001 - whatever comes out is judged by the caller
            raised = e
    out, err = io.StringIO(), io.StringIO()
    with monkeypatch.context() as m:
        m.delenv("FUNCTUNER_DEBUG", raising=False)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli_main(argv)
    return raised, rc, out.getvalue(), err.getvalue()


def _library(entry: str, ck: Path) -> tuple[Callable[[], Any], list[Any]]:
    """The call of a library entry point on ``ck``, and snapshots of what it must leave alone."""
    if entry == "functional":
        model = tiny_llama()
        return (lambda: ft.load(ck, model)), [ModelSnapshot(model)]
    if entry == "distributed":
        cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        like = ft.init(tiny_llama(), cfg, generator=0)
        before = {k: v.clone() for k, v in like.items()}

        class Like:
            def assert_unchanged(self) -> None:
                assert all(torch.equal(like[k], v) for k, v in before.items())

        return (lambda: load_params(ck, like)), [Like()]
    target = lora_llama(seed=2, names=("mine",))
    if entry == "shim":
        return (lambda: Swift.from_pretrained(target, str(ck))), [ModelSnapshot(target)]
    assert entry == "load_adapter"
    return (lambda: target.load_adapter(str(ck), adapter_name="loaded")), [ModelSnapshot(target)]


def refused_everywhere(
    entry: str,
    ck: Path,
    watch: list[Path],
    errors: tuple[type[FunctunerError], ...],
    mentions: list[str],
    monkeypatch: pytest.MonkeyPatch,
    *,
    argv: list[str] | None = None,
    call: Callable[[], Any] | None = None,
    snapshots: list[Any] | None = None,
) -> str:
    """Run ``entry`` on ``ck``; assert the typed error naming ``mentions``, nothing changed, nothing written."""
    files = [DirSnapshot(w) for w in watch]
    if entry in ("inspect", "convert", "merge"):
        out = ck.parent / f"{entry}-out"
        if argv is None:
            argv = {
                "inspect": ["inspect", str(ck)],
                "convert": ["convert", str(ck), str(out), "--to", "peft"],
                "merge": ["merge", "--base", str(watch[-1]), "--adapter", str(ck), "--out", str(out), "--quiet"],
            }[entry]
        raised, rc, stdout, stderr = _cli(argv, monkeypatch)
        assert isinstance(raised, errors), f"{entry}: {type(raised).__name__}: {raised}"
        msg = str(raised).replace("\n", " ")
        assert rc == 1 and stdout == "", (rc, stdout)
        assert stderr == f"functuner {argv[0]}: error: {msg}\n", stderr
        assert "internal error" not in stderr
        assert not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in ck.parent.iterdir())
    else:
        if call is None:
            call, snapshots = _library(entry, ck)
        with pytest.raises(errors) as info:
            call()
        msg = str(info.value)
        for s in snapshots or []:
            s.assert_unchanged()
    for m in mentions:
        assert m in msg, f"{entry}: {m!r} not named in: {msg}"
    for f in files:
        f.assert_unchanged()
    return msg


PARAMS = [pytest.param(c, e, id=f"{c.name}-{e}") for c in CASES for e in c.entries]


@pytest.mark.parametrize(("case", "entry"), PARAMS)
def test_malformed_input(
    case: Case, entry: str, sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(sources[case.source], ck)
    case.damage(ck)
    refused_everywhere(entry, ck, [tmp_path, sources["base"]], case.errors, case.mentions(ck), monkeypatch)


def test_every_case_runs_on_every_entry_point_that_reads_it() -> None:
    """The matrix's coverage, spelled out: every adapter case on all seven entry points."""
    assert len({c.name for c in CASES}) == len(CASES)
    for c in CASES:
        assert set(c.entries) <= set(ADAPTER_ENTRIES)
        if c.source == "plain":
            assert c.entries == ADAPTER_ENTRIES, c.name
    assert len(PARAMS) >= 250


# ---------------------------------------------------------------------------
# the base checkpoint (merge reads it): shard index, headers, symlinks
# ---------------------------------------------------------------------------
def _sharded(base: Path, dst: Path) -> Path:
    """``base`` as a two-shard checkpoint with an index (what transformers writes for big models)."""
    shutil.copytree(base, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    wm = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(dst / shard), metadata={"format": "pt"})
        wm.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    return dst


INDEX = "model.safetensors.index.json"


def _index_edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(base: Path) -> None:
        data = json.loads((base / INDEX).read_text())
        change(data)
        (base / INDEX).write_text(json.dumps(data))

    return damage


FIRST = "lm_head.weight"
BASE_CASES = {
    "weight_map value a number": (_index_edit(lambda d: d["weight_map"].__setitem__(FIRST, 5)), ["weight_map", FIRST]),
    "weight_map a list": (_index_edit(lambda d: d.__setitem__("weight_map", [1, 2])), ["weight_map"]),
    "index metadata a string": (_index_edit(lambda d: d.__setitem__("metadata", "x")), ["metadata"]),
    "shard name escaping": (
        _index_edit(lambda d: d["weight_map"].__setitem__(FIRST, "../model.safetensors")),
        ["weight_map", FIRST],
    ),
    "index not JSON": (lambda b: (b / INDEX).write_text("{not json"), ["JSON"]),
    "index non-UTF-8": (lambda b: (b / INDEX).write_bytes(b'{"weight_map": "\xff"}'), ["UTF-8"]),
    "index deeply nested": (
        lambda b: (b / INDEX).write_text('{"a":' + "[" * 100_000 + "]" * 100_000 + "}"),
        ["nested"],
    ),
    "shard header shape negative": (
        lambda b: _header_edit(b / "model-00001-of-00002.safetensors", FIRST, "shape", "[-64, 32]"),
        [FIRST, "'shape'"],
    ),
    "shard header offsets floats": (
        lambda b: _header_edit(b / "model-00001-of-00002.safetensors", FIRST, "data_offsets", "[0.5, 8192]"),
        [FIRST, "'data_offsets'"],
    ),
    "shard symlinked outside": (
        lambda b: (
            shutil.move(b / "model-00002-of-00002.safetensors", b.parent / "outside.safetensors"),
            (b / "model-00002-of-00002.safetensors").symlink_to(b.parent / "outside.safetensors"),
        ),
        ["model-00002-of-00002.safetensors", "outside"],
    ),
    "other file symlinked outside": (
        lambda b: (
            (b.parent / "secret.txt").write_text("secret"),
            (b / "README.md").symlink_to(b.parent / "secret.txt"),
        ),
        ["README.md", "outside"],
    ),
}


@pytest.mark.parametrize("name", sorted(BASE_CASES))
def test_malformed_base_checkpoint_for_merge(
    name: str, sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _sharded(sources["base"], tmp_path / "base")
    damage, mentions = BASE_CASES[name]
    damage(base)
    ck = tmp_path / "ck"
    shutil.copytree(sources["plain"], ck)
    refused_everywhere("merge", ck, [tmp_path, base], (CheckpointError,), mentions, monkeypatch)


def test_the_sharded_base_merges(sources: dict[str, Path], tmp_path: Path) -> None:
    """Control for the base cases: the undamaged two-shard base merges."""
    base = _sharded(sources["base"], tmp_path / "base")
    rc = cli_main(
        ["merge", "--base", str(base), "--adapter", str(sources["plain"]), "--out", str(tmp_path / "o"), "--quiet"]
    )
    assert rc == 0 and (tmp_path / "o" / INDEX).is_file()


# ---------------------------------------------------------------------------
# arguments: output paths, adapter names
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["inside", "contains"])
@pytest.mark.parametrize("command", ["convert", "merge"])
def test_output_inside_the_input_is_refused(
    command: str, where: str, sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = tmp_path / "work" / "ck" if where == "contains" else tmp_path / "ck"
    shutil.copytree(sources["plain"], ck)
    out = ck / "out" if where == "inside" else ck.parent
    argv = {
        "convert": ["convert", str(ck), str(out), "--to", "peft", "--overwrite"],
        "merge": ["merge", "--base", str(sources["base"]), "--adapter", str(ck), "--out", str(out), "--overwrite"],
    }[command]
    files = DirSnapshot(tmp_path)
    with monkeypatch.context() as m:
        m.setenv("FUNCTUNER_DEBUG", "1")
        with pytest.raises(Exception) as info, contextlib.redirect_stdout(io.StringIO()):
            cli_main(argv)
    assert str(out) in str(info.value) and "must not" in str(info.value)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(argv) == 1
    assert err.getvalue() == f"functuner {command}: error: {info.value}\n"
    files.assert_unchanged()


def test_merge_output_inside_the_base_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(sources["base"], base)
    files = DirSnapshot(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main(["merge", "--base", str(base), "--adapter", str(sources["plain"]), "--out", str(base / "merged")])
    assert rc == 1 and "must not" in err.getvalue() and str(base) in err.getvalue()
    files.assert_unchanged()


def test_convert_never_follows_symlinks_out_of_the_source(sources: dict[str, Path], tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(sources["plain"], ck)
    (tmp_path / "secret").write_text("the secret")
    (ck / "README.md").symlink_to(tmp_path / "secret")
    assert cli_main(["convert", str(ck), str(tmp_path / "out"), "--to", "peft"]) == 0
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and all(b"the secret" not in p.read_bytes() for p in written)
    assert not (tmp_path / "out" / "README.md").exists()


BAD_NAMES = {"too long (256 bytes)": "x" * 256, "NUL": "a\x00b", "slash": "a/b", "backslash": "a\\b", "dot-dot": ".."}


@pytest.mark.parametrize("bad", sorted(BAD_NAMES))
@pytest.mark.parametrize("entry", ["functional", "shim", "load_adapter", "prepare_model", "save"])
def test_names_that_cannot_be_a_path_component(
    entry: str, bad: str, sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = BAD_NAMES[bad]
    ck = tmp_path / "ck"
    shutil.copytree(sources["plain"], ck)
    target = lora_llama(seed=2, names=("mine",))
    calls: dict[str, Callable[[], Any]] = {
        "functional": lambda: ft.load(ck, tiny_llama(), adapter_name=name),
        "shim": lambda: Swift.from_pretrained(target, str(ck), adapter_name={"default": name}),
        "load_adapter": lambda: target.load_adapter(str(ck), adapter_name=name),
        "prepare_model": lambda: Swift.prepare_model(target, {name: LoRAConfig(r=2, target_modules=["k_proj"])}),
        "save": lambda: target.save_pretrained(str(tmp_path / "saved"), adapter_name=name),
    }
    refused_everywhere(
        entry, ck, [tmp_path], (AdapterNameError,), [repr(name)[:20]], monkeypatch,
        call=calls[entry], snapshots=[ModelSnapshot(target)],
    )  # fmt: skip


def test_a_255_byte_name_round_trips(sources: dict[str, Path], tmp_path: Path) -> None:
    """The longest allowed name is saved and loaded (temporary siblings keep within NAME_MAX)."""
    name = "n" * 255
    sm = Swift.from_pretrained(tiny_llama(), str(sources["plain"]), adapter_name={"default": name})
    sm.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / name / ST).is_file()
    again = Swift.from_pretrained(tiny_llama(), str(tmp_path / "out"))
    assert list(again.adapters) == [name]


def test_adapter_name_mappings_that_collide(sources: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    ck = tmp_path / "ck"
    lora_llama(seed=1, names=("a", "b")).save_pretrained(ck)
    target = lora_llama(seed=2, names=("mine",))
    for mapping, mentions in (({"a": "c", "b": "c"}, ["'a'", "'b'", "'c'"]), ({"a": "mine"}, ["'mine'"])):
        refused_everywhere(
            "shim", ck, [tmp_path], (AdapterNameError, ConfigError), mentions, monkeypatch,
            call=lambda mapping=mapping: Swift.from_pretrained(target, str(ck), adapter_name=mapping),
            snapshots=[ModelSnapshot(target)],
        )  # fmt: skip


@pytest.mark.parametrize("source", ["plain", "extra"])
def test_the_good_inputs_pass_every_entry_point(
    source: str, sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: the undamaged copies load everywhere (so every refusal above is the damage's doing)."""
    ck = tmp_path / "ck"
    shutil.copytree(sources[source], ck)
    entries = ADAPTER_ENTRIES if source == "plain" else EXTRA_ENTRIES
    for entry in entries:
        if entry in ("inspect", "convert", "merge"):
            out = tmp_path / f"{entry}-out"
            argv = {
                "inspect": ["inspect", str(ck)],
                "convert": ["convert", str(ck), str(out), "--to", "swift" if source == "extra" else "peft"],
                "merge": ["merge", "--base", str(sources["base"]), "--adapter", str(ck), "--out", str(out), "--quiet"],
            }[entry]
            if source == "extra" and entry == "convert":
                continue  # a SWIFT directory is already SWIFT, and PEFT cannot hold extra states
            with contextlib.redirect_stdout(io.StringIO()):
                assert cli_main(argv) == 0, entry
        else:
            call, _ = _library(entry, ck)
            call()
    if source == "extra":  # merge put the saved norm weight in place of the base's
        merged = load_file(str(tmp_path / "merge-out" / "model.safetensors"))
        assert torch.equal(merged[EXTRA], load_file(str(ck / "extra_states" / ST))[EXTRA])


@pytest.mark.parametrize("writer", ["shim", "functional"])
def test_a_save_hitting_a_file_size_limit_is_a_typed_error(
    writer: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    """``RLIMIT_FSIZE`` makes safetensors' write fail (EFBIG): a ``CheckpointError`` naming the file, old data kept."""
    import resource
    import signal

    ck = tmp_path / "ck"
    shutil.copytree(sources["plain"], ck)
    files = DirSnapshot(ck)
    sm = lora_llama(seed=5)
    params = ft.init(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), generator=0)
    report = tmp_path / "report"
    with warnings.catch_warnings():  # Python 3.12+ warns about fork() in a threaded process; the child only saves
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the limit applies to this child only
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            try:
                sm.save_pretrained(str(ck)) if writer == "shim" else ft.save(params, ck)
            except FunctunerError as e:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
                report.write_text(f"{type(e).__name__}\n{e}")
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    kind, msg = report.read_text().split("\n", 1)
    assert kind == "CheckpointError" and "adapter_model.safetensors" in msg and "unchanged" in msg, msg
    files.assert_unchanged()
