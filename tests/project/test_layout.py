"""The package layout's rules, checked on the source (one home per concern).

* no import cycle between functuner's modules, counting every import: top-level, inside functions
  and under ``TYPE_CHECKING``;
* no module imports a ``_private`` name from another package (same-package helpers are fine);
* the shim (``functuner/shim``) and the disk layer (``functuner/io``, ``functuner/cli``) never import a
  specific tuner module nor test ``isinstance`` against a tuner's config class: they call ``Tuner`` hooks;
* no library file over 600 lines.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "functuner"
MAX_LINES = 600


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (f, is_pkg)
    return out


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, str]]:
    """``(target module, imported name)`` for every ``from ... import`` / ``import`` anywhere in ``module``."""
    path, is_pkg = MODULES[module]
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(target, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, name in _imports(m):
            if f"{target}.{name}" in MODULES:
                edges[m].add(f"{target}.{name}")
            elif target in MODULES:
                edges[m].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_layout_has_one_folder_per_concern() -> None:
    for folder in ("core", "tuners", "io", "shim", "cli"):
        assert (PKG / folder / "__init__.py").is_file(), folder


def test_no_import_cycles() -> None:
    assert _cycles(_edges()) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    # the check itself must not pass vacuously
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_private_names_from_other_packages() -> None:
    bad = []
    for m in MODULES:
        here = m.rsplit(".", 1)[0] if not MODULES[m][1] else m
        for target, name in _imports(m):
            private = name.startswith("_") and not name.startswith("__")
            if private and target.startswith("functuner") and target != here:
                bad.append(f"{m} imports {target}.{name}")
    assert bad == []


def test_shim_and_disk_layer_know_no_tuner_type() -> None:
    tuner_modules = {m for m in MODULES if m.startswith("functuner.tuners.")} - {
        "functuner.tuners.base",
        "functuner.tuners.spec",
        "functuner.tuners.registry",
        "functuner.tuners.config_json",
    }
    config_classes = {
        node.name
        for m in tuner_modules
        for node in ast.walk(ast.parse(MODULES[m][0].read_text()))
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and node.name != "TunerConfig"
    }
    assert {"LoRAConfig", "PartConfig", "LongLoRAConfig"} <= config_classes
    bad = []
    for m in MODULES:
        if not m.startswith(("functuner.shim", "functuner.io", "functuner.cli.main")):
            continue
        bad += [f"{m} imports {t}.{n}" for t, n in _imports(m) if t in tuner_modules or f"{t}.{n}" in tuner_modules]
        for node in ast.walk(ast.parse(MODULES[m][0].read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if names & config_classes:
                    bad.append(f"{m}:{node.lineno} isinstance against {sorted(names & config_classes)}")
    assert bad == []


def test_no_library_file_over_the_limit() -> None:
    long = {
        str(p.relative_to(ROOT)): n for p, _ in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
