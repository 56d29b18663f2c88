"""Adapter checkpoint load (issue item 4): functuner vs plain ``safetensors`` vs PEFT's ``from_pretrained``.

One adapter saved by PEFT's own ``save_pretrained`` (``adapter_config.json`` +
``adapter_model.safetensors``) in a temporary folder; every row reads that folder.

* ``safetensors``: ``safetensors.torch.load_file`` of the weights file alone.  It maps the file
  lazily, so it has not read the data yet when it returns.
* ``safetensors + read``: the same plus one pass over every tensor (``sum``), i.e. the
  data actually read once: the floor for any loader that checks what it loads.
* ``functuner``: ``functuner.io.checkpoint.read_adapter`` (config parsing, key
  renaming, strict checks) + ``TunerParams`` + ``functuner.validate`` against the model.
* ``peft``: ``PeftModel.from_pretrained(base, folder)`` on a fresh copy of the
  base model each time (the copy is untimed setup).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

import functuner as ft

from . import common as C


def _functuner_loader() -> tuple[str, Any]:
    """functuner's checkpoint reader if present, else the functional path (safetensors + key renaming)."""
    try:
        from functuner.io.checkpoint import read_adapter
    except ImportError:
        read_adapter = None
    if read_adapter is not None:

        def load(folder: str) -> ft.TunerParams:
            ck = read_adapter(folder, "default")
            return ft.TunerParams(ck.state, ck.config, "default")

        return "functuner.io.checkpoint.read_adapter", load

    import json

    from safetensors.torch import load_file

    def load_functional(folder: str) -> ft.TunerParams:
        data = json.loads((Path(folder) / "adapter_config.json").read_text())
        cfg = ft.LoRAConfig.from_dict(data, strict=False)
        state = ft.from_peft_state_dict(load_file(str(Path(folder) / "adapter_model.safetensors")), "default")
        return ft.TunerParams(state, cfg, "default")

    return "safetensors + functuner.from_peft_state_dict", load_functional


def run(s: C.Settings) -> C.Report:
    from peft import PeftModel
    from safetensors.torch import load_file

    shape = s.shape
    report = C.Report("Adapter checkpoint load (item 4)")
    base = C.build_llama(shape)
    params = ft.init(base, C.lora_config(shape), generator=0)
    ids, _ = C.batch(shape)
    how, ft_load = _functuner_loader()
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "adapter")
        C.peft_lora(base, params).save_pretrained(folder)
        weights = Path(folder) / "adapter_model.safetensors"
        size = weights.stat().st_size

        def f_ft() -> ft.TunerParams:
            p = ft_load(folder)
            ft.validate(base, p)
            return p

        loaded = f_ft()
        if set(loaded) != set(params):
            raise AssertionError(f"load: key sets differ: {sorted(set(loaded) ^ set(params))[:4]}")
        for k in params:
            if not torch.equal(loaded[k], params[k]):
                raise AssertionError(f"load: tensor {k} differs from what was saved")
        report.check(f"functuner load returns all {len(params)} saved tensors bit-exactly")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), folder)
        with torch.inference_mode():
            diff = C.assert_close(
                "load: functuner vs peft outputs", ft.apply(base, loaded, (ids,)).logits, pm(input_ids=ids).logits
            )
        report.check(f"outputs with the loaded adapter == PEFT's loaded model (max |diff| {diff:.1e})")

        def f_read() -> None:
            for t in load_file(str(weights)).values():
                t.sum()

        swift_folder = str(Path(tmp) / "swift")
        ft.save(params, swift_folder)  # the SWIFT layout: Swift.from_pretrained reads it into a SwiftModel

        def f_shim(m: torch.nn.Module) -> Any:
            return ft.Swift.from_pretrained(m, swift_folder)

        with torch.inference_mode():
            diff = C.assert_close(
                "load: shim vs peft outputs",
                f_shim(copy.deepcopy(base))(input_ids=ids).logits,
                pm(input_ids=ids).logits,
            )
        report.check(f"Swift.from_pretrained outputs == PEFT's loaded model (max |diff| {diff:.1e})")

        fns = {
            "safetensors": lambda: load_file(str(weights)),
            "shim": (lambda: copy.deepcopy(base), f_shim),
            "safetensors + read": f_read,
            "functuner": f_ft,
            "peft": (lambda: copy.deepcopy(base), lambda m: PeftModel.from_pretrained(m, folder)),
        }
        times = C.interleaved(fns, warmup=s.warmup, repeats=s.repeats * 5)
    report.add("functuner / safetensors alone", C.ratio(times["functuner"], times["safetensors"]), 1.2)
    report.add(
        "functuner / (safetensors + one read pass)", C.ratio(times["functuner"], times["safetensors + read"]), 1.2
    )
    report.add("functuner / peft", C.ratio(times["functuner"], times["peft"]), 0.1)
    report.add("shim Swift.from_pretrained / safetensors alone", C.ratio(times["shim"], times["safetensors"]), 1.5)
    report.add("shim Swift.from_pretrained / peft", C.ratio(times["shim"], times["peft"]))
    report.add("peft / safetensors alone", C.ratio(times["peft"], times["safetensors"]))
    report.info(
        "adapter file", f"{C.mib(size)}, {len(params)} tensors; safetensors alone {times['safetensors'] * 1e3:.2f} ms"
    )
    report.notes.append(f"functuner row = {how} + TunerParams + functuner.validate")
    return report
