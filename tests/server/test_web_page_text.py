"""The web chat page with text in other scripts and conversations past the model's window, in a real
headless Chromium against the real server (the helpers of test_web_page.py)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect
from test_web_page import CHAT_URL, _sse, answer

pytestmark = pytest.mark.slow


def test_right_to_left_text_reads_right_to_left_and_code_stays_left_to_right(server, open_page):
    """Arabic or Hebrew in a message was laid out left to right: the line sat on the left and its final
    punctuation on the wrong end ("مرحبا!" showed the "!" after the word's left edge). Each paragraph
    takes the direction of its own text; code stays left to right; the message boxes follow what is typed."""
    page = open_page(server.url)
    body = _sse(["مرحبا بك!\n\nHello there.\n\n- عنصر\n\n```python\nprint('سلام')\n```\n"])
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.fill("#prompt", "كيف حالك؟")
    page.keyboard.press("Enter")
    message = answer(page, 0)

    def direction(locator) -> str:
        return locator.evaluate("e => getComputedStyle(e).direction")

    assert direction(page.locator(".message.user .body")) == "rtl"
    assert direction(message.locator(".body p").nth(0)) == "rtl"
    assert direction(message.locator(".body p").nth(1)) == "ltr"
    assert direction(message.locator(".body li")) == "rtl"
    assert direction(message.locator(".body pre")) == "ltr"
    page.fill("#prompt", "שלום")
    assert direction(page.locator("#prompt")) == "rtl"
    page.fill("#prompt", "Hello")
    assert direction(page.locator("#prompt")) == "ltr"


def test_a_conversation_that_outgrew_the_window_says_to_start_over(server, open_page):
    """The page sends the whole conversation with every message: once it no longer fits the model's window
    every message failed with the server's "reduce the length of the prompt", however short, and nothing
    said that the earlier turns were what no longer fit."""
    page = open_page(server.url)
    body = _sse(["word " * 20_000])  # a long first answer, as a model may write
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.fill("#prompt", "Write a lot.")
    page.keyboard.press("Enter")
    answer(page, 0)
    page.unroute(CHAT_URL)
    page.fill("#prompt", "Thanks!")  # to the real server, with the conversation so far
    page.keyboard.press("Enter")
    error = page.wait_for_selector("#error:not([hidden])")
    shown = error.text_content()
    assert shown.startswith("400 Bad Request: This model's maximum context length is 8192 tokens.")
    assert shown.endswith(
        "Please reduce the length of the prompt. The conversation is too long: New chat starts over."
    )
    assert page.input_value("#prompt") == "Thanks!"
    expect(page.locator(".message")).to_have_count(2)  # the first turn stays; the failed one is taken back


def test_pasted_code_keeps_the_indentation_of_its_first_line(server, open_page):
    """The message was trimmed at both ends: pasted Python lost the indentation of its first line only, so
    the code the model saw no longer lined up. Blank lines around it and trailing spaces still go."""
    page = open_page(server.url)
    body = _sse(["ok"])
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    with page.expect_request(CHAT_URL) as request:
        page.fill("#prompt", "\n  \n    if x:\n        y()\n\n ")
        page.keyboard.press("Enter")
    assert request.value.post_data_json["messages"] == [{"role": "user", "content": "    if x:\n        y()"}]
    answer(page, 0)
    assert page.locator(".message.user .body").text_content() == "    if x:\n        y()"
    page.fill("#prompt", " \n \n")  # only blank lines: nothing is sent
    page.keyboard.press("Enter")
    expect(page.locator(".message")).to_have_count(2)


def test_a_task_list_shows_which_items_are_done(server, open_page):
    """A model's checklist ("- [x] done", "- [ ] to do") lost its boxes to the sanitizer, which drops form
    inputs: the done and the open items looked the same. Each item says which it is, as a character that
    copies with the text, and no input reaches the page."""
    page = open_page(server.url)
    body = _sse(["Steps:\n\n- [x] Install\n- [ ] Configure\n\n1. [X] first\n2. [ ] second\n"])
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.fill("#prompt", "What is left?")
    page.keyboard.press("Enter")
    message = answer(page, 0)
    items = message.locator(".body li").evaluate_all("items => items.map(li => li.textContent.trim())")
    assert items == ["☑ Install", "☐ Configure", "☑ first", "☐ second"]
    assert message.locator("input, form").count() == 0


def test_an_image_the_model_writes_is_a_link_that_names_it_and_loads_nothing(server, open_page):
    """The page loads no remote images (a URL the model writes can carry the conversation away), and the
    sanitizer dropped the image whole: "![Architecture diagram](...)" left no trace of its words or where
    the picture was. It shows as a link named by its alt text (its address where it has none), fetched
    only if the reader follows it; an image inside a link (a badge) is that link's text."""
    page = open_page(server.url)
    requested = []
    page.on("request", lambda r: requested.append(r.url) if "example.com" in r.url else None)
    text = 'See ![Architecture *diagram*](https://example.com/a.png "Fig 1") and ![](https://example.com/b.png).\n'
    badge = "[![build](https://example.com/ci.svg)](https://example.com/ci)"
    body = _sse([text + f"\n![x](javascript:alert(1)) {badge}"])
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.fill("#prompt", "Draw it")
    page.keyboard.press("Enter")
    message = answer(page, 0)
    links = message.locator(".body a").evaluate_all(
        "links => links.map(a => [a.textContent, a.getAttribute('href'), a.title])"
    )
    assert links == [
        ["Image: Architecture diagram", "https://example.com/a.png", "Fig 1"],
        ["Image: https://example.com/b.png", "https://example.com/b.png", ""],
        ["Image: x", None, ""],
        ["Image: build", "https://example.com/ci", ""],  # the badge's own link, not one to its picture
    ]
    assert message.locator(".body img").count() == 0 and requested == []
    assert message.locator(".body p").first.inner_text() == (
        "See Image: Architecture diagram and Image: https://example.com/b.png."
    )


def test_the_enter_that_picks_an_ime_candidate_does_not_send(server, open_page):
    """Typing Chinese or Japanese, Enter picks the candidate the input method offers. Chromium marks that
    key isComposing; Safari sends it after the composition has ended, as keyCode 229, and the page sent
    the half-typed message. Here the two keys as each browser sends them, then a real Enter."""
    page = open_page(server.url)
    body = _sse(["好"])
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.fill("#prompt", "你好")
    for init in ({"isComposing": True}, {"keyCode": 229}):
        sent = page.evaluate(
            """(init) => document.getElementById('prompt').dispatchEvent(new KeyboardEvent('keydown',
                 { key: 'Enter', bubbles: true, cancelable: true, ...init }))""",
            init,
        )
        assert sent  # the key went on as typing: not cancelled as a send
        assert page.locator(".message").count() == 0 and page.input_value("#prompt") == "你好"
    page.keyboard.press("Enter")
    answer(page, 0)
    assert page.locator(".message.user .body").text_content() == "你好"


MATH = (
    "The roots are \\( x = \\frac{-b \\pm \\sqrt{b^2-4ac}}{2a} \\), so\n"
    "\\[\n\\begin{aligned} a*b*c &= \\{1, 2\\} \\\\ d_1 + e_1 &= 3 \\end{aligned}\n\\]\n"
    "and $a*b*c$ with $$\\sum_{i=1}^n i = \\frac{n(n+1)}{2}$$ and \\boxed{42}. It costs $5 and $10, *really*."
)


def test_latex_in_an_answer_is_shown_as_written(server, open_page):
    """Qwen models write math in LaTeX, and the page has no math renderer: markdown ate it instead of
    showing it as written, "\\(" became "(", "\\{1, 2\\}" "{1, 2}", "\\\\" "\\", and "a*b*c" an italic b,
    so the formula read and copied wrong. Each math span is kept as its source; dollar amounts stay text."""
    page = open_page(server.url)
    body = _sse([MATH[:40], MATH[40:90], MATH[90:]])
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.fill("#prompt", "Solve it")
    page.keyboard.press("Enter")
    message = answer(page, 0)
    spans = message.locator(".body .math").evaluate_all("spans => spans.map(s => s.textContent)")
    assert spans == [
        "\\( x = \\frac{-b \\pm \\sqrt{b^2-4ac}}{2a} \\)",
        "\\[\n\\begin{aligned} a*b*c &= \\{1, 2\\} \\\\ d_1 + e_1 &= 3 \\end{aligned}\n\\]",
        "$a*b*c$",
        "$$\\sum_{i=1}^n i = \\frac{n(n+1)}{2}$$",
    ]
    assert message.locator(".body em").all_text_contents() == ["really"]
    shown = message.locator(".body").text_content().strip()
    assert shown.endswith(" and \\boxed{42}. It costs $5 and $10, really.")
