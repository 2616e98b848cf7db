"""The report in a real headless Chromium, driven over the DevTools protocol: the page loads with no
console errors, every figure decodes and renders non-blank on a screenshot, and the tables have
the rows the run's files call for. Chromium is required: without it this test fails."""

from __future__ import annotations

import base64
import io
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import websocket
from PIL import Image
from report_run import AUDIT, BENCHMARKS, GALLERY_TESTS, SPLITS, TOP1, make_run, robustness_doc

from simgap.report import build_report

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1200,900",
    "--remote-debugging-port=0",
)
TIMEOUT_S = 60


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium not found: install Debian's `chromium` package (see .ci/run)")
    return path


class Page:
    """One browser tab over the DevTools protocol: numbered calls, events kept for inspection."""

    def __init__(self, ws_url: str) -> None:
        self._ws = websocket.create_connection(ws_url, timeout=TIMEOUT_S, suppress_origin=True)
        self._ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        seen = 0
        while time.monotonic() < deadline:
            for message in self.events[seen:]:
                if message.get("method") == event:
                    return message
            seen = len(self.events)
            self.events.append(json.loads(self._ws.recv()))
        raise TimeoutError(f"no {event} within {TIMEOUT_S} s")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"]["value"]

    def open(self, path: Path) -> None:
        """Load a file with console and log capture on from the start; events restart empty."""
        self.events.clear()
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")

    def close(self) -> None:
        self._ws.close()


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            tab = Page(_page_ws_url(Path(profile), proc))
            yield tab
            tab.close()
        finally:
            proc.terminate()
            proc.wait(timeout=TIMEOUT_S)


def _page_ws_url(profile: Path, proc: subprocess.Popen) -> str:
    """Chromium writes its DevTools port to the profile once it listens (port 0: any free one)."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + TIMEOUT_S
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None:
            pytest.fail(f"chromium exited with status {proc.returncode} before listening")
        if time.monotonic() > deadline:
            pytest.fail("chromium did not open its DevTools port")
        time.sleep(0.05)
    port = port_file.read_text().split()[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=TIMEOUT_S) as r:
        targets = json.load(r)
    return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")


# ----------------------------------------------------------------------------- checks

# Per <img>: its size as decoded, its box on the page, and the pixel spread of the decoded
# image drawn on a canvas (data: URIs do not taint a canvas).
_IMAGES_JS = """
Array.from(document.images).map((img) => {
  const r = img.getBoundingClientRect();
  let std = -1;
  if (img.complete && img.naturalWidth > 0) {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let s = 0, s2 = 0, n = 0;
    for (let i = 0; i < d.length; i += 4) {
      const g = (d[i] + d[i + 1] + d[i + 2]) / 3; s += g; s2 += g * g; n++;
    }
    std = Math.sqrt(Math.max(s2 / n - (s / n) ** 2, 0));
  }
  return {alt: img.alt, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
          x: r.left + window.scrollX, y: r.top + window.scrollY, bw: r.width, bh: r.height,
          std: std};
})
"""
_TABLES_JS = """
Array.from(document.querySelectorAll('table')).map((t) => ({
  caption: t.caption ? t.caption.textContent : '',
  rows: Array.from(t.tBodies[0].rows).map((tr) => Array.from(tr.cells).map((c) => c.textContent)),
}))
"""


def console_errors(page: Page) -> list[str]:
    """Console errors, uncaught exceptions and browser log errors (failed loads) seen so far."""
    out = []
    for event in page.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value")) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            out.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            out.append("log: " + params["entry"]["text"])
    return out


def screenshot(page: Page, box: dict) -> np.ndarray:
    """The pixels of a page region as rendered (beyond the viewport too), grey levels."""
    clip = {"x": box["x"], "y": box["y"], "width": box["bw"], "height": box["bh"], "scale": 1}
    shot = page.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"])))
    return np.asarray(image.convert("L"), dtype=float)


def figure_problems(page: Page) -> list[str]:
    """Every <img> that did not decode, is tiny, or shows (decoded or on screen) a blank field."""
    problems = []
    for img in page.evaluate(_IMAGES_JS):
        name = img["alt"] or "<img>"
        if not img["complete"] or img["w"] < 50 or img["h"] < 50:
            problems.append(f"{name}: not decoded ({img['w']}x{img['h']})")
            continue
        if img["std"] < 5:
            problems.append(f"{name}: decoded image is blank (std {img['std']:.1f})")
        if img["bw"] < 50 or img["bh"] < 50:
            problems.append(f"{name}: laid out at {img['bw']}x{img['bh']}")
            continue
        pixels = screenshot(page, img)
        if pixels.std() < 5:
            problems.append(f"{name}: blank on screen (std {pixels.std():.1f})")
    return problems


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_run(tmp_path_factory.mktemp("browser") / "run")
    return build_report(run)["html"]


def _rows(tables: list[dict], caption: str) -> list[list[str]]:
    [table] = [t for t in tables if t["caption"].startswith(caption)]
    return table["rows"]


def test_report_renders_in_chromium(page: Page, report: Path) -> None:
    page.open(report)
    assert console_errors(page) == []
    assert page.evaluate("document.title") == "simgap report"

    images = page.evaluate(_IMAGES_JS)
    # gaps, one gallery per benchmark, accuracy bars, size curves, accuracy vs similarity,
    # robustness, removed counts, composition of the removed points
    assert len(images) == 7 + len(BENCHMARKS)
    assert figure_problems(page) == []

    tables = page.evaluate(_TABLES_JS)
    assert [r[0] for r in _rows(tables, "Zero-shot top-1")] == [
        s for s in ("full", "sketch", "sketch-random") if s in TOP1
    ] + [f"{p}-{f}" for p in ("near", "far", "random") for f in (0.25, 0.5)]
    assert len(_rows(tables, "Split sizes")) == len(SPLITS)
    assert len(_rows(tables, "Near / far / random")) == 6
    assert [r[0] for r in _rows(tables, "Contaminated")] == list(BENCHMARKS)
    assert len(_rows(tables, "Effective robustness")) == len(robustness_doc()["points"])
    gallery = _rows(tables, "Gallery test images")
    assert [r[0] for r in gallery] == [b for b in BENCHMARKS for _ in range(3)]
    assert len({r[2] for r in gallery}) == len(gallery) <= 3 * GALLERY_TESTS
    assert _rows(tables, "Each split against")[2][0] == "Δ sketch − control"
    assert AUDIT["ground_truth"]["tp"] == int(_rows(tables, "Audit against")[0][2])

    # Every section heading is reachable from the contents list.
    links = page.evaluate(
        "Array.from(document.querySelectorAll('nav a')).map(a => a.getAttribute('href'))"
    )
    assert len(links) == 12  # Findings and Similarity structure included
    assert page.evaluate(
        f"{json.dumps(links)}.every(h => document.getElementById(h.slice(1)) !== null)"
    )


def test_checks_catch_a_broken_page(page: Page, tmp_path: Path) -> None:
    # The same checks on a page with a script error, a logged error, an image that does not
    # decode and a blank one: each must be reported, or the test above could not fail.
    blank = Image.new("RGB", (120, 80), "white")
    buf = io.BytesIO()
    blank.save(buf, format="PNG")
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><head><title>bad</title></head><body>"
        '<img alt="broken" src="data:image/png;base64,AAAA">'
        f'<img alt="blank" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
        "<script>console.error('boom'); undefinedFunction();</script></body></html>"
    )
    page.open(bad)
    errors = console_errors(page)
    assert any("boom" in e for e in errors)
    assert any(e.startswith("exception") for e in errors)
    problems = figure_problems(page)
    assert any(p.startswith("broken: not decoded") for p in problems)
    assert any(p.startswith("blank: decoded image is blank") for p in problems)
