"""Open an HTML report in headless Chromium: what the page did when it loaded, and screenshots.

``chromium --dump-dom`` prints the page but none of its console messages, so :func:`probe_page`
loads a *copy* of the page with a small script injected first in ``<head>``: it records uncaught
errors, failed resource loads, ``console.error`` calls and, after the load event, every image's
natural width and whether it decodes (drawn into a canvas: a pixel of it has a colour), the page's width against the window's and its section headings,
into ``document.title``, which ``--dump-dom`` then shows. Chromium's own console lines (``CONSOLE``
in its stderr log) are collected too. The report itself carries no script.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

WINDOW = (1300, 2400)

PROBE = """<script>(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t !== window && t.tagName ? "failed to load a " + t.tagName : String(e.message));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("rejection: " + e.reason); });
  var original = console.error;
  console.error = function () {
    errors.push(Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    // img.decode() never settles in a headless dump; drawing into a canvas decodes for real.
    var canvas = document.createElement("canvas");
    var context = canvas.getContext("2d", {willReadFrequently: true});
    var images = Array.prototype.map.call(document.images, function (img) {
      var decoded = false;
      if (img.complete && img.naturalWidth > 0) {
        canvas.width = img.naturalWidth;
        canvas.height = img.naturalHeight;
        context.drawImage(img, 0, 0);
        var pixel = context.getImageData(img.naturalWidth >> 1, img.naturalHeight >> 1, 1, 1).data;
        decoded = pixel[3] > 0;
      }
      return {alt: img.alt, width: img.naturalWidth, decoded: decoded};
    });
    document.title = "PROBE:" + JSON.stringify({
      errors: errors,
      images: images,
      scrollWidth: document.documentElement.scrollWidth,
      innerWidth: window.innerWidth,
      headings: Array.prototype.map.call(document.querySelectorAll("h2"), function (h) {
        return h.id || h.textContent;
      })
    });
  });
})();</script>"""


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) binary on PATH, else ``None``."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(binary: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="distalign-chromium-") as profile:
        command = [
            binary,
            "--headless=new",
            "--no-sandbox",  # containers often run as root, where the sandbox refuses to start
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def probe_page(page: str | Path, *, binary: str | None = None, timeout: float = 60) -> dict[str, Any]:
    """Load ``page`` (through a probed copy beside it) and return what the probe saw: ``errors``
    (page errors), ``images`` (``alt``, ``width``, ``decoded`` each), ``scrollWidth``/``innerWidth``,
    ``headings`` (h2 ids or texts), and ``console`` (Chromium's CONSOLE log lines)."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH")
    page = Path(page).resolve()
    text = page.read_text(encoding="utf-8")
    copy = page.with_name(f".probe-{page.name}")
    copy.write_text(
        text.replace('<meta charset="utf-8">', '<meta charset="utf-8">' + PROBE, 1), encoding="utf-8"
    )
    try:
        done = _run(
            binary,
            ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()],
            timeout,
        )
    finally:
        copy.unlink(missing_ok=True)
    found = re.search(r"<title>PROBE:(.*?)</title>", done.stdout, re.S)
    if found is None:
        raise RuntimeError(f"the probe did not report (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(html.unescape(found.group(1)))
    result["console"] = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    return result


def screenshot(
    page: str | Path,
    output: str | Path,
    *,
    section: str | None = None,
    binary: str | None = None,
    timeout: float = 60,
) -> Path:
    """A PNG of ``page`` at :data:`WINDOW` size: its top, or with ``section`` (an element id) the page
    from that element on. Headless Chromium paints nothing when it scrolls to a ``#fragment`` before the
    shot, so a copy of the page hides what comes before the section (CSS ``:has``) instead."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH")
    page, output = Path(page).resolve(), Path(output).resolve()
    target = page
    if section is not None:
        text = page.read_text(encoding="utf-8")
        hide = f"<style>body > :has(~ #{section}) {{ display: none; }}</style>"
        target = page.with_name(f".shot-{page.name}")
        target.write_text(text.replace("</head>", hide + "</head>", 1), encoding="utf-8")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = _run(
            binary, ["--virtual-time-budget=5000", f"--screenshot={output}", target.as_uri()], timeout
        )
    finally:
        if target != page:
            target.unlink(missing_ok=True)
    if not output.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return output
