"""MkDocs hook: render the Sphinx roles in functuner's docstrings (``:func:`x```, ``:class:`~a.b.C```).

mkdocstrings renders docstrings as Markdown, where ``:class:`~functuner.errors.ConfigError```
would show the role text verbatim.  This hook turns each role into inline code (the
``~`` form shows the last component only, as Sphinx does) and, for a fully qualified
``functuner.`` name, into an optional cross-reference that mkdocs-autorefs resolves to the
generated API reference (left as plain code when the name has no page).  Pure text
transform of each page's HTML; no effect on pages without roles.
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


def on_page_content(html: str, **kwargs: Any) -> str:
    """Rewrite the Sphinx roles in one page's rendered HTML (before autorefs resolves references)."""
    return _ROLE.sub(_replace, html)
