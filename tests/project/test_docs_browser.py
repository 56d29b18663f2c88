"""The built documentation site, looked at in a real headless browser (Chromium) at 1280 px.

``test_docs_build.py`` checks the HTML that ``mkdocs build --strict`` writes; what a reader sees
also depends on the theme's CSS and JavaScript.  This test builds the site, serves it on a local
port and loads every page in a 1280 px wide frame of one headless Chromium, then asserts:

* no code block (``pre > code``, examples and API signatures alike) is wider than its box, i.e.
  nothing is clipped behind a horizontal scrollbar (``docs/stylesheets/extra.css`` wraps lines);
* the rendered text of the API reference shows no literal reST ``::`` (``mkdocs_hooks.py``
  turns docstrings' literal-block markers into Markdown's rendering).

Chromium comes from the Debian package (``apt-get install -y chromium``); CI installs it.
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)

# The only reason to skip: no browser to look with.  Install it with `apt-get install -y chromium`.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="the chromium binary is not installed (apt-get install -y chromium)"
)

WIDTH = 1280
RESULT_ID = "functuner-browser-check"

# One page that loads every other page in a 1280 px wide iframe (same origin, so it can measure
# their layout), waits for all of them, and writes what it found into the DOM as JSON.
HARNESS = """<!doctype html>
<html><head><meta charset="utf-8"><title>browser check</title></head>
<body>
%(frames)s
<pre id="%(result_id)s">pending</pre>
<script>
window.addEventListener("load", () => {
  const report = {};
  for (const frame of document.querySelectorAll("iframe")) {
    const doc = frame.contentDocument;
    const overflowing = [];
    for (const code of doc.querySelectorAll("pre > code")) {
      if (code.scrollWidth > code.clientWidth) {
        overflowing.push({scroll: code.scrollWidth, client: code.clientWidth, text: code.innerText.slice(0, 120)});
      }
    }
    const article = doc.querySelector("article") || doc.body;
    report[frame.dataset.page] = {
      title: doc.title,
      codeBlocks: doc.querySelectorAll("pre > code").length,
      overflowing: overflowing,
      text: article.innerText,
    };
  }
  document.getElementById("%(result_id)s").textContent = JSON.stringify(report);
});
</script>
</body></html>
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("browser") / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def server(site: pathlib.Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def rendered(site: pathlib.Path, server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every page of the site as Chromium lays it out at 1280 px: ``{page url: measurements}``."""
    relative = (p.parent.relative_to(site).as_posix() for p in site.rglob("index.html"))
    pages = sorted("/" if rel == "." else f"/{rel}/" for rel in relative)
    frames = "\n".join(
        f'<iframe data-page="{page}" src="{page}" width="{WIDTH}" height="900" style="border:0"></iframe>'
        for page in pages
    )
    (site / "__browser_check__.html").write_text(HARNESS % {"frames": frames, "result_id": RESULT_ID})
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",  # CI runs as root in a container
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            f"--window-size={WIDTH + 40},1000",
            "--virtual-time-budget=60000",
            "--dump-dom",
            f"{server}/__browser_check__.html",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    match = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', proc.stdout, re.S)
    assert match and match.group(1) != "pending", (
        f"Chromium gave no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    )
    report: dict[str, dict] = json.loads(html.unescape(match.group(1)))
    assert len(report) == len(pages) >= 20, sorted(report)
    return report


def test_every_page_rendered(rendered: dict[str, dict]) -> None:
    blank = [page for page, info in rendered.items() if not info["text"].strip() or "404" in info["title"]]
    assert not blank, f"pages that did not render: {blank}"
    assert sum(info["codeBlocks"] for info in rendered.values()) > 50


def test_no_code_block_is_clipped_at_1280px(rendered: dict[str, dict]) -> None:
    clipped = {page: info["overflowing"] for page, info in rendered.items() if info["overflowing"]}
    assert not clipped, "code blocks wider than their box at 1280 px (hidden behind a scrollbar):\n" + json.dumps(
        clipped, indent=1
    )


def test_api_reference_shows_no_rest_literal_markers(rendered: dict[str, dict]) -> None:
    reference = {page: info["text"] for page, info in rendered.items() if page.startswith("/reference/")}
    assert set(reference) >= {"/reference/functional/", "/reference/shim/"}
    for page, text in reference.items():
        found = [text[max(0, m.start() - 60) : m.end() + 20] for m in re.finditer("::", text)]
        assert not found, f"{page} shows a literal reST '::' in: {found}"
