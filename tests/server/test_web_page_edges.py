"""The web chat page at its edges, in a real headless Chromium against the real server (the helpers of
test_web_page.py): numbers as typed in Settings, a connection lost in the middle of an answer, and the
transcript's scroll when an answer ends."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect
from test_web_page import CHAT_URL, _sse, answer, chat_bodies, open_settings

pytestmark = pytest.mark.slow


def test_sampling_numbers_are_sent_as_the_fields_read_them(server, open_page):
    """Number fields take exponent notation, and the integer ones were read with parseInt: max tokens "1e1"
    asked for 1 token, seed "1e3" was seed 1. A seed past 2**53 is no number JavaScript holds exactly (it
    went as another seed): it is refused with the field's message, and nothing is sent."""
    page = open_page(server.url)
    body = _sse(["ok"])
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    bodies = chat_bodies(page)
    open_settings(page)
    typed = {"temperature": "5e-1", "top_p": "0.9", "top_k": "2e1", "max_tokens": "1e1", "seed": "1e3"}
    for field, value in typed.items():
        page.fill(f"#{field}", value)
    page.fill("#prompt", "Hi")
    page.keyboard.press("Enter")
    answer(page, 0)
    sent = {field: bodies[0][field] for field in typed}
    assert sent == {"temperature": 0.5, "top_p": 0.9, "top_k": 20, "max_tokens": 10, "seed": 1000}

    page.fill("#seed", "9007199254740993")  # 2**53 + 1: as a JavaScript number, 2**53
    page.fill("#prompt", "Again")
    page.keyboard.press("Enter")
    expect(page.locator("#error")).to_have_text("Seed: Value must be less than or equal to 9007199254740991.")
    page.fill("#seed", "9007199254740991")
    page.press("#prompt", "Enter")
    answer(page, 1)
    assert len(bodies) == 2 and bodies[1]["seed"] == 2**53 - 1
    assert page.is_hidden("#error")
