"""The report in a real browser: Debian's headless chromium loads it from a file:// URL without console errors,
decodes every plot and takes a screenshot.

A copy of the report gets one probe script (allowed by its sha256 in the page's
Content-Security-Policy) that, on load, writes each image's decoded size into the DOM;
`--dump-dom` returns that DOM, `--screenshot` the picture, and `--enable-logging=stderr`
every console message (chromium logs them as `:CONSOLE` lines). The report itself has
no script, so any console message is a failure. Chromium is required, not optional:
CI installs it (`.ci/run`), and a missing browser fails the test.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from ches_curate.report import ReportConfig, build_report
from tests.test_report import populated_store

CSP = "default-src 'none';"
WINDOW = (1280, 2400)
PROBE = (
    "window.addEventListener('load', function () {"
    " var probe = document.createElement('pre'); probe.id = 'ches-probe';"
    " probe.textContent = JSON.stringify({title: document.title,"
    "  details: document.querySelectorAll('details').length,"
    "  pageWidth: document.documentElement.clientWidth, scrollWidth: document.documentElement.scrollWidth,"
    "  overflowing: Array.prototype.filter.call(document.querySelectorAll('table'), function (t) {"
    "   return t.getBoundingClientRect().right > t.closest('section').getBoundingClientRect().right + 1;"
    "  }).map(function (t) { return t.closest('section').id; }),"
    "  images: Array.prototype.map.call(document.images, function (i) {"
    "   return {complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}; })});"
    " document.body.appendChild(probe); });"
)
PROBE_HASH = base64.b64encode(hashlib.sha256(PROBE.encode()).digest()).decode()


@dataclass
class Rendered:
    probe: dict
    console: list[str]
    screenshot: Path


def chromium() -> str:
    path = shutil.which(os.environ.get("CHROMIUM", "chromium"))
    if path is None:
        pytest.fail("chromium is not installed: this test needs Debian's headless chromium "
                    "(`apt-get install -y chromium`, which .ci/run does); set $CHROMIUM to use another binary")
    return path


def render(page_html: str, workdir: Path) -> Rendered:
    """Load `page_html` (with the probe added) from a file:// URL in headless chromium."""
    assert CSP in page_html, "the page must carry the report's Content-Security-Policy"
    instrumented = page_html.replace(CSP, f"{CSP} script-src 'sha256-{PROBE_HASH}';", 1)
    instrumented = instrumented.replace("</body>", f"<script>{PROBE}</script></body>", 1)
    page = workdir / "page.html"
    page.write_text(instrumented, encoding="utf-8")
    screenshot = workdir / "screenshot.png"
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        f"--user-data-dir={workdir / 'profile'}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1",
        f"--screenshot={screenshot}", "--dump-dom", page.as_uri(),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=workdir)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within 120 s: {' '.join(command)}")
    found = re.search(r'<pre id="ches-probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the probe did not run (exit {done.returncode}); chromium stderr:\n{done.stderr[-3000:]}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return Rendered(json.loads(html.unescape(found.group(1))), console, screenshot)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Rendered:
    workdir = tmp_path_factory.mktemp("browser")
    demo = populated_store(workdir / "store.duckdb")
    report = build_report(demo.store, "demo", selection_id=demo.percentile_id, config=ReportConfig(top_pairs=5))
    return render(report, workdir)


def test_report_renders_in_chromium_without_console_errors(rendered):
    assert rendered.console == []
    assert rendered.probe["title"] == "ches-curate report: demo v1"
    assert rendered.probe["details"] == 5 + 12 + 2  # top pairs, removed pairs, quality findings


def test_no_table_is_wider_than_its_section(rendered):
    assert rendered.probe["overflowing"] == []
    assert rendered.probe["scrollWidth"] <= rendered.probe["pageWidth"]


def test_every_plot_is_decoded_with_a_real_size(rendered):
    images = rendered.probe["images"]
    assert len(images) == 7
    for image in images:
        assert image["complete"] and image["width"] > 300 and image["height"] > 150, images


def test_screenshot_shows_a_drawn_page(rendered):
    image = Image.open(io.BytesIO(rendered.screenshot.read_bytes()))
    assert image.format == "PNG" and image.size == WINDOW
    colors = image.convert("RGB").getcolors(maxcolors=WINDOW[0] * WINDOW[1])
    assert len(colors) > 200, "a page with text and plots has many colours; a blank page has one"
    white = max(count for count, color in colors if color == (255, 255, 255))
    assert white < 0.97 * WINDOW[0] * WINDOW[1]


def test_the_checks_catch_a_broken_page(tmp_path):
    """The negative control: a broken image, a blocked network image and a blocked script are all reported."""
    broken = (
        "<!DOCTYPE html><html><head><meta http-equiv=\"Content-Security-Policy\" "
        f"content=\"{CSP} img-src data:\"></head><body><img src=\"data:image/png;base64,AAAA\">"
        "<img src=\"https://example.invalid/plot.png\"><script>throw new Error('boom')</script>"
        f"<section id=\"wide\"><table><tr><td>{'x' * 3000}</td></tr></table></section></body></html>"
    )
    result = render(broken, tmp_path)
    assert result.probe["overflowing"] == ["wide"]
    assert [(i["width"], i["height"]) for i in result.probe["images"]] == [(0, 0), (0, 0)]
    assert any("example.invalid" in line for line in result.console), result.console
    assert any("inline script" in line for line in result.console), result.console
