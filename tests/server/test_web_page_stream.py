"""The web chat page while an answer streams, in a real headless Chromium: the answer's events are fed to
the page one by one from the test (a stand-in for the chat request's body), so what the page shows can be
read between any two tokens."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect
from test_web_page import CHAT_URL, _sse, answer, chat_bodies, open_settings

pytestmark = pytest.mark.slow

# The chat request answers with a stream the test writes to: window.feed(event) sends one event, window.feed()
# ends the answer.
FED_STREAM = """(() => {
  const realFetch = window.fetch;
  const encoder = new TextEncoder();
  let stream = null;
  window.feed = (event) => {
    if (event === undefined) {
      stream.enqueue(encoder.encode("data: [DONE]\\n\\n"));
      stream.close();
    } else stream.enqueue(encoder.encode(`data: ${JSON.stringify(event)}\\n\\n`));
  };
  window.fetch = (url, init) => {
    if (!String(url).endsWith("chat/completions")) return realFetch(url, init);
    const body = new ReadableStream({ start: (controller) => { stream = controller; } });
    const headers = { "content-type": "text/event-stream" };
    return Promise.resolve(new Response(body, { status: 200, headers }));
  };
})();"""

# Send one event and wait two frames: the page has read it and drawn it (it draws once a frame).
FEED_AND_DRAW = """(event) => {
  window.feed(event);
  return new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
}"""

# The answer's body as the page shows it, without the Copy buttons added to code at the end.
SHOWN_HTML = """(body) => {
  const copy = body.cloneNode(true);
  for (const button of copy.querySelectorAll("button.copy")) button.remove();
  return copy.innerHTML;
}"""

# `text` rendered whole at once by the page's own renderer: what streaming must end up showing.
WHOLE_HTML = """async (text) => {
  const { renderMarkdown, splitThinking } = await import("/static/render.js");
  const render = (markdown) => {
    const element = document.createElement("div");
    renderMarkdown(element, markdown);
    return element.innerHTML;
  };
  const { thinking, answer } = splitThinking(text);
  return { answer: render(answer), thinking: thinking === null ? null : render(thinking) };
}"""

# Select characters start..end of the first text of the element `selector` finds; the text selected.
SELECT = """([selector, start, end]) => {
  const node = document.querySelector(selector).firstChild;
  const range = document.createRange();
  range.setStart(node, start);
  range.setEnd(node, end);
  getSelection().removeAllRanges();
  getSelection().addRange(range);
  return getSelection().toString();
}"""

RICH = (
    "<think>\nThe user wants **code**;\nlist the steps:\n\n1. read\n2. write\n</think>\n\n"
    "# Plan\n\nHere is *the* plan — naïve café, 日本語のテキスト, مرحبا 👋🏽.\n"
    "Para continues\n#not a heading\n\n- one\n- two\n  still two\n\n  loose two\n- three\n\n"
    "```python\ndef f(x):\n    return x * 2  # ✓\n\n\nprint(f(3))\n```\n\n"
    "| a | b |\n|---|---|\n| 1 | 2 |\n\n> quoted\nlazy line\n\nHeading after text\n---\n\n"
    "    indented code\n\nMath \\( a*b \\) and $x_1*y$ for $5, then\n\\[\n\\{1\\} \\\\ 2\n\\]\n\n"
    "- [x] done\n- [ ] ![alt](https://example.com/i.png)\n\n"
    "See [the docs][d] and [x].\n\n[d]: https://example.com/d\n\n"
    "Last line with `code` and a [link](https://example.com/x)."
)


def _chunk(delta: dict, finish_reason: str | None = None) -> dict:
    choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices}


def _start(server, open_page):
    page = open_page(server.url)
    page.evaluate(FED_STREAM)
    page.fill("#prompt", "Go")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('.message.assistant')")
    return page, page.locator(".message.assistant").last


def _feed(page, delta: dict) -> None:
    page.evaluate(FEED_AND_DRAW, _chunk(delta))


def _end(page, message) -> None:
    page.evaluate("(event) => window.feed(event)", _chunk({}, "stop"))
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    page.evaluate("(event) => window.feed(event)", {**_chunk({}), "choices": [], "usage": usage})
    page.evaluate("() => window.feed()")
    expect(message).to_have_attribute("data-state", "done", timeout=10_000)


@pytest.mark.parametrize("size", [1, 5, 23])
def test_a_streamed_answer_shows_at_every_step_what_rendering_its_text_whole_shows(server, open_page, size):
    """Streaming draws only the blocks still open at the end; each step, and the end, must still be the
    whole text rendered at once: code, lists, tables, a setext heading, thinking, text in many scripts
    (a piece may end in the middle of any of them)."""
    page, message = _start(server, open_page)
    body, thought = message.locator(".body"), message.locator("details.thinking .markdown")
    text = ""
    for start in range(0, len(RICH), size):
        text += RICH[start : start + size]
        _feed(page, {"content": RICH[start : start + size]})
        if size == 1 and start % 17:
            continue  # one character at a time: compared every 17 (each comparison is a round trip)
        whole = page.evaluate(WHOLE_HTML, text)
        assert body.evaluate(SHOWN_HTML) == whole["answer"], text
        if whole["thinking"]:
            assert thought.evaluate("e => e.innerHTML") == whole["thinking"], text
    _end(page, message)
    whole = page.evaluate(WHOLE_HTML, RICH)
    assert body.evaluate(SHOWN_HTML) == whole["answer"]
    assert thought.evaluate("e => e.innerHTML") == whole["thinking"]
    assert body.locator("pre button.copy").count() == 2
    assert body.locator("h2").all_text_contents() == ["Heading after text"]
    assert "日本語のテキスト" in body.text_content()
    assert body.locator(".math").all_text_contents() == ["\\( a*b \\)", "$x_1*y$", "\\[\n\\{1\\} \\\\ 2\n\\]"]
    assert body.locator("li").all_text_contents()[-2:] == ["☑ done", "☐ Image: alt"]
    assert body.locator("a").evaluate_all("links => links.map(a => a.href)") == [
        "https://example.com/i.png",  # an image: a link to it
        "https://example.com/d",  # a reference defined after its use
        "https://example.com/x",
    ]


def test_a_selection_in_a_finished_part_survives_further_tokens(server, open_page):
    """The answer was drawn anew each frame: text a reader selected (to copy) in an earlier paragraph, or
    in the thinking, was unselected by the next token."""
    page, message = _start(server, open_page)
    _feed(page, {"reasoning_content": "First I think.\n\nThen I think more.\n\n"})
    _feed(page, {"reasoning_content": "Still thinking."})
    _feed(page, {"content": "Alpha paragraph, to be copied.\n\nBeta paragraph.\n\n"})
    _feed(page, {"content": "Gamma"})
    first_paragraph = ".message.assistant .body p"
    assert page.evaluate(SELECT, [first_paragraph, 0, 15]) == "Alpha paragraph"
    for piece in [" and more", " text.\n\nDelta", " ends", " here.\n\n- a list\n"]:
        _feed(page, {"content": piece})
        assert page.evaluate("() => getSelection().toString()") == "Alpha paragraph"
    first = message.locator(".body p").first
    assert first.evaluate("p => p.isConnected && getSelection().containsNode(p, true)")

    thinking_paragraph = ".message.assistant details.thinking .markdown p"
    page.click("details.thinking summary")
    assert page.evaluate(SELECT, [thinking_paragraph, 0, 7]) == "First I"
    for piece in [" More", " answer.\n\nAnd more.\n\n"]:
        _feed(page, {"content": piece})
        assert page.evaluate("() => getSelection().toString()") == "First I"
    _end(page, message)
    assert page.evaluate("() => getSelection().toString()") == "First I"  # the end draws nothing anew
    shown = message.locator(".body").inner_text()
    assert shown.startswith("Alpha paragraph, to be copied.\n\nBeta paragraph.\n\nGamma and more")


def test_a_selection_in_a_list_or_code_block_still_being_written_survives(server, open_page):
    """A long list or code block is one block until it ends: its earlier items and lines keep their nodes
    too, so text selected in them stays selected while it grows."""
    page, message = _start(server, open_page)
    _feed(page, {"content": "Steps:\n\n1. Preheat the oven.\n2. Mix"})
    assert page.evaluate(SELECT, [".message.assistant .body li", 0, 7]) == "Preheat"
    for piece in [" the flour.\n3.", " Bake", ".\n4. Eat.\n"]:
        _feed(page, {"content": piece})
        assert page.evaluate("() => getSelection().toString()") == "Preheat"
    _feed(page, {"content": "\n```python\nimport os\n"})
    assert page.evaluate(SELECT, [".message.assistant .body pre code", 0, 6]) == "import"
    for piece in ["print(os", ".getcwd())\n", "x = 1\n"]:
        _feed(page, {"content": piece})
        assert page.evaluate("() => getSelection().toString()") == "import"
    assert message.locator(".body li").all_text_contents() == [
        "Preheat the oven.",
        "Mix the flour.",
        "Bake.",
        "Eat.",
    ]
    assert message.locator(".body code").text_content() == "import os\nprint(os.getcwd())\nx = 1\n"


def test_a_selection_survives_a_link_reference_defined_later(server, open_page):
    """A link reference definition changes blocks before it (`[docs]` becomes a link), so the whole answer is
    compared again from then on; what did not change keeps its nodes all the same."""
    page, message = _start(server, open_page)
    _feed(page, {"content": "Intro paragraph.\n\nSee [docs].\n\nMore"})
    assert page.evaluate(SELECT, [".message.assistant .body p", 0, 5]) == "Intro"
    for piece in [" text.\n\n[docs]: https://example.com/d\n\n", "After", " it."]:
        _feed(page, {"content": piece})
        assert page.evaluate("() => getSelection().toString()") == "Intro"
    _end(page, message)
    assert page.evaluate("() => getSelection().toString()") == "Intro"
    assert message.locator(".body a").get_attribute("href") == "https://example.com/d"
    assert message.locator(".body p").all_text_contents() == [
        "Intro paragraph.",
        "See docs.",
        "More text.",
        "After it.",
    ]


def test_each_token_of_a_long_answer_touches_only_its_last_blocks(server, open_page):
    """Each frame replaced the whole answer's DOM: the work grew with the answer (a long answer's tail
    reached the screen seconds late). A token now changes a bounded number of nodes, however long."""
    page, message = _start(server, open_page)
    paragraphs = "".join(f"Paragraph {i} with some words in it.\n\n" for i in range(300))
    _feed(page, {"content": paragraphs + "Tail"})
    page.evaluate(
        """() => {
        window.changed = 0;
        const size = (node) => {  // a node and all the nodes in it
            let count = 1;
            for (const walker = document.createTreeWalker(node); walker.nextNode(); ) count += 1;
            return count;
        };
        new MutationObserver((records) => {
            for (const r of records) {
                for (const node of [...r.addedNodes, ...r.removedNodes]) window.changed += size(node);
            }
        }).observe(document.querySelector('.message.assistant .body'), {childList: true, subtree: true});
    }"""
    )
    counts = []
    for piece in [" grows", " by", " a word", ".\n\nNew", " block"]:
        page.evaluate("() => { window.changed = 0; }")
        _feed(page, {"content": piece})
        counts.append(page.evaluate("() => window.changed"))
    assert max(counts) <= 12, counts  # the two open blocks and their line breaks; once one more finishes
    assert message.locator(".body p").count() == 302
    assert message.locator(".body p").last.text_content() == "New block"

    _feed(page, {"content": "\n\n" + "".join(f"- item {i}\n" for i in range(300)) + "- last"})
    counts = []
    for piece in [" item", " grows", "\n- and", " one more"]:
        page.evaluate("() => { window.changed = 0; }")
        _feed(page, {"content": piece})
        counts.append(page.evaluate("() => window.changed"))
    assert max(counts) <= 12, counts  # a long list: its last items only
    assert message.locator(".body li").last.text_content() == "and one more"


def test_an_empty_answer_says_so(server, open_page):
    """An answer that ended at once (the end token first) showed an empty bubble with only its token
    counts, as if the page had failed to show it."""
    page = open_page(server.url)
    body = _sse([""])
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.fill("#prompt", "Say nothing.")
    page.keyboard.press("Enter")
    message = answer(page, 0)
    assert message.locator(".body").inner_html() == '<p class="empty-answer">(empty answer)</p>'
    assert message.locator(".meta").text_content() == "42 tokens · prompt 9 tokens"
    page.unroute(CHAT_URL)  # the real server takes the empty answer back as part of the conversation
    bodies = chat_bodies(page)
    open_settings(page)
    page.fill("#max_tokens", "3")
    page.fill("#prompt", "Now say hi.")
    page.keyboard.press("Enter")
    answer(page, 1)  # done, not failed: the server took the conversation
    assert bodies[0]["messages"] == [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now say hi."},
    ]
    assert page.locator("#error").is_hidden()
