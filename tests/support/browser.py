"""Headless Chromium for the UI and report tests: Debian's /usr/bin/chromium driven by Playwright.

No browser is downloaded (never `playwright install`): a missing Chromium or Playwright fails the test with
the command that installs it. Screenshots go to `$CLIPLINE_TEST_ARTIFACTS/<test>/` when that is set (CI keeps
them), else to the test's tmp_path.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
PLAYWRIGHT_PIN = "playwright==1.65.2"
# headless on a machine without a GPU, and nothing that talks to the internet on its own
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def chromium() -> Iterator[Any]:
    """A Playwright Browser on Debian's Chromium; fails (never skips) with the install hint when either is missing."""
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.fail(f"{CHROMIUM} not found: this test drives a real browser; install it with `apt-get install chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed: `pip install {PLAYWRIGHT_PIN}` (do not run `playwright install`; "
                    f"the tests use {CHROMIUM})")
    with sync_playwright() as pw:
        exe = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def artifacts_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where a test's screenshots go: $CLIPLINE_TEST_ARTIFACTS/<test name>/, else tmp_path."""
    root = os.environ.get("CLIPLINE_TEST_ARTIFACTS")
    out = Path(root) / re.sub(r"[^\w.-]+", "_", request.node.name) if root else tmp_path / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


def open_runs_table(browser: Any, ui: str, experiment_id: str, job_run: str) -> tuple[Any, Any]:
    """A page on an experiment's runs table in the MLflow UI at `ui`, and the link of the job run named
    `job_run` once it is shown (MLflow 3 opens an experiment in its GenAI view; the table is under
    "Model training")."""
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.set_default_timeout(60_000)
    page.goto(f"{ui}/#/experiments/{experiment_id}")
    button = page.get_by_role("button", name="Model training")
    button.wait_for()
    for attempt in range(3):
        try:
            button.click(timeout=15_000)
            break
        except Exception:  # noqa: BLE001 - playwright's TimeoutError; the last attempt re-raises
            if attempt == 2:
                page.screenshot(path=os.environ.get("CLIPLINE_UI_FAILURE_SHOT", "/tmp/clipline-ui-failure.png"))
                raise
            # MLflow 3.17's feature tour ("Detect Issues in Your Traces") opens a popover whose overlay takes
            # the clicks (<html> intercepts them): dismiss it and try again
            got_it = page.get_by_role("button", name="Got it")
            if got_it.count():
                got_it.first.click()
            else:
                page.keyboard.press("Escape")
    job_link = page.get_by_role("link", name=job_run, exact=True)
    job_link.wait_for()
    return page, job_link
