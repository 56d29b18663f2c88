"""Side-by-side scenarios: the same calls through functuner and through the real ms-swift 4.6, compared.

Run by ``tests/fixtures/tuner_reverse_interop.py`` (``write`` in functuner's venv, ``check`` in
ms-swift's, ``verify`` in functuner's again; ``.ci/run`` does all three).  A case is a model and a
sequence of ``prepare_model`` calls (:func:`_cases`: one LoRA-family/LLaMA-Pro/NEFTune adapter;
:func:`_sequences`: Adapter, Prompt, Side, Part, Res-Tuning, SCEdit, and several adapters on one
model).  ``write`` trains nothing: it gives each adapter perturbed params, records the outputs,
trainable names and optimizer groups after ``prepare_model``, saves with ``save_pretrained`` and
records what functuner does after ``Swift.from_pretrained(model, dir, is_trainable=True)`` (the
call ms-swift's resume code makes): outputs, trainable names, optimizer param groups, the active
set after ``set_active_adapters`` with an unknown name, the tensors of
``save_pretrained(safe_serialization=False)``.  ``check`` (ms-swift) loads functuner's checkpoint
and compares each item and its own re-save (tensors, config bytes); then makes the same
``prepare_model`` calls itself and compares config files, saved keys, trainable names and groups,
and, with functuner's tensors loaded, outputs and saved tensors; it writes its own checkpoints.
``verify`` (functuner) loads those: SWIFT's outputs, trainable names and groups, and its re-save
gives SWIFT's files back, every ``adapter_config.json`` byte for byte.  LLaMA-Pro's ``prepare_model``
inserts real layers in both libraries: the whole expanded model (every weight, ``num_hidden_layers``,
``layer_types``) is compared too, and so is the functional ``llamapro.expand``.  Where ms-swift is
demonstrably wrong functuner keeps its behaviour; :data:`DIFFERENCES` states each such difference
exactly (the check fails if it is any other) and docs/swift.md lists them.

ReFT is compared in ``reft_scenario.py`` (outputs and config, ms-swift -> functuner; its docstring says
why the checkpoints cannot be).  NEFTune's noise is random (the config-only checkpoint, trainability and
the saved model are compared).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: shared builders
from differences import DIFFERENCES, OUT_TOL, REVERSE_REFUSED  # noqa: E402  # the expected differences
from models import RESTUNING_VIT, checksum, logits, tiny_bert, tiny_glm, tiny_llama, tiny_toy, tiny_unet, tiny_vit  # noqa: E402,E501

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))  # ToyImageNet (Side)
SMALL_PIXELS = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))  # the small ViT and the UNet


# SWIFT's MergedLinear LoRA on a fused query_key_value: q and v chunks adapted, k not
_MERGED_LINEAR = {"r": 2, "lora_alpha": 4, "target_modules": ["query_key_value"], "use_merged_linear": True}
_MERGED_LINEAR["enable_lora"] = [True, False, True]


def _cases() -> dict[str, tuple[Callable[[], torch.nn.Module], str, dict[str, Any]]]:
    """``{case: (model builder, config class name, keyword arguments)}``, the same in both libraries."""
    return {
        "lora": (tiny_llama, "LoRAConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"], "bias": "none"}),
        "lora_bias": (tiny_llama, "LoRAConfig", {"r": 2, "target_modules": ["o_proj"], "lora_alpha": 8}),
        "longlora": (
            tiny_llama,
            "LongLoRAConfig",
            {"r": 2, "target_modules": ["q_proj", "v_proj"], "embedder_and_normalizer": ["embed", "norm"]},
        ),
        "llamapro": (tiny_llama, "LLaMAProConfig", {"model_type": "llama", "num_new_blocks": 2}),
        "neftune": (tiny_llama, "NEFTuneConfig", {"noise_alpha": 5.0}),
        "merged_linear": (tiny_glm, "LoRAConfig", _MERGED_LINEAR),
    }


#: One ``prepare_model`` call: ``(adapter name, config class name, keyword arguments)``.
Step = tuple[str, str, dict[str, Any]]
_LORA_QV = {"r": 2, "target_modules": ["query", "value"]}
_LORA_QV_REGEX = {"r": 2, "target_modules": r".*(query|value).*"}  # also matches names below the targets
_PART_QV = {"target_modules": r".*attention\.self\.(query|value)"}


def _small_vit() -> torch.nn.Module:
    return tiny_vit(0, **RESTUNING_VIT)


def _sequences() -> dict[str, tuple[Callable[[], torch.nn.Module], list[Step], torch.Tensor]]:
    """``{case: (model builder, prepare_model calls in order, input)}``: the tuners beyond LoRA, and the cases of
    several adapters on one model (each step is one ``Swift.prepare_model(model, {name: config})`` call)."""
    adapter = {"dim": 32, "target_modules": r".*layer\.\d+$", "method_name": "feed_forward_chunk", "hidden_pos": 0}
    restuning_4d = {
        "dims": 8,
        "root_modules": r"stem",
        "root_modules_hook": "output",
        "stem_modules": ["down.0", "down.1"],
        "stem_modules_hook": "input",
        "target_modules": r"down\.1",
        "target_modules_hook": "input",
        "upsample_out_channels": [8, None],
        "tuner_cfg": [
            {
                "lateral_cfg": {"res_adapter": {"adapter_length": 4, "adapter_weight": "gate"}},
                "vertical_cfg": "zero",
                "aux_cfg": {"upsample": {}},
            },
            {
                "lateral_cfg": {"res_group_adapter": {"head": 2}},
                "vertical_cfg": {"res_adapter": {"adapter_length": 4, "adapter_weight": "scalar_0.5"}},
            },
        ],
    }
    restuning_vit = {
        "dims": 16,
        "root_modules": r"vit\.embeddings",
        "root_modules_hook": "output",
        "stem_modules": r"vit\.layers\.\d+",
        "stem_modules_hook": "output",
        "target_modules": r"vit\.layernorm",
        "target_modules_hook": "input",
        "tuner_cfg": {
            "lateral_cfg": {"res_adapter": {"adapter_length": 4}},
            "vertical_cfg": {"res_adapter": {"adapter_length": 4, "adapter_weight": "scale_channel"}},
        },
    }
    sce_dec = {"dims": [8, 8], "target_modules": ["up.0", "up.1"], "tuner_mode": "decoder", "down_ratio": 0.5}
    return {
        "adapter": (tiny_bert, [("default", "AdapterConfig", {**adapter, "adapter_length": 8})], IDS),
        "prompt": (
            tiny_bert,
            [
                (
                    "default",
                    "PromptConfig",
                    {"dim": 32, "target_modules": r".*layer\.\d+$", "embedding_pos": 0, "prompt_length": 3},
                )
            ],
            IDS,
        ),
        "side": (tiny_toy, [("default", "SideConfig", {"dim": 32, "target_modules": "backbone"})], PIXELS),
        "part": (tiny_bert, [("default", "PartConfig", {"target_modules": r".*layer\.1\.intermediate\.dense"})], IDS),
        "restuning_vit": (_small_vit, [("default", "ResTuningConfig", restuning_vit)], SMALL_PIXELS),
        "restuning_unet": (tiny_unet, [("default", "ResTuningConfig", restuning_4d)], SMALL_PIXELS),
        "scetuning_decoder": (tiny_unet, [("default", "SCETuningConfig", sce_dec)], SMALL_PIXELS),
        "scetuning_encoder": (
            tiny_unet,
            [("default", "SCETuningConfig", {"dims": 8, "target_modules": "down", "tuner_mode": "encoder"})],
            SMALL_PIXELS,
        ),
        # Part and LoRA on the same modules, both orders: each adapter saves only its own tensors
        "part_then_lora": (tiny_bert, [("p", "PartConfig", _PART_QV), ("l", "LoRAConfig", _LORA_QV)], IDS),
        "lora_then_part": (tiny_bert, [("l", "LoRAConfig", _LORA_QV), ("p", "PartConfig", _PART_QV)], IDS),
        # a second LoRA whose regex also matches the first one's modules
        "lora_then_regex_lora": (
            tiny_bert,
            [("a", "LoRAConfig", _LORA_QV_REGEX), ("b", "LoRAConfig", _LORA_QV_REGEX)],
            IDS,
        ),
        "adapter_prompt_part": (
            tiny_bert,
            [
                ("pt", "PartConfig", {"target_modules": r".*layer\.1\.output\.dense"}),
                ("ad", "AdapterConfig", {**adapter, "adapter_length": 4}),
                (
                    "pr",
                    "PromptConfig",
                    {"dim": 32, "target_modules": r".*layer\.\d+$", "embedding_pos": 0, "prompt_length": 2},
                ),
            ],
            IDS,
        ),
    }


def _all_cases() -> dict[str, tuple[Callable[[], torch.nn.Module], list[Step], torch.Tensor]]:
    """:func:`_cases` (one adapter named ``default``, input ids) and :func:`_sequences`; only the cases named in
    ``$FUNCTUNER_SCENARIOS`` (comma-separated) when it is set (for debugging one case)."""
    out = {case: (build, [("default", cls_name, kwargs)], IDS) for case, (build, cls_name, kwargs) in _cases().items()}
    out.update(_sequences())
    only = os.environ.get("FUNCTUNER_SCENARIOS")
    return {k: v for k, v in out.items() if not only or k in only.split(",")}


def _trainable(model: torch.nn.Module) -> list[str]:
    """Trainable parameter names relative to the wrapped model, in SWIFT's spelling (no ``base_layer.``)."""
    inner = model.base_model if hasattr(model, "base_model") else model
    return sorted(n.replace(".base_layer.", ".") for n, p in inner.named_parameters() if p.requires_grad)


def _groups(model: Any) -> list[dict[str, Any]]:
    """``create_optimizer_param_groups(lr=1e-3, weight_decay=0.1)`` as names, lr and weight decay per group."""
    inner = model.base_model
    names = {id(p): n.replace(".base_layer.", ".") for n, p in inner.named_parameters()}
    try:
        groups = model.create_optimizer_param_groups(lr=1e-3, weight_decay=0.1)
    except ValueError as e:  # recorded, so a documented difference can name SWIFT's error
        return [{"raises": f"{type(e).__name__}: {e}"}]
    return [
        {"params": sorted(names[id(p)] for p in g["params"]), "lr": g.get("lr"), "weight_decay": g["weight_decay"]}
        for g in groups
        if g["params"]
    ]


def _record(model: Any, folder: str, x: torch.Tensor, names: list[str]) -> dict[str, Any]:
    model.eval()
    with torch.no_grad():
        out = logits(model(x))
    rec: dict[str, Any] = {"trainable": _trainable(model), "groups": _groups(model)}
    import warnings

    with warnings.catch_warnings():  # functuner warns about the unknown name and the pickled format
        warnings.simplefilter("ignore")
        model.set_active_adapters([*names, "no_such_adapter"])
        rec["active_after_unknown"] = sorted(model.active_adapters)
        model.save_pretrained(folder, safe_serialization=False)
    rec["bin_files"] = sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".bin")
    )
    return {"record": rec, "output": out}


# ms-swift 4.6's lazy `swift.tuners` does not re-export every config class; these live in submodules
_SWIFT_CONFIG_MODULES = {
    "PartConfig": "swift.tuners.part",
    "SCETuningConfig": "swift.tuners.scetuning.scetuning",
    "LongLoRAConfig": "swift.tuners.longlora.longlora",
}


def swift_config_class(cls_name: str) -> type:
    """ms-swift's config class of that name (``swift.tuners`` or the submodule that defines it)."""
    import importlib

    import swift.tuners

    try:
        return getattr(swift.tuners, cls_name)  # type: ignore[no-any-return]
    except AttributeError:
        return getattr(importlib.import_module(_SWIFT_CONFIG_MODULES[cls_name]), cls_name)  # type: ignore[no-any-return]


def _prepare(lib: Any, build: Callable[[], torch.nn.Module], steps: list[Step], config_class: Any) -> Any:
    """``lib.Swift.prepare_model`` once per step, in order, on a fresh base model."""
    model: Any = build()
    for name, cls_name, kwargs in steps:
        model = lib.Swift.prepare_model(model, {name: config_class(cls_name)(**kwargs)})
    return model


def write(root: str) -> int:
    import functuner as ft
    import functuner.io.keys

    ref: dict[str, torch.Tensor] = {}
    records: dict[str, Any] = {}
    for case, (build, steps, x) in _all_cases().items():
        noise = torch.Generator().manual_seed(7)  # not torch's global RNG: every builder reseeds that
        sm: Any = build()
        params: dict[str, Any] = {}
        for name, cls_name, kwargs in steps:  # each adapter gets perturbed random params (nothing is zero)
            cfg = getattr(ft, cls_name)(**kwargs)
            p = ft.init(build(), cfg, generator=5, adapter_name=name)
            p = p.map(lambda t, g=noise: t + 0.05 * torch.randn(t.shape, generator=g))
            sm = ft.Swift.prepare_model(sm, {name: cfg})
            if len(p):
                sm.load_state_dict(ft.io.keys.to_swift_state_dict(dict(p)), adapter_name=name)
            params[name] = p
        folder = os.path.join(root, "scenarios", case)
        sm.eval()
        with torch.no_grad():
            ref[f"{case}.prepared_output"] = logits(sm(x)).detach().clone()
        prepared = {"trainable": _trainable(sm), "groups": _groups(sm)}
        names = [n for n, _, _ in steps]
        for name in names if len(names) > 1 else ():  # one adapter active: what a documented difference names
            sm.set_active_adapters([name])
            with torch.no_grad():
                ref[f"{case}.only.{name}"] = logits(sm(x)).detach().clone()
        sm.set_active_adapters(names)
        sm.save_pretrained(folder)
        order = names if len(names) > 1 else None
        loaded = ft.Swift.from_pretrained(build(), folder, adapter_name=order, is_trainable=True)
        got = _record(loaded, os.path.join(root, "scenarios_bin", case), x, names)
        records[case] = {**got["record"], **{f"prepared_{k}": v for k, v in prepared.items()}}
        ref[f"{case}.output"] = got["output"].detach().clone()
        ref[f"{case}.base_checksum"] = torch.tensor(checksum(build()), dtype=torch.float64)
        if case == "llamapro":  # the shim's model is SWIFT's: real layers; and the functional form expanded
            whole = {k: v.detach().contiguous() for k, v in sm.base_model.state_dict().items()}
            save_file(whole, os.path.join(root, "llamapro_prepared.safetensors"))
            records["llamapro_prepared_config"] = _layer_config(sm.base_model)
            state, config = ft.tuners.llamapro.expand(build(), params["default"])
            save_file(
                {k: v.contiguous() for k, v in state.items()}, os.path.join(root, "llamapro_expanded.safetensors")
            )
            records["llamapro_expanded_layers"] = int(config.num_hidden_layers)
    save_file(ref, os.path.join(root, "scenarios.safetensors"))
    with open(os.path.join(root, "scenarios.json"), "w") as f:
        json.dump(records, f, indent=1, sort_keys=True)
    return 0


def _layer_config(model: torch.nn.Module) -> dict[str, Any]:
    """What LLaMA-Pro's ``prepare_model`` changes in a transformers config."""
    layer_types = getattr(model.config, "layer_types", None)
    return {"num_hidden_layers": model.config.num_hidden_layers, "layer_types": list(layer_types or [])}


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for d, _, fs in os.walk(folder):
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), folder)
            if f.endswith(".bin"):
                out.update({f"{rel}:{k}": v for k, v in torch.load(os.path.join(d, f), weights_only=True).items()})
            elif f.endswith(".safetensors"):
                out.update({f"{rel}:{k}": v for k, v in load_file(os.path.join(d, f)).items()})
    return out


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, str]:
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    odd = sorted(set(a) ^ set(b))
    detail = f"{len(a)} vs {len(b)} keys, not in both: {odd[:6]}" if odd else "same keys, different values"
    return same, detail


def _configs(folder: str) -> dict[str, bytes]:
    """Every ``adapter_config.json`` under ``folder``: ``{relative path: bytes}``."""
    out = {}
    for d, _, fs in os.walk(folder):
        if "adapter_config.json" in fs:
            with open(os.path.join(d, "adapter_config.json"), "rb") as f:
                out[os.path.relpath(d, folder)] = f.read()
    return out


def _same_configs(ours: dict[str, bytes], theirs: dict[str, bytes]) -> tuple[bool, str]:
    """Byte for byte, except that a LoRA file of SWIFT's may hold more of PEFT's fields than functuner's (the
    fields depend on the peft version; every field functuner writes must be there with the same value)."""
    if ours.keys() != theirs.keys():
        return False, f"config files {sorted(ours)} vs {sorted(theirs)}"
    for rel, a in ours.items():
        if a == theirs[rel]:
            continue
        ja, jb = (
            {k: sorted(v) if k == "target_modules" and isinstance(v, list) else v for k, v in json.loads(c).items()}
            for c in (a, theirs[rel])
        )  # SWIFT writes LoRA's target_modules in set order
        lora = str(ja.get("swift_type")).upper() in ("LORA", "LONGLORA")
        if not lora or any(k not in jb or jb[k] != v for k, v in ja.items()):
            return False, f"{rel}: functuner {a!r} vs SWIFT {theirs[rel]!r}"
    return True, ""


# Differences kept on purpose (docs/swift.md, "Remaining differences"): {(case, item): why}.  The check
# still runs and prints them; it fails if the difference is not exactly the documented one.
DOCUMENTED = {
    ("llamapro", "trainable"): "SWIFT's from_pretrained leaves LLaMA-Pro's loaded blocks frozen (a resume would"
    " train nothing); functuner keeps loaded adapters trainable, as SWIFT does for every other tuner",
    ("llamapro", "groups"): "follows from the trainable difference above",
}


# Cases whose tensors ms-swift 4.6 does not save (documented): its lora_state_dict keeps only keys containing
# ".<adapter>", which MergedLinear's <module>.lora_A / lora_B lack.  Every file comparison expects SWIFT's side
# empty and functuner's not; functuner refuses SWIFT's tensor-less checkpoint (an untrained adapter) by name.
SWIFT_SAVES_NO_TENSORS = {
    "merged_linear": "SWIFT saves no MergedLinear tensor; functuner saves them (SWIFT loads them)"
}


def _same_or_swift_empty(case: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[bool, str]:
    if case in SWIFT_SAVES_NO_TENSORS:
        return not theirs and bool(ours), f"documented: {SWIFT_SAVES_NO_TENSORS[case]}; got {len(theirs)} keys"
    return _same_tensors(ours, theirs)


class _Report:
    def __init__(self) -> None:
        self.passed = self.failed = 0

    def __call__(self, ok: bool, what: str, detail: str = "") -> None:
        self.passed, self.failed = self.passed + ok, self.failed + (not ok)
        print(f"{'ok  ' if ok else 'FAIL'} scenario {what}{'' if ok else ': ' + detail}")

    def pair(self, what: str, result: tuple[bool, str]) -> None:
        """Report ``(ok, detail)`` as returned by the ``_same_*`` helpers."""
        self(result[0], what, result[1])

    def item(self, case: str, item: str, swift_value: Any, ours: Any, result: tuple[bool, str], tag: str = "") -> None:
        """``result`` (``(ok, detail)``), or for a documented difference (:data:`DIFFERENCES`) whether exactly it holds."""
        if (case, item) not in DIFFERENCES:
            return self.pair(f"{case}{tag} {item}", result)
        why, holds = DIFFERENCES[(case, item)]
        what = f"{case}{tag} {item} (documented difference: {why})"
        self(holds(swift_value, ours), what, f"SWIFT {swift_value!r:.400}")


def _adapter_dir(folder: str, name: str) -> str:
    sub = os.path.join(folder, name)
    return sub if os.path.isfile(os.path.join(sub, "adapter_config.json")) else folder


def check(root: str) -> tuple[int, int]:
    """``(passed, failed)`` over every scenario item; prints one ``ok``/``FAIL`` line each.

    Per case: ms-swift loads functuner's checkpoint (outputs, trainable names, optimizer groups, unknown
    adapter names, ``.bin`` files, re-saved tensors and configs), then builds the same adapters itself with
    the same ``prepare_model`` calls (config files, saved keys, trainable names and optimizer groups after
    prepare, and with functuner's tensors loaded: the same files and outputs).  SWIFT's own checkpoints and
    records go to ``<root>/swift_scenarios`` for :func:`verify` (functuner reads what SWIFT wrote).
    """
    import swift.tuners
    from swift.tuners import Swift

    ref = load_file(os.path.join(root, "scenarios.safetensors"))
    with open(os.path.join(root, "scenarios.json")) as f:
        records = json.load(f)
    report = _Report()
    swift_ref: dict[str, torch.Tensor] = {}
    swift_records: dict[str, Any] = {}
    for case, (build, steps, x) in _all_cases().items():
        names = [n for n, _, _ in steps]
        model = build()
        if checksum(model) != float(ref[f"{case}.base_checksum"]):
            report(False, case, "the base model differs between the venvs")
            continue
        folder = os.path.join(root, "scenarios", case)
        # several adapters: loaded in the order they were added (SWIFT's own default order is os.listdir's)
        sm = Swift.from_pretrained(model, folder, adapter_name=names if len(names) > 1 else None, is_trainable=True)
        with tempfile.TemporaryDirectory() as d:
            got = _record(sm, d, x, names)
            theirs_bin = _tensors(d)
        want = records[case]
        diff = float((got["output"] - ref[f"{case}.output"]).abs().max())
        outs = {**{k.rsplit(".", 1)[1]: v for k, v in ref.items() if k.startswith(f"{case}.only.")}}
        outs["all"] = ref[f"{case}.output"]
        report.item(case, "outputs", got["output"], outs, (diff <= OUT_TOL, f"max |SWIFT - functuner| = {diff}"))
        for item in ("trainable", "groups", "active_after_unknown", "bin_files"):
            theirs_item = got["record"][item]
            if (case, item) in DOCUMENTED or (item == "bin_files" and case in SWIFT_SAVES_NO_TENSORS):
                ok = theirs_item == [] and bool(want[item])  # SWIFT has nothing there; functuner has what it saved
                why = DOCUMENTED.get((case, item)) or SWIFT_SAVES_NO_TENSORS[case]
                report(ok, f"{case} {item} (documented difference: {why})", f"{theirs_item}")
                continue
            same = (theirs_item == want[item], f"SWIFT {theirs_item} vs {want[item]}")
            report.item(case, item, theirs_item, want[item], same)
        ours_bin = _tensors(os.path.join(root, "scenarios_bin", case))
        report.item(case, ".bin tensors", theirs_bin, ours_bin, _same_or_swift_empty(case, ours_bin, theirs_bin))
        with tempfile.TemporaryDirectory() as d:  # SWIFT re-saves functuner's checkpoint: same files back
            sm.save_pretrained(d)
            ours_files, theirs_files = _tensors(folder), _tensors(d)
            same = _same_or_swift_empty(case, ours_files, theirs_files)
            report.item(case, "re-saved tensors", theirs_files, ours_files, same)
            report.pair(f"{case} re-saved configs", _same_configs(_configs(folder), _configs(d)))
        # the same prepare_model calls in SWIFT, then functuner's tensors loaded as SWIFT's from_pretrained does
        own = _prepare(swift.tuners, build, steps, swift_config_class)
        own_dir = os.path.join(root, "swift_scenarios", case)
        own.save_pretrained(own_dir)
        report.pair(f"{case} configs of the same calls", _same_configs(_configs(folder), _configs(own_dir)))
        fresh = {k.split(":", 1)[1] for k in _tensors(own_dir)}
        ours_keys = {k.split(":", 1)[1] for k in _tensors(folder)}
        if case in SWIFT_SAVES_NO_TENSORS:  # compared with the keys SWIFT's state_dict holds instead
            fresh = {k for k in own.base_model.state_dict() if ".lora_" in k}
        same = (fresh == ours_keys, f"not in both: {sorted(fresh ^ ours_keys)[:6]}")
        report.item(case, "saved keys", fresh, ours_keys, same)
        own.eval()
        prepared = {"trainable": _trainable(own), "groups": _groups(own)}
        for item, value in prepared.items():
            same = (value == want[f"prepared_{item}"], f"SWIFT {value}")
            report.item(case, f"{item} after prepare", value, want[f"prepared_{item}"], same)
        for name in names:
            adir = _adapter_dir(folder, name)
            if os.path.isfile(os.path.join(adir, "adapter_model.safetensors")):
                own.load_state_dict(load_file(os.path.join(adir, "adapter_model.safetensors")), adapter_name=name)
        with torch.no_grad():
            out = logits(own(x))
        diff = float((out - ref[f"{case}.prepared_output"]).abs().max())
        outs["all"] = ref[f"{case}.prepared_output"]
        same = (diff <= OUT_TOL, f"max |SWIFT - functuner| = {diff}")
        report.item(case, "outputs of the same calls", out, outs, same)
        own.save_pretrained(own_dir)
        ours_files, theirs_files = _tensors(folder), _tensors(own_dir)
        same = _same_or_swift_empty(case, ours_files, theirs_files)
        report.item(case, "tensors of the same calls", theirs_files, ours_files, same)
        if case == "llamapro":  # the same expanded model, functuner's tensors loaded: every weight and the config
            whole = load_file(os.path.join(root, "llamapro_prepared.safetensors"))
            report.pair("llamapro prepared model weights", _same_tensors(whole, dict(own.base_model.state_dict())))
            cfg = _layer_config(own.base_model)
            report(cfg == records["llamapro_prepared_config"], "llamapro prepared config", f"SWIFT {cfg}")
        swift_ref[f"{case}.output"] = out.detach().clone()  # the output of the checkpoint SWIFT wrote
        swift_records[case] = {k: got["record"][k] for k in ("trainable", "groups")}
        if case == "llamapro":  # SWIFT inserted real layers: its model is functuner's expanded model
            inner = sm.base_model
            layers = int(inner.config.num_hidden_layers)
            report(layers == records["llamapro_expanded_layers"], "llamapro expand num_hidden_layers", f"{layers}")
            expanded = load_file(os.path.join(root, "llamapro_expanded.safetensors"))
            report.pair("llamapro expand weights", _same_tensors(expanded, dict(inner.state_dict())))
    save_file(swift_ref, os.path.join(root, "swift_scenarios.safetensors"))
    with open(os.path.join(root, "swift_scenarios.json"), "w") as f:
        json.dump(swift_records, f, indent=1, sort_keys=True)
    return report.passed, report.failed


def verify(root: str) -> tuple[int, int]:
    """functuner reads the checkpoints ms-swift wrote in :func:`check` (``from_pretrained(..., is_trainable=True)``):
    SWIFT's outputs, trainable names and optimizer groups, and ``save_pretrained`` gives SWIFT's files back
    (every ``adapter_config.json`` byte for byte, LoRA's PEFT bookkeeping fields included; the same tensors)."""
    import functuner as ft

    ref = load_file(os.path.join(root, "swift_scenarios.safetensors"))
    with open(os.path.join(root, "swift_scenarios.json")) as f:
        swift_records = json.load(f)
    with open(os.path.join(root, "scenarios.json")) as f:
        records = json.load(f)
    report = _Report()
    for case, (build, _steps, x) in _all_cases().items():
        if case not in swift_records:
            report(False, f"{case} (reverse)", "ms-swift wrote no checkpoint for it")
            continue
        folder = os.path.join(root, "swift_scenarios", case)
        order = [n for n, _, _ in _steps] if len(_steps) > 1 else None
        if case in SWIFT_SAVES_NO_TENSORS or case in REVERSE_REFUSED:  # functuner refuses it by the keys
            try:
                ft.Swift.from_pretrained(build(), folder, adapter_name=order, is_trainable=True)
                refused = ""
            except ft.errors.ParamsMismatchError as e:
                refused = str(e)
            word, why = REVERSE_REFUSED.get(case, ("missing", SWIFT_SAVES_NO_TENSORS.get(case)))
            report(word in refused, f"{case} (reverse) refused: {why}", refused)
            continue
        sm = ft.Swift.from_pretrained(build(), folder, adapter_name=order, is_trainable=True)
        sm.eval()
        with torch.no_grad():
            out = logits(sm(x))
        diff = float((out - ref[f"{case}.output"]).abs().max())
        report(diff <= 1e-5, f"{case} (reverse) outputs", f"max |functuner - SWIFT| = {diff}")
        for item in ("trainable", "groups"):
            mine = _trainable(sm) if item == "trainable" else _groups(sm)
            want = records[case][item] if (case, item) in DOCUMENTED else swift_records[case][item]
            note = " (documented difference: functuner's own)" if (case, item) in DOCUMENTED else ""
            same = (mine == want, f"functuner {mine} vs {want}")
            report.item(case, f"{item}{note}", swift_records[case][item], mine, same, tag=" (reverse)")
        with tempfile.TemporaryDirectory() as d:
            sm.save_pretrained(d)
            theirs, ours = _configs(folder), _configs(d)
            same = theirs == ours
            report(same, f"{case} (reverse) re-saved configs, byte for byte", f"SWIFT {theirs} vs functuner {ours}")
            report.pair(f"{case} (reverse) re-saved tensors", _same_tensors(_tensors(folder), _tensors(d)))
    return report.passed, report.failed
