"""Every ```python block in docs/ and README.md runs (so the docs cannot drift from the code).

Blocks are run in file order, each file in a fresh namespace. A block fenced as
```text or ```bash is shown, not run.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FILES = sorted([*ROOT.glob("docs/**/*.md"), ROOT / "README.md"])
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(path: pathlib.Path) -> list[str]:
    return BLOCK.findall(path.read_text())


DOCS = [p for p in FILES if p.exists() and _blocks(p)]


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_code_blocks_run(path: pathlib.Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__doc__"}
    for i, code in enumerate(_blocks(path)):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"{path.relative_to(ROOT)} block {i} failed: {exc!r}") from exc


def test_docs_have_runnable_blocks() -> None:
    assert (ROOT / "docs/functional.md") in DOCS
