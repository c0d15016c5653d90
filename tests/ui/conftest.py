"""Headless Chromium (Debian's `chromium`, installed by `make system-deps`) driven by
Playwright's Python package; Playwright's own browser download is never used.

`browser`: one persistent context per module on a fresh profile directory. `watched_page`:
a page that records console errors, page errors and every request's host, for the test to
assert on (no console error, nothing fetched from another host).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import pytest

CHROMIUM = os.environ.get("ROUTERD_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Where the test run writes screenshots besides its tmp dir (docs/ when refreshing README's).
SHOTS_ENV = "ROUTERD_UI_SCREENSHOTS"


@dataclass
class Watch:
    console_errors: list[str] = field(default_factory=list)
    hosts: set[str] = field(default_factory=set)
    urls: list[str] = field(default_factory=list)

    def on_console(self, msg: Any) -> None:
        if msg.type == "error":
            self.console_errors.append(msg.text)

    def on_page_error(self, err: Any) -> None:
        self.console_errors.append(f"page error: {err}")

    def on_request(self, req: Any) -> None:
        self.urls.append(req.url)
        parts = urlsplit(req.url)
        if parts.scheme in ("http", "https", "ws", "wss"):
            self.hosts.add(parts.netloc)


@pytest.fixture(scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    assert shutil.which(CHROMIUM) or Path(CHROMIUM).is_file(), \
        f"{CHROMIUM} missing: `make system-deps` installs Debian's chromium"
    from playwright.async_api import async_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1280, "height": 800}, color_scheme="light",
            service_workers="block")
        context.set_default_timeout(20_000)
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
async def watched_page(browser: Any) -> AsyncIterator[tuple[Any, Watch]]:
    page = await browser.new_page()
    watch = Watch()
    page.on("console", watch.on_console)
    page.on("pageerror", watch.on_page_error)
    page.on("request", watch.on_request)
    try:
        yield page, watch
    finally:
        await page.close()


async def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """Write `name`.png to the test's tmp dir (and to $ROUTERD_UI_SCREENSHOTS when set)."""
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get(SHOTS_ENV)
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(extra) / f"{name}.png")
    return path
