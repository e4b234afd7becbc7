"""The web chat page at its edges, in a real headless Chromium against the real server (the helpers of
test_web_page.py): numbers as typed in Settings, a connection lost in the middle of an answer, and the
transcript's scroll when an answer ends."""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time

import httpx
import pytest
from playwright.sync_api import expect
from test_web_page import CHAT_URL, _sse, answer, chat_bodies, open_settings, trickle_downloads

pytestmark = pytest.mark.slow


def test_sampling_numbers_are_sent_as_the_fields_read_them(server, open_page):
    """Number fields take exponent notation, and the integer ones were read with parseInt: max tokens "1e1"
    asked for 1 token, seed "1e3" was seed 1. A seed past 2**53 is no number JavaScript holds exactly (it
    went as another seed): it is refused with the field's message, and nothing is sent. A negative seed, which
    the API takes, is sent as typed."""
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
    page.fill("#seed", "-7")
    page.fill("#prompt", "Once more")
    page.keyboard.press("Enter")
    answer(page, 2)
    assert len(bodies) == 3 and bodies[2]["seed"] == -7


def _answer_then_drop(first_event: str):
    """A server on 127.0.0.1 that answers one chat request with a chunked event stream, sends
    `first_event`, and then drops the connection mid-stream, as a server that dies does."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            data = first_event.encode()
            connection.sendall(head + b"%x\r\n%s\r\n" % (len(data), data))
            time.sleep(0.5)  # the page shows the first piece
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_a_connection_dropped_mid_answer_says_so_and_the_page_goes_on(server, open_page):
    """The server went away in the middle of an answer (killed, the network dropped): the page said "could
    not reach the server: network error" about a server that had been answering. It says the connection
    closed before the answer finished, keeps what came, and the next message goes to the server again."""
    page = open_page(server.url)
    bodies = chat_bodies(page)
    first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Half an"}}]}
    listener, thread = _answer_then_drop(f"data: {json.dumps(first)}\n\n")
    dropped = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/chat/completions"
    with listener:
        page.route(CHAT_URL, lambda route: route.continue_(url=dropped))
        page.fill("#prompt", "Tell me")
        page.keyboard.press("Enter")
        message = answer(page, 0, state="error", timeout=10_000)
        thread.join(timeout=5)
    assert message.locator(".body").text_content().strip() == "Half an"
    shown = "the connection closed before the answer finished (network error)"
    assert message.locator(".meta").text_content() == f"Failed: {shown}"
    assert page.text_content("#error") == shown
    assert page.is_visible("#send") and page.is_hidden("#stop")

    page.unroute(CHAT_URL)  # the real server again: the page goes on with the conversation
    open_settings(page)
    page.fill("#max_tokens", "2")
    page.fill("#prompt", "Go on")
    page.press("#prompt", "Enter")
    answer(page, 1)
    assert page.is_hidden("#error")
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "Tell me"},
        {"role": "assistant", "content": "Half an"},
        {"role": "user", "content": "Go on"},
    ]


def test_a_long_answer_ends_with_its_note_in_view_and_a_reader_who_scrolled_up_stays_put(server, open_page):
    """The transcript follows a long answer while its reader is at the end: the last render scrolled to
    the end and then the note ("Stopped.", "Failed: ...", the token counts) was added below the fold. A
    reader who scrolled up stays where they are while the answer streams."""
    page = open_page(server.url, viewport={"width": 800, "height": 500})
    long_answer = "".join(f"Paragraph {i}: some words here.\n\n" for i in range(60))
    body = _sse([long_answer[i : i + 100] for i in range(0, len(long_answer), 100)])
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    below = "() => { const t = document.getElementById('transcript'); "
    below += "return t.scrollHeight - t.scrollTop - t.clientHeight; }"
    page.fill("#prompt", "Write a lot.")
    page.keyboard.press("Enter")
    message = answer(page, 0)
    assert page.evaluate(below) <= 1
    assert message.locator(".meta").text_content() == "42 tokens · prompt 9 tokens"
    assert page.locator(".message.assistant .meta").is_visible()
    box, view = message.locator(".meta").bounding_box(), page.locator("#transcript").bounding_box()
    assert box["y"] + box["height"] <= view["y"] + view["height"]

    # The real server's next answer, streaming for a few seconds: its bytes trickle in (the tiny model's 40
    # tokens could all arrive between two looks at the message's state, which then never read "streaming")
    trickle_downloads(page, 2_000)
    page.unroute(CHAT_URL)
    page.route(
        CHAT_URL,
        lambda route: route.continue_(
            post_data=json.dumps({**route.request.post_data_json, "ignore_eos": True, "max_tokens": 40})
        ),
    )
    page.fill("#prompt", "Again.")
    page.keyboard.press("Enter")
    answer(page, 1, state="streaming")
    page.evaluate("() => { document.getElementById('transcript').scrollTop = 100; }")
    answer(page, 1)
    assert page.evaluate("() => document.getElementById('transcript').scrollTop") == 100
    assert page.evaluate(below) > 1000


def test_a_one_token_answer_says_one_token_and_html_typed_by_the_user_stays_text(server, open_page):
    """max tokens 1 said "1 tokens". What the user types is text too: markup in it is shown as typed and
    sent as typed, never made into elements."""
    page = open_page(server.url)
    bodies = chat_bodies(page)
    open_settings(page)
    page.fill("#max_tokens", "1")
    typed = '<img src=x onerror="window.pwned = 1"> <b>bold?</b> & "quotes"'
    page.fill("#prompt", typed)
    page.press("#prompt", "Enter")
    message = answer(page, 0)
    assert re.fullmatch(
        r"Cut off at the max tokens set in Settings\. 1 token · prompt \d+ tokens",
        message.locator(".meta").text_content(),
    )
    assert bodies[0]["messages"] == [{"role": "user", "content": typed}]
    question = page.locator(".message.user .body")
    assert question.text_content() == typed
    assert question.locator("*").count() == 0
    assert page.evaluate("() => window.pwned") is None


def test_a_message_refused_for_its_api_key_says_where_the_key_goes(make_server, open_page):
    """A server restarted with --api-key while the page was open: sending said only "a valid API key is
    required: Authorization: Bearer KEY", an HTTP header a page user never sees; the models list said to
    set the key in Settings, the message did not."""
    page = open_page(make_server(api_key="web2-key").url)
    expect(page.locator("#error")).to_contain_text("(set the API key in Settings)")  # the models list
    page.fill("#prompt", "Hi")
    page.keyboard.press("Enter")
    expect(page.locator("#error")).to_have_text(
        "401 Unauthorized: a valid API key is required: Authorization: Bearer KEY"
        " (set the API key in Settings)"
    )
    assert page.locator(".message").count() == 0 and page.input_value("#prompt") == "Hi"


def test_an_api_key_with_a_character_no_header_carries_says_so(make_server, open_page):
    """A key pasted with a character past Latin-1 (a zero-width space from a document, a curly quote): the
    browser refuses to send such a header, and the page said "could not reach the server: Failed to
    execute 'fetch' on 'Window'..." about a server that was there. It names the character and the field;
    the key retyped, the models list and the message go through."""
    page = open_page(make_server(api_key="web3-key").url)
    open_settings(page)
    page.fill("#api-key", "web3-key\u200b")
    page.press("#api-key", "Tab")
    said = "the API key in Settings holds U+200B, which an HTTP header cannot carry: retype the key"
    expect(page.locator("#error")).to_have_text(f"Could not list models: {said}")
    page.fill("#prompt", "Hi")
    page.press("#prompt", "Enter")
    expect(page.locator("#error")).to_have_text(said)
    assert page.locator(".message").count() == 0 and page.input_value("#prompt") == "Hi"
    page.fill("#api-key", "web3-key")
    page.press("#api-key", "Tab")
    expect(page.locator("#model")).to_have_text("tiny")
    page.fill("#max_tokens", "2")
    page.press("#prompt", "Enter")
    answer(page, 0)
    assert page.is_hidden("#error")


# Every request answered as over HTTP/2 through a proxy whose upstream is down: no reason phrase (HTTP/2 has
# none, so statusText is empty) and an HTML page for a body.
PROXY_DOWN = """(status) => {
  window.fetch = async () => new Response("<html><body><h1>Bad Gateway</h1></body></html>",
    { status, statusText: "", headers: { "content-type": "text/html" } });
}"""


@pytest.mark.parametrize(
    ("status", "words"),
    [(502, "Bad Gateway"), (503, "Service Unavailable"), (429, "Too Many Requests"), (520, "Server Error")],
)
def test_an_error_over_http2_through_a_proxy_is_said_in_words(server, open_page, status, words):
    """Behind a proxy speaking HTTP/2 (an ingress with TLS), an error has no reason phrase and its body is the
    proxy's HTML page: the page said "Could not list models: 502" and, for a message, just "502". The
    status's own words are said."""
    page = open_page(server.url)
    expect(page.locator("#model")).to_have_text("tiny")
    page.evaluate(PROXY_DOWN, status)
    page.evaluate("window.dispatchEvent(new Event('focus'))")
    expect(page.locator("#error")).to_have_text(f"Could not list models: {status} {words}")
    page.fill("#prompt", "Hi")
    page.keyboard.press("Enter")
    expect(page.locator("#error")).to_have_text(f"{status} {words}")
    assert page.locator(".message").count() == 0 and page.input_value("#prompt") == "Hi"


def test_the_page_goes_on_when_its_server_restarts(chat_llm, open_page):
    """The server stopped and started again on its port while the page stayed open: a message sent while
    it is down fails with one line and is back in the box; the next one, once it is up, is answered with
    the conversation so far."""
    from live import LiveServer

    from qwenkit.server import ServerConfig, create_app

    def app():
        return create_app(chat_llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))

    first = LiveServer(app())
    with first:
        page = open_page(first.url)
        bodies = chat_bodies(page)
        open_settings(page)
        page.fill("#max_tokens", "2")
        page.fill("#prompt", "One")
        page.press("#prompt", "Enter")
        said = answer(page, 0).locator(".body").text_content()
    page.fill("#prompt", "Two")
    page.press("#prompt", "Enter")
    expect(page.locator("#error")).to_have_text("could not reach the server: Failed to fetch")
    assert page.locator(".message").count() == 2 and page.input_value("#prompt") == "Two"

    again = LiveServer(app())
    again.server.config.port, again.url = first.port, first.url
    with again:
        page.press("#prompt", "Enter")
        answer(page, 1)
    assert page.is_hidden("#error")
    sent = bodies[-1]["messages"]
    assert [(m["role"], m["content"]) for m in sent[::2]] == [("user", "One"), ("user", "Two")]
    assert sent[1]["role"] == "assistant" and sent[1]["content"].split() == said.split()


def test_an_answer_cut_off_at_the_servers_default_length_says_where_to_ask_for_more(server, open_page):
    """With Max tokens blank the server cuts an answer at its default length (the model's
    generation_config, 64 tokens for the test model; 256 where it names none, a Qwen3's thinking alone),
    and the page said "Cut off at the max_tokens limit." about a limit the user never set or saw."""
    page = open_page(server.url)
    page.route(
        CHAT_URL,
        lambda route: route.continue_(
            post_data=json.dumps({**route.request.post_data_json, "ignore_eos": True})
        ),
    )
    bodies = chat_bodies(page)
    page.fill("#prompt", "Write an essay.")
    page.keyboard.press("Enter")
    message = answer(page, 0)
    assert "max_tokens" not in bodies[0]
    assert re.fullmatch(
        r"Cut off at the server's default length: Max tokens in Settings allows longer answers\. "
        r"64 tokens · (?:[\d.]+ tokens/s · )?prompt \d+ tokens",  # no rate for an answer under 0.1 s
        message.locator(".meta").text_content(),
    )


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/render.js", "/static/vendor/marked.esm.js"])
def test_the_page_and_its_scripts_are_checked_with_the_server_before_a_cached_copy_is_used(server, path):
    """They went out with no Cache-Control, so a browser kept using its copy for as long as its own guess
    (a tenth of the file's age): after an upgrade it ran the old page, or the new app.js beside an old
    render.js it still held, for hours or days. Each is checked with the server every time: its ETag
    comes back, and an unchanged file is a 304 without a body."""
    first = httpx.get(server.url + path, timeout=10)
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
    again = httpx.get(server.url + path, headers={"If-None-Match": first.headers["etag"]}, timeout=10)
    assert again.status_code == 304 and again.content == b""
    assert again.headers["cache-control"] == "no-cache"
