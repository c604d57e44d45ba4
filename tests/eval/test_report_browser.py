"""The report in a real browser (headless Chromium): it loads without console errors, every image is
there and decodes, nothing is wider than the window, and the verdict comes first. Skipped where no
Chromium is installed (Debian: `apt-get install chromium`), except in CI (the CI variable set), where
they fail instead: .ci/run installs Chromium, so a skip there would hide the suite's only real-browser
checks."""

from __future__ import annotations

import os

import pytest
from distalign_testing.browser import find_chromium, probe_page, screenshot

from distalign.eval.report import write_report

CHROMIUM = find_chromium()


@pytest.fixture(autouse=True)
def chromium_installed():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail(
                "headless Chromium is not installed, and CI is set: .ci/run installs Debian's chromium"
            )
        pytest.skip("headless Chromium is not installed")


def test_the_report_loads_cleanly_in_chromium(two_runs, tmp_path):
    page = write_report(two_runs, tmp_path / "report.html")
    seen = probe_page(page, binary=CHROMIUM)
    assert seen["errors"] == [] and seen["console"] == []
    images = seen["images"]
    assert len(images) == page.read_text().count("<img ") >= 6
    assert [i["alt"] for i in images if i["width"] == 0 or not i["decoded"]] == []
    assert seen["scrollWidth"] <= seen["innerWidth"]  # no table or figure wider than the window
    assert seen["headings"][:3] == ["verdict", "Comparison", "generations"]


def test_the_live_page_loads_and_screenshots_are_written(two_runs, tmp_path):
    page = write_report(two_runs, tmp_path / "live.html", refresh_seconds=60)
    seen = probe_page(page, binary=CHROMIUM)
    assert seen["errors"] == [] and seen["console"] == [] and seen["images"]
    top = screenshot(page, tmp_path / "top.png", binary=CHROMIUM)
    section = screenshot(page, tmp_path / "generations.png", section="generations", binary=CHROMIUM)
    for png in (top, section):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_probe_sees_broken_images_and_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>t</title></head><body>'
        '<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" alt="cut short">'
        '<div style="width: 3000px">wide</div><script>missing_function();</script></body></html>'
    )
    seen = probe_page(page, binary=CHROMIUM)
    assert seen["images"] == [{"alt": "cut short", "width": 0, "decoded": False}]
    assert any("failed to load a IMG" in e for e in seen["errors"])
    assert any("missing_function" in e for e in seen["errors"])
    assert any("missing_function" in line for line in seen["console"])
    assert seen["scrollWidth"] > seen["innerWidth"]
