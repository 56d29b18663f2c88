"""MkDocs hook: render the reST in functuner's docstrings that Markdown shows verbatim.

functuner's docstrings are written in reST (Sphinx style), while mkdocstrings renders them
as Markdown.  Two constructs would then show up literally in the API reference:

* Sphinx roles (``:func:`x```, ``:class:`~a.b.C```).  Each becomes inline code (the ``~``
  form shows the last component only, as Sphinx does) and, for a fully qualified
  ``functuner.`` name, an optional cross-reference that mkdocs-autorefs resolves to the
  generated API reference (left as plain code when the name has no page).
* reST literal-block markers: a paragraph ending in ``::`` followed by an indented block.
  Markdown already renders the indented block as code, but leaves the ``::`` in the text.
  As in reST, ``text::`` becomes ``text:``, ``text ::`` becomes ``text`` and a paragraph
  that is only ``::`` disappears.

Pure text transforms of each page's HTML (before autorefs resolves references); pages
without roles or markers are unchanged, so the library's docstrings stay plain reST.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):<code>(~?)([\w.]+)(\(\))?</code>")


def _replace(match: re.Match[str]) -> str:
    tilde, target, call = match.group(1), match.group(2), match.group(3) or ""
    shown = (target.rsplit(".", 1)[-1] if tilde else target) + call
    if target.startswith("functuner."):
        return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'
    return f"<code>{shown}</code>"


# a paragraph ending in "::" directly followed by a code block (Markdown's rendering of a reST literal block)
_LITERAL_MARKER = re.compile(r"(<p>)?([ \t]*)::</p>(?=\s*<(?:div[^>]*\bhighlight\b|pre)[^>]*>)")


def _literal(match: re.Match[str]) -> str:
    if match.group(1):  # the paragraph is only "::"
        return ""
    return "</p>" if match.group(2) else ":</p>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """Rewrite the Sphinx roles and reST ``::`` markers in one page's rendered HTML."""
    return _LITERAL_MARKER.sub(_literal, _ROLE.sub(_replace, html))
