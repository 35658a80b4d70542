"""A real browser for tests: Debian's headless Chromium driven by Playwright.

Playwright never downloads a browser here: it is pointed at the system's
`chromium` (Debian package `chromium`). Every console error and uncaught
exception on the page is collected, so a test can say there were none, or
exactly which it expected.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# Playwright's own default for every wait and expect, made explicit.
ACTION_TIMEOUT_MS = 10_000
# A browser test's own bound: launching Chromium and a page's round trips take a while.
BROWSER_TEST = pytest.mark.gen_test(timeout=60)


@dataclass(frozen=True)
class ConsoleProblem:
    """A console error or an uncaught exception, and the URL it came from."""

    text: str
    url: str


@dataclass
class BrowserPage:
    page: Page
    context: BrowserContext
    problems: list[ConsoleProblem] = field(default_factory=list)

    async def screenshot(self, name: str) -> Path:
        """Save a full-page PNG as tests/artifacts/<name>.png."""
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed (Debian package: chromium)")
    return path


@dataclass
class BrowserSession:
    """One Chromium for a test; `open_page` gives as many pages (each its own session) as needed."""

    playwright: Playwright
    browser: Browser
    pages: list[BrowserPage] = field(default_factory=list)

    async def open_page(self, viewport: dict[str, int] = DESKTOP) -> BrowserPage:
        context = await self.browser.new_context(viewport=viewport)
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        page = await context.new_page()
        opened = BrowserPage(page, context)
        page.on("console", _collect_console(opened))
        page.on("pageerror", lambda error: opened.problems.append(ConsoleProblem(str(error), "")))
        self.pages.append(opened)
        return opened


def _collect_console(opened: BrowserPage) -> Callable[[ConsoleMessage], None]:
    def collect(message: ConsoleMessage) -> None:
        if message.type == "error":
            opened.problems.append(ConsoleProblem(message.text, message.location.get("url", "")))

    return collect


async def _launch() -> BrowserSession:
    playwright = await async_playwright().start()
    try:
        browser = await playwright.chromium.launch(executable_path=chromium_path(), headless=True)
    except PlaywrightError:
        await playwright.stop()
        raise
    return BrowserSession(playwright, browser)


async def _close(session: BrowserSession) -> None:
    for opened in session.pages:
        await opened.context.close()
    await session.browser.close()
    await session.playwright.stop()


@pytest.fixture(name="browser")
def browser_fixture(io_loop: Any) -> Iterator[BrowserSession]:
    """A headless Chromium on the test's event loop, closed after the test."""
    session = io_loop.run_sync(_launch)
    yield session
    io_loop.run_sync(lambda: _close(session))


@pytest.fixture(name="browser_page")
def browser_page_fixture(browser: BrowserSession, io_loop: Any) -> BrowserPage:
    """A desktop-sized page in its own browser session."""
    return io_loop.run_sync(browser.open_page)
