"""Hub ids through the real clients, offline: Hugging Face Hub (``huggingface_hub``) and ModelScope (``modelscope``).

Which hub is explicit: ``hf://`` / ``ms://`` or ``hub=``; a bare ``owner/name`` is ModelScope (SWIFT's
default) unless ``USE_HF=1``.  A filesystem-looking path never reaches a hub.  The caches are built on disk
in the layout each client reads (``models--owner--name/snapshots/<commit>`` + ``refs/main`` for Hugging
Face, ``models/owner--name/snapshots/master`` for ModelScope) and read without network: ``local_files_only``
in-process, and ``HF_HOME`` + ``HF_HUB_OFFLINE=1`` / ``MODELSCOPE_CACHE`` in a fresh interpreter (the
clients read those variables at import).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given
from hypothesis import strategies as st

import functuner as ft
from functuner import LoRAConfig, Swift
from functuner.core.hub import default_hub, resolve_model_dir, split_hub
from functuner.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
IDS = torch.arange(12).view(2, 6)


def _trained():
    torch.manual_seed(0)
    sm = Swift.prepare_model(
        tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        want = sm(IDS).logits
    return sm, want


def _hf_cache(root: Path, repo: str, sm, peft_format: bool) -> Path:
    """``root/models--owner--name/{refs/main, snapshots/<commit>/...}``: huggingface_hub's cache layout."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snap = repo_dir / "snapshots" / COMMIT
    sm.save_pretrained(snap, peft_format=peft_format)
    return snap


def _ms_cache(root: Path, repo: str, sm) -> Path:
    """``root/models/owner--name/snapshots/master``: modelscope's cache layout."""
    snap = root / "models" / repo.replace("/", "--") / "snapshots" / "master"
    sm.save_pretrained(snap)
    return snap


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ---------------------------------------------------------------------------
# which hub: the rules
# ---------------------------------------------------------------------------
def test_prefix_and_argument_choose_the_hub(monkeypatch) -> None:
    monkeypatch.delenv("USE_HF", raising=False)
    assert split_hub("hf://owner/name") == ("hf", "owner/name")
    assert split_hub("ms://owner/name") == ("ms", "owner/name")
    assert split_hub("modelscope://owner/name") == ("ms", "owner/name")
    assert split_hub("huggingface://owner/name") == ("hf", "owner/name")
    assert split_hub("owner/name", hub="hf") == ("hf", "owner/name")
    assert split_hub("owner/name", hub="modelscope") == ("ms", "owner/name")
    assert split_hub("hf://owner/name", hub="huggingface") == ("hf", "owner/name")
    assert split_hub("owner/name") == ("ms", "owner/name") and default_hub() == "ms"  # SWIFT's default
    monkeypatch.setenv("USE_HF", "1")  # SWIFT's own switch
    assert split_hub("owner/name") == ("hf", "owner/name") and default_hub() == "hf"
    with pytest.raises(ConfigError, match="hub='ms'"):
        split_hub("hf://owner/name", hub="ms")
    with pytest.raises(ConfigError, match="unknown hub 'github'"):
        split_hub("owner/name", hub="github")
    with pytest.raises(ConfigError, match="unknown hub 's3'"):
        split_hub("s3://bucket/key")


@given(
    st.sampled_from(["/abs/{}", "./{}", "../{}", "~/{}", "~{}", ".\\{}", "C:\\{}", "C:/{}"]),
    st.from_regex(r"[a-z]{1,8}/[a-z]{1,8}", fullmatch=True),
)
def test_filesystem_looking_paths_are_never_hub_ids(pattern: str, rest: str) -> None:
    where, path = split_hub(pattern.format(rest), hub="hf")
    assert where is None and path == pattern.format(rest)


def test_missing_local_paths_never_reach_a_hub(tmp_path: Path, monkeypatch) -> None:
    """A typo in a local path fails at once, names the path, and leaves no hub cache folders behind."""
    ms_cache, hf_cache = tmp_path / "ms", tmp_path / "hf"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(ms_cache))
    (tmp_path / "outputs").mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for path in [
            str(tmp_path / "outputs" / "chekpoint"),  # absolute
            "outputs/chekpoint",  # relative, parent exists
            "./ckpt/default",
            "../nowhere/at-all",
            "~/surely-not-here-functuner/x",
        ]:
            with pytest.raises(CheckpointError, match="no such file or directory.*no hub was asked"):
                resolve_model_dir(path, cache_dir=hf_cache)
            with pytest.raises(CheckpointError, match="no such file or directory"):
                Swift.from_pretrained(tiny_llama(), path)
            with pytest.raises(CheckpointError, match="no such file or directory"):
                ft.load(path)
    finally:
        os.chdir(cwd)
    assert not ms_cache.exists() and not hf_cache.exists()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_dir(tmp_path / "file.txt")
    with pytest.raises(CheckpointError, match="not a Hugging Face Hub id"):
        resolve_model_dir("hf://no-slash")


# ---------------------------------------------------------------------------
# both hubs, offline, in-process (explicit cache_dir + local_files_only)
# ---------------------------------------------------------------------------
def test_hugging_face_hub_id_loads_from_its_cache(tmp_path: Path) -> None:
    sm, want = _trained()
    cache = tmp_path / "hf"
    _hf_cache(cache, "someone/tiny-lora", sm, peft_format=True)  # what PEFT users push
    kw = {"cache_dir": str(cache), "local_files_only": True}
    for model_id, extra in [("hf://someone/tiny-lora", {}), ("someone/tiny-lora", {"hub": "hf"})]:
        loaded = Swift.from_pretrained(tiny_llama(), model_id, **kw, **extra)
        assert torch.equal(_logits(loaded), want), model_id
        params = ft.load(model_id, tiny_llama(), **kw, **extra)
        assert torch.equal(ft.apply(tiny_llama(), params, (IDS,)).logits, want), model_id
    with pytest.raises(CheckpointError, match="'hf://someone/absent': the Hugging Face Hub could not provide it"):
        ft.load("hf://someone/absent", **kw)
    with pytest.raises(CheckpointError, match="ModelScope hub could not provide it"):  # bare id: ModelScope
        ft.load("someone/tiny-lora", **kw)


def test_modelscope_id_loads_from_its_cache(tmp_path: Path) -> None:
    sm, want = _trained()
    cache = tmp_path / "ms"
    _ms_cache(cache, "someone/tiny-lora", sm)
    kw = {"cache_dir": str(cache), "local_files_only": True}
    for model_id, extra in [
        ("ms://someone/tiny-lora", {}),
        ("someone/tiny-lora", {}),
        ("someone/tiny-lora", {"hub": "ms"}),
    ]:
        loaded = Swift.from_pretrained(tiny_llama(), model_id, **kw, **extra)
        assert torch.equal(_logits(loaded), want), model_id
        params = ft.load(model_id, tiny_llama(), **kw, **extra)
        assert torch.equal(ft.apply(tiny_llama(), params, (IDS,)).logits, want), model_id
    with pytest.raises(CheckpointError, match="'ms://someone/absent': the ModelScope hub could not provide it"):
        Swift.from_pretrained(tiny_llama(), "ms://someone/absent", **kw)


# ---------------------------------------------------------------------------
# the clients' own environment variables (read at import: a fresh interpreter)
# ---------------------------------------------------------------------------
def test_hub_environment_variables_offline(tmp_path: Path) -> None:
    sm, want = _trained()
    _hf_cache(tmp_path / "hf_home" / "hub", "someone/hf-lora", sm, peft_format=True)
    _ms_cache(tmp_path / "ms_cache", "someone/ms-lora", sm)
    torch.save(want, tmp_path / "want.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from conftest import tiny_llama
        import functuner as ft
        from functuner import Swift
        want = torch.load({str(tmp_path / "want.pt")!r})
        ids = torch.arange(12).view(2, 6)
        def same(model):
            with torch.no_grad():
                assert torch.equal(model(ids).logits, want)
        same(Swift.from_pretrained(tiny_llama(), "hf://someone/hf-lora"))  # HF_HOME + HF_HUB_OFFLINE=1
        params = ft.load("hf://someone/hf-lora", tiny_llama())
        assert torch.equal(ft.apply(tiny_llama(), params, (ids,)).logits, want)
        same(Swift.from_pretrained(tiny_llama(), "ms://someone/ms-lora", local_files_only=True))  # MODELSCOPE_CACHE
        same(Swift.from_pretrained(tiny_llama(), "someone/ms-lora", local_files_only=True))  # bare id: ModelScope
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "MODELSCOPE", "USE_HF"))}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        MODELSCOPE_CACHE=str(tmp_path / "ms_cache"),
        PYTHONWARNINGS="ignore",
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
