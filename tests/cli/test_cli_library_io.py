"""The console script on the library's disk layer: first-hour behaviour, refusals, and agreement with the shim.

Run for real (subprocesses of the installed ``functuner`` script, or ``main``
in this process for variants), on folders written by PEFT's and functuner's
own ``save_pretrained`` and by ``transformers``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

import functuner as ft
from functuner import Swift
from functuner.errors import CheckpointError
from functuner.tuners.adapter import AdapterConfig
from functuner.tuners.neftune import NEFTuneConfig

FUNCTUNER = shutil.which("functuner")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("FUNCTUNER_DEBUG", None)
CFG, ST = "adapter_config.json", "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def run(*args: str, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    assert FUNCTUNER, "the functuner console script is not installed (pip install -e .)"
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(
        [FUNCTUNER, *args], capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=pre, check=False
    )


def run_here(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    from functuner.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["functuner", *args], code, out, err)


def assert_error(res: subprocess.CompletedProcess[str], command: str, *fragments: str) -> str:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"functuner {command}: error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lib_io")
    tiny_llama().save_pretrained(root / "base")
    torch.manual_seed(3)
    pm = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(root / "peft")
    sm = Swift.prepare_model(tiny_llama(), ft.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    sm.save_pretrained(str(root / "swift"))
    Swift.prepare_model(tiny_llama(), NEFTuneConfig(noise_alpha=5.0)).save_pretrained(str(root / "neftune"))
    Swift.prepare_model(tiny_llama(), AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=4)).save_pretrained(
        str(root / "adapter")
    )
    return {"root": root, "base": root / "base", "peft": root / "peft", "swift": root / "swift"} | {
        n: root / n for n in ("neftune", "adapter")
    }


def _damaged(dirs: dict[str, Path], tmp_path: Path, *, config: dict | None = None, tensors=None) -> Path:
    """A copy of the PEFT adapter with config fields replaced and/or its tensors changed."""
    dst = tmp_path / "bad"
    shutil.copytree(dirs["peft"], dst)
    if config:
        data = json.loads((dst / CFG).read_text())
        (dst / CFG).write_text(json.dumps({**data, **config}))
    if tensors is not None:
        state = load_file(dst / ST)
        tensors(state)
        save_file(state, str(dst / ST))
    return dst


# ---------------------------------------------------------------------------
# first hour: --version, --help, no torch for parsing
# ---------------------------------------------------------------------------
def test_version_and_help() -> None:
    res = run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"functuner {ft.__version__}", res
    res = run("convert", "--help")
    assert res.returncode == 0
    for text in ("SRC", "DST", "adapter directory to read", "new directory to write", "--to {peft,swift}", "target"):
        assert text in res.stdout, (text, res.stdout)
    res = run("merge", "--help")
    assert "record the dtype in config.json" in " ".join(res.stdout.split())


@pytest.mark.parametrize(
    "argv, code", [(["--help"], 0), (["--version"], 0), (["convert", "--help"], 0), (["convert"], 2), (["nope"], 2)]
)
def test_parsing_never_imports_torch(argv: list[str], code: int) -> None:
    script = (
        "import sys\nfrom functuner.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
        "print('RESULT', rc, 'torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert f"RESULT {code} False" in res.stdout, (res.stdout, res.stderr)


# ---------------------------------------------------------------------------
# merge --dtype writes config.json's dtype
# ---------------------------------------------------------------------------
def test_merge_dtype_is_recorded_so_transformers_loads_it(dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    res = run(
        "merge", "--base", str(dirs["base"]), "--adapter", str(dirs["peft"]), "--out", str(out), "--dtype", "bf16"
    )
    assert res.returncode == 0, res.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config.get("torch_dtype", "bfloat16") == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# inspect / convert on SWIFT tuners written by functuner's own shim
# ---------------------------------------------------------------------------
def test_inspect_and_convert_a_neftune_folder(dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert sorted(p.name for p in (dirs["neftune"] / "default").iterdir()) == [CFG]
    res = run("inspect", str(dirs["neftune"]))
    assert res.returncode == 0, res.stderr
    assert "[neftune, swift layout]" in res.stdout and "noise_alpha=5.0" in res.stdout
    assert "targets:     none saved" in res.stdout and "0 in 0 tensors" in res.stdout
    info = json.loads(run_here(capsys, "inspect", str(dirs["neftune"]), "--json").stdout)
    assert info["adapters"][0]["tuner_type"] == "neftune" and info["adapters"][0]["num_tensors"] == 0
    assert_error(
        run_here(capsys, "convert", str(dirs["neftune"]), str(tmp_path / "p"), "--to", "peft"),
        "convert",
        "neftune adapters have no PEFT format",
        str(dirs["neftune"] / "default" / CFG),
    )
    assert_error(
        run_here(capsys, "convert", str(dirs["neftune"]), str(tmp_path / "s"), "--to", "swift"),
        "convert",
        "already in SWIFT format",
    )
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


def test_inspect_an_adapter_tuner_folder(dirs: dict[str, Path], capsys) -> None:
    res = run("inspect", str(dirs["adapter"]))
    assert res.returncode == 0, res.stderr
    assert "[ADAPTER, swift layout]" in res.stdout
    assert "targets:     2 modules: model.layers.0.mlp, model.layers.1.mlp" in res.stdout
    assert "ranks:" not in res.stdout
    info = json.loads(run_here(capsys, "inspect", str(dirs["adapter"]), "--json").stdout)["adapters"][0]
    file = load_file(dirs["adapter"] / "default" / ST)
    assert info["num_parameters"] == sum(t.numel() for t in file.values()) and info["num_tensors"] == len(file)


# ---------------------------------------------------------------------------
# refusals: the library's readers, one line naming file and field, nothing written
# ---------------------------------------------------------------------------
def _nan(state: dict[str, torch.Tensor]) -> None:
    state[Q_A][0, 0] = float("nan")


def _int32(state: dict[str, torch.Tensor]) -> None:
    state[Q_A] = state[Q_A].to(torch.int32)


REFUSALS = {
    "rank": (dict(config={"r": 8}), (CFG, "field r=8", "rank 4")),
    "nan": (dict(tensors=_nan), (ST, Q_A, "NaN")),
    "alpha": (dict(config={"lora_alpha": float("inf")}), (CFG, "lora_alpha")),
    "int32": (dict(tensors=_int32), (CFG, "q_proj.lora_A.default.weight", "int32")),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_merge_and_inspect_refuse_bad_adapters(case: str, dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    damage, fragments = REFUSALS[case]
    bad = _damaged(dirs, tmp_path, **damage)
    if case == "alpha":
        assert "Infinity" in (bad / CFG).read_text()
    out = tmp_path / "out"
    via_script = case == "rank"
    call = run if via_script else (lambda *a: run_here(capsys, *a))
    line = assert_error(call("merge", "--base", str(dirs["base"]), "--adapter", str(bad), "--out", str(out)), "merge")
    assert str(bad) in line and all(f in line for f in fragments), line
    assert_error(call("inspect", str(bad)), "inspect", str(bad), *fragments)
    assert_error(call("convert", str(bad), str(tmp_path / "c"), "--to", "swift"), "convert", str(bad), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_merge_out_inside_the_base_is_refused(dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    base = tmp_path / "base"
    shutil.copytree(dirs["base"], base)
    before = sorted(p.name for p in base.iterdir())
    for out in (base / "merged", base / ".base.tmp-x" / "out", base):
        res = run_here(capsys, "merge", "--base", str(base), "--adapter", str(dirs["peft"]), "--out", str(out))
        assert_error(res, "merge", str(out), "must not be the base checkpoint")
    assert sorted(p.name for p in base.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_convert_copies_no_symlinked_content(dirs: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(dirs["swift"], src)
    (src / "README.md").symlink_to("/etc/hostname")
    (src / "notes.txt").write_text("kept")
    res = run("convert", str(src), str(tmp_path / "p"), "--to", "peft")
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "p" / "README.md").exists() and not (tmp_path / "p" / "README.md").is_symlink()
    assert (tmp_path / "p" / "notes.txt").read_text() == "kept"


def test_convert_modes_follow_the_umask(dirs: dict[str, Path], tmp_path: Path) -> None:
    for to, src in (("peft", dirs["swift"]), ("swift", dirs["peft"])):
        out = tmp_path / to
        assert run("convert", str(src), str(out), "--to", to, umask=0o022).returncode == 0
        for p in [out, *out.rglob("*")]:
            assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p
    out = tmp_path / "merged"
    res = run("merge", "--base", str(dirs["base"]), "--adapter", str(dirs["peft"]), "--out", str(out), umask=0o022)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "field, value, says",
    [("lr_ratio", 16.0, "field 'lr_ratio' is unknown"), ("model_key_mapping", {"a": "b"}, "model_key_mapping=")],
)
def test_convert_and_save_to_peft_format_give_the_same_answer(
    field: str, value: object, says: str, dirs: dict[str, Path], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(dirs["swift"], src)
    cfg = src / "default" / CFG
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), field: value}))
    line = assert_error(run("convert", str(src), str(tmp_path / "cli"), "--to", "peft"), "convert", str(cfg), says)
    with pytest.raises(CheckpointError) as info:
        Swift.save_to_peft_format(str(src), str(tmp_path / "lib"))
    assert str(info.value) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
