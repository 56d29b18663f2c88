"""The residual-base guard of PiSSA/OLoRA/CorDA adapters (``functuner.tuners.lora.inits.guard``).

Such an adapter was trained on the residual base ``W - s B0 A0``; merging it into
the original ``W`` is wrong without any visible sign.  Every merge path
(functional merge on a model and on a weights mapping, the CLI's streaming
merge, the shim) must accept the residual base, refuse the original one and
refuse a base it cannot verify (an adapter saved by PEFT records only
``init_lora_weights``) until the caller marks it.  Checked against the real
``peft`` (its own PiSSA checkpoints, its loader on our PEFT export, its merge).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import functuner as ft
from functuner.errors import ConfigError
from functuner.tuners.lora.inits.guard import TOLERANCE, fingerprint
from tests.models import tiny_llama
from tests.tuners.lora.test_lora_peft_cases import MLP

X = torch.arange(90).view(9, 10)
KW: dict[str, Any] = {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 8, "init_lora_weights": "pissa"}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def _trained(init: ft.LoraInit, seed: int = 1) -> ft.TunerParams:
    g = torch.Generator().manual_seed(seed)
    return init.params.map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g))


def _residual_model(model: nn.Module, init: ft.LoraInit) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.load_state_dict(init.base_weights, strict=False)
    return clone


def test_fingerprint_tells_original_from_residual_and_tolerates_rounding() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    cfg = ft.LoRAConfig(target_modules=["0"], r=2, init_lora_weights="pissa")
    model = nn.Sequential(nn.Linear(48, 64, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    init = ft.lora_init(model, cfg, generator=0)
    entry = init.params.config.base_fingerprint["0.weight"]
    assert entry["original"] == fingerprint(w) and entry["residual"] == fingerprint(init.base_weights["0.weight"])
    assert fingerprint(w) == fingerprint(w.clone())  # deterministic
    scale = entry["original"][0]

    def dist(a: list[float], b: list[float]) -> float:
        d = [x - y for x, y in zip(a, b, strict=True)]
        return max(abs(d[0]), (sum(x * x for x in d[1:]) / len(d[1:])) ** 0.5) / scale

    assert dist(fingerprint(w.bfloat16()), entry["original"]) < TOLERANCE / 3  # dtype rounding: a match
    assert dist(entry["original"], entry["residual"]) > 4 * TOLERANCE  # the moved rank-2 part: no match
    # inits that leave the base alone record nothing (and are never refused)
    for init_kind in (True, "gaussian", "orthogonal"):
        params = ft.init(model, ft.LoRAConfig(target_modules=["0"], r=2, init_lora_weights=init_kind), generator=0)
        assert params.config.base_fingerprint is None
        ft.merge(model, params)


@pytest.mark.parametrize("init_kind", ["pissa", "olora", "pissa_niter_2"])
def test_functional_merge_refuses_the_original_base_and_accepts_the_residual(init_kind: str) -> None:
    model = _mlp()
    init = ft.lora_init(model, ft.LoRAConfig(**{**KW, "init_lora_weights": init_kind}), generator=0)
    trained = _trained(init)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for target in (model, model.state_dict()):
        with pytest.raises(ConfigError, match=r"'lin0\.weight' holds the ORIGINAL.*lora_to_plain"):
            ft.merge(target, trained)
    with pytest.raises(ConfigError, match=r"functuner.validate: 'lin0\.weight' holds the ORIGINAL"):
        ft.validate(model, trained)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    residual = _residual_model(model, init)
    ft.validate(residual, trained)
    expected = ft.apply(residual, trained, (X,))
    for target in (residual, residual.state_dict(), {**model.state_dict(), **init.base_weights}):
        merged = ft.merge(target, trained)
        torch.testing.assert_close(torch.func.functional_call(model, merged, (X,)), expected, atol=1e-5, rtol=1e-5)
    # the residual in bf16 (as a half-precision model would hold it) is still that residual
    bf16 = {k: v.bfloat16() for k, v in residual.state_dict().items()}
    ft.merge(bf16, trained)
    # a weight from another model is neither
    other = {**residual.state_dict(), "lin1.weight": torch.randn(2, 20)}
    with pytest.raises(ConfigError, match=r"'lin1\.weight' matches neither"):
        ft.merge(other, trained)
    # converted to a plain delta on the original weights: nothing to guard, merges into the original
    plain = ft.lora_to_plain(trained, init.params)
    assert plain.config.base_fingerprint is None
    merged = ft.merge(model, plain)
    torch.testing.assert_close(torch.func.functional_call(model, merged, (X,)), expected, atol=1e-5, rtol=1e-5)


def test_corda_is_guarded_too() -> None:
    model = _mlp()
    cfg = ft.LoRAConfig(target_modules=["lin0"], r=2, init_lora_weights="corda")
    init = ft.lora_init(model, cfg, generator=0, data={"lin0": torch.eye(10) + 0.1})
    with pytest.raises(ConfigError, match="ORIGINAL"):
        ft.merge(model, init.params)
    ft.merge(_residual_model(model, init), init.params)


def test_swift_checkpoint_keeps_the_fingerprint_and_peft_format_leaves_it_out(tmp_path: Path) -> None:
    model = _mlp()
    init = ft.lora_init(model, ft.LoRAConfig(**KW), generator=0)
    trained = _trained(init)
    residual = _residual_model(model, init)
    expected = ft.apply(residual, trained, (X,))
    swift_dir = ft.save(trained, tmp_path / "swift")
    data = json.loads((swift_dir / "default" / "adapter_config.json").read_text())
    assert set(data["base_fingerprint"]) == {"lin0.weight", "lin1.weight"}
    with pytest.raises(ConfigError, match=r"functuner.validate: 'lin0\.weight' holds the ORIGINAL"):
        ft.load(swift_dir, model)  # loaded onto the original weights it would run wrong: refused
    assert ft.load(swift_dir, residual).config.base_fingerprint == trained.config.base_fingerprint
    back = ft.load(swift_dir)  # no model: nothing to check until it meets one
    assert back.config.base_fingerprint == trained.config.base_fingerprint
    with pytest.raises(ConfigError, match="ORIGINAL"):
        ft.merge(model, back)
    ft.merge(residual, back)
    # a plain LoRA config written in code still has no such field (SWIFT's file unchanged)
    plain_dir = ft.save(ft.init(model, ft.LoRAConfig(target_modules=["lin0"]), generator=0), tmp_path / "plain")
    assert "base_fingerprint" not in json.loads((plain_dir / "default" / "adapter_config.json").read_text())
    # PEFT's format: the field stays out, PEFT loads it without a warning and runs it as before
    peft_dir = ft.save(trained, tmp_path / "peft", format="peft")
    assert "base_fingerprint" not in json.loads((peft_dir / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(peft_dir)).eval()
    torch.testing.assert_close(theirs(X), expected, atol=1e-5, rtol=1e-5)
    # ...and read back by functuner it cannot be verified: refused on either base until marked
    unverified = ft.load(peft_dir, model)
    for target in (model, residual.state_dict()):
        with pytest.raises(ConfigError, match="records no base_fingerprint.*lora_mark_residual_base"):
            ft.merge(target, unverified)
    marked = ft.lora_mark_residual_base(unverified, residual)
    merged = ft.merge(residual.state_dict(), marked)
    torch.testing.assert_close(torch.func.functional_call(model, merged, (X,)), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="matches neither"):
        ft.merge(model, marked)


def test_peft_saved_pissa_adapter_needs_marking_then_merges_as_peft(tmp_path: Path) -> None:
    model = _mlp()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**KW)).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    pm.save_pretrained(str(tmp_path / "by_peft"))
    residual_state = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in pm.state_dict().items()
    }
    residual_state = {k: v for k, v in residual_state.items() if "lora_" not in k}
    params = ft.load(tmp_path / "by_peft", model)
    assert params.config.base_fingerprint is None
    with pytest.raises(ConfigError, match="records no base_fingerprint"):
        ft.merge(model, params)
    merged = ft.merge(residual_state, ft.lora_mark_residual_base(params, residual_state))
    theirs = pm.merge_and_unload()
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(merged[k], v, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="only PiSSA/OLoRA/CorDA"):
        ft.lora_mark_residual_base(ft.init(model, ft.LoRAConfig(target_modules=["lin0"]), generator=0), model)


def test_shim_writes_the_residual_once_and_merges(tmp_path: Path) -> None:
    model = _mlp()
    sm = ft.Swift.prepare_model(copy.deepcopy(model), ft.LoRAConfig(**KW))
    out = sm(X)
    merged = ft.Swift.merge_and_unload(sm)  # the shim's model holds the residual: accepted
    torch.testing.assert_close(merged(X), out, atol=1e-5, rtol=1e-5)
    init = ft.lora_init(model, ft.LoRAConfig(**KW), generator=0)
    trained = _trained(init)
    swift_dir = ft.save(trained, tmp_path / "swift")
    expected = ft.apply(_residual_model(model, init), trained, (X,))
    loaded = ft.Swift.from_pretrained(copy.deepcopy(model), str(swift_dir))  # original base: decomposed, as PEFT
    torch.testing.assert_close(loaded(X), expected, atol=1e-5, rtol=1e-5)
    # a model that already holds the residual must not be decomposed a second time
    with pytest.raises(ConfigError, match=r"'lin0\.weight' already holds the residual"):
        ft.Swift.from_pretrained(_residual_model(model, init), str(swift_dir))


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("guard_cli")
    base = tiny_llama()
    base.save_pretrained(root / "original", max_shard_size="20KB")
    cfg = ft.LoRAConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4, init_lora_weights="pissa")
    init = ft.lora_init(base, cfg, generator=0)
    trained = _trained(init)
    residual = copy.deepcopy(base)
    residual.load_state_dict(init.base_weights, strict=False)
    residual.save_pretrained(root / "residual")
    ft.save(trained, root / "swift")
    ft.save(trained, root / "peft", format="peft")
    return {"root": root, "trained": trained, "residual": residual}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    code = "import sys; from functuner.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_merge_refuses_the_original_base_and_merges_the_residual(llama_dirs: dict[str, Any]) -> None:
    root = llama_dirs["root"]
    res = _cli("merge", "--base", str(root / "original"), "--adapter", str(root / "swift"), "--out", str(root / "o1"))
    assert res.returncode == 1 and "holds the ORIGINAL base weight" in res.stderr and "lora_to_plain" in res.stderr
    assert not (root / "o1").exists()  # nothing half-written
    res = _cli("merge", "--base", str(root / "original"), "--adapter", str(root / "peft"), "--out", str(root / "o2"))
    assert res.returncode == 1 and "records no base_fingerprint" in res.stderr, res.stderr
    assert not (root / "o2").exists()
    res = _cli("merge", "--base", str(root / "residual"), "--adapter", str(root / "swift"), "--out", str(root / "o3"))
    assert res.returncode == 0, res.stderr
    got = load_file(root / "o3" / "model.safetensors")
    expected = ft.merge(llama_dirs["residual"], llama_dirs["trained"])
    for k, v in got.items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-6)


def test_cli_merges_a_peft_format_adapter_once_marked_and_saved(llama_dirs: dict[str, Any]) -> None:
    root = llama_dirs["root"]
    marked = ft.lora_mark_residual_base(ft.load(root / "peft"), llama_dirs["residual"])
    ft.save(marked, root / "marked")
    res = _cli("merge", "--base", str(root / "residual"), "--adapter", str(root / "marked"), "--out", str(root / "o4"))
    assert res.returncode == 0, res.stderr
    got = load_file(root / "o4" / "model.safetensors")
    expected = ft.merge(llama_dirs["residual"], llama_dirs["trained"])
    for k, v in got.items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-6)
    res = _cli("merge", "--base", str(root / "original"), "--adapter", str(root / "marked"), "--out", str(root / "o5"))
    assert res.returncode == 1 and "matches neither" in res.stderr and not (root / "o5").exists()
