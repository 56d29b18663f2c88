"""README.md renders as intended under CommonMark (what GitHub and PyPI use), and starts with the two commands.

A closing code fence cannot carry text (```` ``` The second ````): CommonMark then keeps the
code block open, and it swallows the headings and examples that follow.  These tests parse the
README with markdown-it-py's CommonMark parser and check the structure a reader sees:

* the first two code blocks are fenced ``bash`` blocks holding exactly the two commands a fresh
  machine needs (install and run the demo; install and run the tests);
* every line that starts with ``## `` in the source comes out as a level-2 heading, and every
  fence closes.
"""

from __future__ import annotations

import pathlib

from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

DEMO = 'pip install torch==2.13.0 && pip install -e ".[demo]" && functuner demo'
TESTS = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'


def _tokens(text: str) -> list[Token]:
    return MarkdownIt("commonmark").parse(text)


def _code_blocks(tokens: list[Token]) -> list[Token]:
    return [t for t in tokens if t.type in ("fence", "code_block")]


def _headings(tokens: list[Token], level: int) -> list[str]:
    tag = f"h{level}"
    return [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == tag]


def test_readme_starts_with_the_two_commands() -> None:
    blocks = _code_blocks(_tokens(README.read_text()))
    assert len(blocks) >= 2
    first, second = blocks[0], blocks[1]
    for block in (first, second):
        assert block.type == "fence" and block.info.strip() == "bash", (block.type, block.info)
    assert first.content.strip() == DEMO
    assert second.content.strip() == TESTS


def test_every_section_heading_is_a_heading() -> None:
    text = README.read_text()
    section_lines = [line[3:].strip() for line in text.splitlines() if line.startswith("## ")]
    assert len(section_lines) >= 4, section_lines
    rendered = _headings(_tokens(text), 2)
    assert rendered == section_lines, (
        f"'## ' lines that did not render as headings: {set(section_lines) - set(rendered)}"
    )
    assert _headings(_tokens(text), 1) == ["functuner"]


def test_every_fence_closes_on_a_bare_line() -> None:
    text = README.read_text()
    for block in _code_blocks(_tokens(text)):
        assert block.type == "fence", f"indented code block (a fence that did not close?) at line {block.map}"
        start, end = block.map or (0, 0)
        closing = text.splitlines()[end - 1]
        assert closing.strip() == block.markup, f"the fence opened at line {start + 1} closes with {closing!r}"


def test_the_reported_breakage_is_caught() -> None:
    """A closing fence with text after it (the reported README bug) makes the checks above fail."""
    broken = f"# functuner\n\n```bash\n{DEMO}\n```\n\n```text\noutput\n``` The second\nline\n\n## Why\n\ntext\n"
    assert [line for line in broken.splitlines() if line.startswith("## ")] == ["## Why"]
    assert _headings(_tokens(broken), 2) == []  # "## Why" was swallowed by the code block left open
