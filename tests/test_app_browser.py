"""A real browser clicks Generate: Debian's Chromium driven by Playwright.

Skips (with the reason) when /usr/bin/chromium or Playwright is missing; ``.ci/run``
installs Chromium with apt. The screenshot lands in the test's tmp dir
(``demo_generate.png``); set ``RD_SCREENSHOT_DIR`` to keep a copy elsewhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"{CHROMIUM} is missing (apt-get install -y --no-install-recommends chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def test_generate_in_a_real_browser_shows_both_images(tmp_path):
    from app.layout import build_demo
    from app.pipeline import DemoBackend

    from app_support import served, write_adapter

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    write_adapter(adapters / "toy.safetensors")
    demo = build_demo(DemoBackend(adapters, tmp_path / "work"))
    shot = tmp_path / "demo_generate.png"
    with served(demo) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url, wait_until="domcontentloaded")
            # fast settings for the tiny model, typed as a person would
            steps = page.get_by_label("number input for Steps")
            steps.fill("2")
            steps.press("Tab")
            page.get_by_role("button", name="Generate", exact=True).click()
            for elem in ("#base-image img", "#adapted-image img"):
                page.wait_for_selector(elem, state="visible")
                page.wait_for_function(
                    "sel => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0; }",
                    arg=elem)
            info = page.locator("#generate-info").inner_text()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert "toy.safetensors" in info and "2 steps" in info, info
    assert shot.stat().st_size > 10_000
    if os.environ.get("RD_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["RD_SCREENSHOT_DIR"]) / shot.name)
