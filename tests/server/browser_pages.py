"""The browser the web page tests drive: Debian's Chromium through Playwright, and a page opener that fails
a test on any script or Content-Security-Policy error (fixtures, registered in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
LAN_HOST = "chat.lan.test"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # a name for the test server that is not localhost: the page as another machine on the network sees it
    f"--host-resolver-rules=MAP {LAN_HOST} 127.0.0.1",
]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(
            f"the web page test needs Chromium at {CHROMIUM}: install it with "
            "`apt-get update && apt-get install -y chromium` (`make setup` does this when run as root)"
        )
    from playwright.sync_api import sync_playwright  # only where a test opens the browser

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """Open the chat page of a server in a fresh browser context; fail on any script or CSP error."""
    contexts, problems = [], []

    def open_(url: str, **context_options):
        context = browser.new_context(**context_options)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda msg: (
                problems.append(f"console {msg.type}: {msg.text}")
                if msg.type == "error" and not msg.text.startswith("Failed to load resource")
                else None
            ),
        )
        page.goto(url)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert problems == []
