"""ReFT side by side: ms-swift's ReFT (pyreft's interventions through pyvene) and functuner's native ReFT.

Run by ``tests/fixtures/tuner_reverse_interop.py``: :func:`swift_side` in ``check`` (ms-swift's venv, which
needs ``pyreft==0.1.0`` and ``pyvene==0.1.8``, installed with ``--no-deps`` by ``.ci/run``), then
:func:`functuner_side` in ``verify`` (functuner's venv).  One direction only, ms-swift -> functuner, and
outputs only, for reasons outside our control:

* pyreft creates its interventions in bfloat16 and SWIFT's JSON ``args`` cannot name a torch dtype, so
  ms-swift's ReFT runs only on bfloat16 models; here the prepared model is cast to float32 (``.float()``)
  so both libraries compute in float32 and compare to 1e-5.
* ms-swift saves ReFT through pyreft's ``save_intervention``: one ``intkey_<component>.bin`` per layer
  whose keys depend on the intervention type (LoReFT's ``state_dict`` is ``weight``, ``bias``,
  ``rotate_layer``).  functuner reads that layout (:mod:`functuner.io.tuner_files`, torch's restricted
  loader only) but writes ``adapter_model.safetensors`` with ``<layer>.reft_<adapter>.*`` keys; and
  pyreft's ``load_intervention`` loads with ``map_location='cuda:0'``, so ms-swift cannot load any ReFT
  checkpoint on a CPU-only machine.  So the direction is ms-swift -> functuner: functuner's
  ``Swift.from_pretrained`` loads the directory ms-swift wrote and must give SWIFT's outputs and the
  tensors SWIFT's live interventions use (the effective orthonormal ``R`` of the parametrized
  ``rotate_layer``, recorded by :func:`swift_side`); its config must re-save byte for byte.
* Trainable names differ by construction (pyvene's ``interventions.comp_model.layers[0]_output...``
  against functuner's ``model.layers.0.reft_default.*``); their number per layer is compared.

The ``.bin`` layout, both directions: :func:`functuner_write` (``write``, functuner's venv) saves each case
with ``save_pretrained(..., safe_serialization=False)`` (pyreft's ``intkey_*.bin`` files) and re-reads them
to the same params; :func:`swift_side` loads those files into SWIFT's interventions (``load_state_dict`` of
``torch.load(weights_only=True)``, as ``load_intervention`` does but on the CPU), must give functuner's
outputs, and re-saves them: file names, ``adapter_config.json`` bytes, and each file's keys (in order),
dtypes and tensors must equal functuner's bitwise.  :func:`functuner_side` re-saves the directory ms-swift
wrote as ``.bin`` and compares it with ms-swift's files bitwise, except the columns torch's orthogonal
parametrization adds to ``R`` in ``...weight.0.base``: pyreft draws them at random (``torch.randn`` in
torch's ``right_inverse``), functuner completes ``R`` deterministically (checked orthonormal instead).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: shared builders
from models import checksum, logits, tiny_llama  # noqa: E402

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
#: ``{case: ReftConfig keyword arguments}`` (SWIFT's ``args`` is a JSON string); every intervention type.
CASES: dict[str, dict[str, Any]] = {
    "loreft": {"model_type": "llama", "r": 2},
    "noreft_layer1": {
        "model_type": "llama",
        "r": 2,
        "layers": [1],
        "intervention_type": "NoreftIntervention",
        "args": '{"add_bias": false}',
    },
    "consreft": {"model_type": "llama", "r": 2, "intervention_type": "ConsreftIntervention"},
    "lobireft": {"model_type": "llama", "r": 2, "intervention_type": "LobireftIntervention"},
    "direft": {"model_type": "llama", "r": 3, "intervention_type": "DireftIntervention"},
    "nodireft": {
        "model_type": "llama",
        "r": 2,
        "intervention_type": "NodireftIntervention",
        "args": '{"add_bias": false}',
    },
}
#: pyreft's attribute for each of functuner's tensor names (a module stands for its ``weight``)
_NAMES = ("rotate_layer", "learned_source.weight", "learned_source.bias", "learned_source", "proj_layer.weight")


def _effective(intervention: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors pyreft's forward uses, under functuner's names (``rotate_layer``: the orthonormal ``R``)."""
    out = {}
    for name in _NAMES:
        node: Any = intervention
        for part in name.split("."):
            node = getattr(node, part, None)
        if isinstance(node, torch.nn.Module):
            node = getattr(node, "weight", None)
        if isinstance(node, torch.Tensor) and not (name == "learned_source" and node.dim() != 1):
            out[name] = node.detach().clone().contiguous()
    return out


def swift_side(root: str) -> tuple[int, int]:
    """ms-swift builds each case, records outputs and the effective tensors, saves its config."""
    try:
        import pyreft  # noqa: F401  # ms-swift's ReFT imports it lazily
    except ImportError as e:
        print(f"FAIL reft: ms-swift's ReFT needs pyreft ({e}); .ci/run installs pyreft==0.1.0 pyvene==0.1.8")
        return 0, 1
    from swift.tuners import ReftConfig, Swift

    passed = failed = 0
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, Any] = {}
    for case, kwargs in CASES.items():
        model = tiny_llama()
        tensors[f"{case}.base_checksum"] = torch.tensor(checksum(model), dtype=torch.float64)
        with torch.no_grad():
            base = logits(model(IDS)).clone()
        torch.manual_seed(11)
        sm = Swift.prepare_model(model, ReftConfig(**kwargs))
        sm.float()  # pyreft's interventions are bfloat16; compare in float32
        sm.eval()
        with torch.no_grad():
            out = logits(sm(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=None))
        moved = float((out - base).abs().max())
        ok = moved > 1e-3  # the scenario would prove nothing if the interventions did nothing
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'ok  ' if ok else 'FAIL'} reft {case}: SWIFT's interventions change the output (by {moved:.3g})")
        tensors[f"{case}.output"] = out.contiguous()
        for key, iv in sm.base_model.interventions.items():
            layer = int(re.search(r"\[(\d+)\]", key).group(1))  # type: ignore[union-attr]
            for name, t in _effective(iv).items():
                tensors[f"{case}:model.layers.{layer}.reft_default.{name}"] = t
        trainable = [n for n, p in sm.named_parameters() if p.requires_grad]
        records[case] = {"trainable": len(trainable), "layers": len(sm.base_model.interventions)}
        folder = os.path.join(root, "swift_reft", case)
        sm.save_pretrained(folder)
        for ok, what, detail in _load_functuner_bin(sm, case, root):
            passed, failed = passed + ok, failed + (not ok)
            print(f"{'ok  ' if ok else 'FAIL'} reft {what}{'' if ok else ': ' + detail}")
    save_file(tensors, os.path.join(root, "swift_reft.safetensors"))
    with open(os.path.join(root, "swift_reft.json"), "w") as f:
        json.dump(records, f, indent=1, sort_keys=True)
    return passed, failed


def functuner_side(root: str) -> tuple[int, int]:
    """functuner reads SWIFT's config file, runs SWIFT's tensors, and re-saves the config byte for byte."""
    import tempfile

    import functuner as ft

    ref = load_file(os.path.join(root, "swift_reft.safetensors"))
    with open(os.path.join(root, "swift_reft.json")) as f:
        records = json.load(f)
    passed = failed = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal passed, failed
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'ok  ' if ok else 'FAIL'} reft {what}{'' if ok else ': ' + detail}")

    for case in CASES:
        model = tiny_llama()
        if checksum(model) != float(ref[f"{case}.base_checksum"]):
            report(False, case, "the base model differs between the venvs")
            continue
        config_path = os.path.join(root, "swift_reft", case, "default", "adapter_config.json")
        cfg = ft.ReftConfig.from_pretrained(os.path.dirname(config_path))
        with tempfile.TemporaryDirectory() as d:
            cfg.save_pretrained(d)
            with open(os.path.join(d, "adapter_config.json"), "rb") as f, open(config_path, "rb") as g:
                ours, theirs = f.read(), g.read()
        report(ours == theirs, f"{case} config re-saved byte for byte", f"functuner {ours!r} vs SWIFT {theirs!r}")
        mine = {k.split(":", 1)[1]: v for k, v in ref.items() if k.startswith(f"{case}:")}
        # the directory ms-swift wrote (pyreft's intkey_*.bin files), loaded as it is
        sm = ft.Swift.from_pretrained(model, os.path.join(root, "swift_reft", case), is_trainable=True)
        params = sm.adapters["default"].params
        report(set(params) == set(mine), f"{case} tensor names", f"{sorted(set(params) ^ set(mine))[:6]}")
        if set(params) != set(mine):
            continue
        close = all(torch.allclose(params[k], mine[k], rtol=0, atol=1e-6) for k in mine)
        report(close, f"{case} tensors read from SWIFT's intkey files", "differ from SWIFT's live interventions")
        sm.eval()
        with torch.no_grad():
            out = logits(sm(IDS))
        diff = float((out - ref[f"{case}.output"]).abs().max())
        report(diff <= 1e-5, f"{case} outputs", f"max |functuner - SWIFT| = {diff}")
        for ok, what, detail in _resave_swift_bin(sm, case, root):
            report(ok, what, detail)
        per_layer = len(params) / records[case]["layers"]  # names differ by construction (module docstring)
        want = records[case]["trainable"] / records[case]["layers"]
        report(per_layer == want, f"{case} trainable tensors per layer", f"functuner {per_layer} vs SWIFT {want}")
    return passed, failed


_BASE = "rotate_layer.parametrizations.weight.0.base"
_ORIGINAL = "rotate_layer.parametrizations.weight.original"
Check = tuple[bool, str, str]


def _same_files(ours: str, theirs: str, case: str, completion_free: bool = False) -> list[Check]:
    """Two adapter folders hold the same files: names, config bytes, and each ``.bin``'s keys, dtypes, tensors.

    ``completion_free``: ``base``'s columns past ``R`` (random in pyreft) are checked orthonormal, not equal.
    """
    names = sorted(os.listdir(ours))
    if names != sorted(os.listdir(theirs)):
        return [(False, f"{case} .bin file names", f"functuner {names} vs SWIFT {sorted(os.listdir(theirs))}")]
    out: list[Check] = [(True, f"{case} .bin file names ({len(names) - 1} intkey files)", "")]
    for name in names:
        a_path, b_path = os.path.join(ours, name), os.path.join(theirs, name)
        if not name.endswith(".bin"):
            with open(a_path, "rb") as f, open(b_path, "rb") as g:
                a_bytes, b_bytes = f.read(), g.read()
            out.append((a_bytes == b_bytes, f"{case} {name} byte for byte", f"{a_bytes!r} vs {b_bytes!r}"))
            continue
        a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
        bad = [k for k in b if k not in a or a[k].dtype != b[k].dtype or a[k].shape != b[k].shape]
        if list(a) != list(b) or bad:
            out.append((False, f"{case} {name} keys", f"functuner {list(a)} vs SWIFT {list(b)}; differ: {bad}"))
            continue
        differ = []
        for k in b:
            x, y = a[k], b[k]
            if completion_free and k == _BASE:
                r = a[_ORIGINAL].shape[1]
                eye = torch.eye(x.shape[0], dtype=torch.float64)
                x, y = x[:, :r], y[:, :r]
                err = float((a[k].double().T @ a[k].double() - eye).abs().max())
                out.append((err < 1e-5, f"{case} {name} base completion orthonormal", f"|B^T B - I| = {err}"))
            if not torch.equal(x, y):
                differ.append(f"{k} (max |diff| {float((x.double() - y.double()).abs().max())})")
        what = f"{case} {name}: keys {list(b)}, dtypes and tensors bitwise"
        out.append((not differ, what + (" (base: R's columns)" if completion_free and _BASE in b else ""), str(differ)))
    return out


def functuner_write(root: str) -> int:
    """functuner builds each case, saves it with ``safe_serialization=False`` and re-reads it; 1 if any failed."""
    import warnings

    import functuner as ft

    tensors: dict[str, torch.Tensor] = {}
    failed = 0
    for case, kwargs in CASES.items():
        model = tiny_llama()
        tensors[f"{case}.base_checksum"] = torch.tensor(checksum(model), dtype=torch.float64)
        torch.manual_seed(5)
        sm = ft.Swift.prepare_model(model, ft.ReftConfig(**kwargs))
        sm.eval()
        with torch.no_grad():
            tensors[f"{case}.output"] = logits(sm(IDS)).contiguous()
        folder = os.path.join(root, "functuner_reft_bin", case)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sm.save_pretrained(folder, safe_serialization=False)
        names = sorted(os.listdir(os.path.join(folder, "default")))
        params = sm.adapters["default"].params
        again = ft.Swift.from_pretrained(tiny_llama(), folder, is_trainable=True).adapters["default"].params
        checks = [
            (any("safetensors" in str(w.message) for w in caught), "warns, recommending safetensors", str(caught)),
            (
                names[0] == "adapter_config.json" and all(n.startswith("intkey_") for n in names[1:]),
                "writes adapter_config.json and intkey_*.bin only",
                str(names),
            ),
            (
                set(again) == set(params)
                and all(again[k].dtype == params[k].dtype and torch.equal(again[k], params[k]) for k in params),
                "re-reads its .bin files to the same params (bitwise)",
                str(sorted(set(again) ^ set(params))),
            ),
        ]
        for ok, what, detail in checks:
            failed += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} reft {case} safe_serialization=False {what}{'' if ok else ': ' + detail}"
            )
    save_file(tensors, os.path.join(root, "functuner_reft.safetensors"))
    return 1 if failed else 0


def _load_functuner_bin(sm: Any, case: str, root: str) -> list[Check]:
    """SWIFT's interventions load functuner's ``.bin`` files: functuner's outputs, and SWIFT re-saves them bitwise."""
    ours = os.path.join(root, "functuner_reft_bin", case, "default")
    ref_path = os.path.join(root, "functuner_reft.safetensors")
    if not os.path.isfile(ref_path):
        return [(False, f"{case} functuner's .bin files", f"{ref_path} missing: run the write step first")]
    ref = load_file(ref_path)
    if float(ref[f"{case}.base_checksum"]) != checksum(tiny_llama()):
        return [(False, f"{case} functuner's .bin files", "the base model differs between the venvs")]
    for key, iv in sm.base_model.interventions.items():
        iv.load_state_dict(torch.load(os.path.join(ours, f"intkey_{key}.bin"), weights_only=True))
    with torch.no_grad():
        out = logits(sm(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=None))
    diff = float((out - ref[f"{case}.output"]).abs().max())
    checks: list[Check] = [(diff <= 1e-5, f"{case} SWIFT on functuner's .bin files: outputs", f"max diff {diff}")]
    theirs = os.path.join(root, "swift_reft_from_functuner", case)
    sm.save_pretrained(theirs)
    return checks + _same_files(ours, os.path.join(theirs, "default"), f"{case} (functuner -> SWIFT)")


def _resave_swift_bin(sm: Any, case: str, root: str) -> list[Check]:
    """functuner re-saves the directory ms-swift wrote as ``.bin``: ms-swift's files (but ``base``'s completion)."""
    import tempfile
    import warnings

    with tempfile.TemporaryDirectory() as d:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the safetensors recommendation (checked in write)
            sm.save_pretrained(d, safe_serialization=False)
        theirs = os.path.join(root, "swift_reft", case, "default")
        return _same_files(os.path.join(d, "default"), theirs, f"{case} (SWIFT -> functuner)", completion_free=True)
