"""The documentation site builds with ``mkdocs build --strict`` and no warnings.

Strict mode turns broken links, pages missing from the nav, nav entries without a
page and mkdocstrings failures (an API reference entry for a name that no longer
exists) into errors, so the site cannot silently rot. The code blocks themselves
run in ``tests/project/test_docs.py``.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def test_mkdocs_build_strict_has_no_warnings(tmp_path: pathlib.Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    warnings = [line for line in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not warnings, "\n".join(warnings)
    assert (tmp_path / "site" / "index.html").is_file()
    reference = (tmp_path / "site" / "reference" / "functional" / "index.html").read_text()
    for name in (
        "functuner.functional.init",
        "functuner.functional.apply",
        "functuner.functional.merge",
        "functuner.functional.unmerge",
        "functuner.core.params.TunerParams",
    ):
        assert f'id="{name}"' in reference, f"{name} is missing from the generated API reference"
    shim = (tmp_path / "site" / "reference" / "shim" / "index.html").read_text()
    assert 'id="functuner.shim.swift.SwiftModel"' in shim and 'id="functuner.shim.swift.Swift"' in shim
    # docstrings' Sphinx roles are rendered (mkdocs_hooks.py), cross-linked where the target has a page
    for page in (reference, shim):
        assert not re.search(r":(func|class|mod|meth|attr|data|exc):<code>", page)
    assert 'href="#functuner.errors.ConfigError"' in reference


def _load_mkdocs_yml() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml names a Python function for the mermaid fence; the test only needs the nav
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: suffix)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def test_every_doc_page_is_in_the_nav() -> None:
    pages = set(_nav_pages(_load_mkdocs_yml()["nav"]))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk <= pages, f"pages missing from mkdocs.yml's nav: {sorted(on_disk - pages)}"
    # tuners/ also holds the machinery every tuner shares (not tuners themselves)
    machinery = {"base", "spec", "registry", "config_json", "sub_batch"}
    tuner_dir = ROOT / "functuner" / "tuners"
    tuners = {p.stem for p in tuner_dir.glob("*.py") if not p.stem.startswith("_")} - machinery
    tuners |= {p.name for p in tuner_dir.iterdir() if (p / "__init__.py").is_file()}  # package tuners (lora/)
    documented = {pathlib.PurePath(p).stem for p in pages if p.startswith("tuners/")}
    assert tuners <= documented, f"tuners without a page: {sorted(tuners - documented)}"
    from functuner.tuners import REGISTRY

    registered = {t.config_cls.__module__.split(".")[2] for t in REGISTRY.values()}  # functuner.tuners.<name>[...]
    assert registered <= documented, f"registered tuners without a page: {sorted(registered - documented)}"
