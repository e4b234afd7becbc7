"""The web chat page in a real headless Chromium (Debian's package, driven by Playwright) against the real
server on 127.0.0.1: streaming, multi-turn history, stop, settings, API key, errors, markdown safety.

The tiny random model answers gibberish, so answers are checked against the server's own non-streamed
answer for the same request, and the request bodies the page sends are read from the browser.
"""

from __future__ import annotations

import itertools
import json
import re
import time

import httpx
import pytest
from browser_pages import LAN_HOST
from playwright.sync_api import expect

pytestmark = pytest.mark.slow

CHAT_URL = "**/v1/chat/completions"
API_KEY = "page-test-key"
MODEL = "tiny"  # the served model name in conftest.py


def chat_bodies(page) -> list[dict]:
    """Record the JSON body of every chat request the page sends."""
    bodies: list[dict] = []
    page.on(
        "request",
        lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None,
    )
    return bodies


def open_settings(page) -> None:
    page.click("#settings-toggle")
    page.wait_for_selector("#settings", state="visible")


def record_answer_text(page) -> None:
    """Keep every text the newest answer shows (innerText: as rendered, a line break as a newline), to see
    it grow while the answer streams."""
    page.evaluate(
        """() => {
        window.answerTexts = [];
        new MutationObserver(() => {
            const bodies = document.querySelectorAll('.message.assistant .body');
            const text = bodies.length ? bodies[bodies.length - 1].innerText : '';
            if (text && window.answerTexts.at(-1) !== text) window.answerTexts.push(text);
        }).observe(document.getElementById('transcript'),
                   {childList: true, subtree: true, characterData: true});
    }"""
    )


def trickle_downloads(page, bytes_per_second: int) -> None:
    """Chromium's own network throttling: the answer's bytes reach the page over a second or more,
    however fast the server generates, so its stream spans many frames (the page draws once a frame, and
    a whole answer of the tiny model can arrive inside one). -1 turns it off."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": bytes_per_second, "uploadThroughput": -1},
    )


def answer(page, index: int, state: str = "done", timeout: float = 60_000):
    """The index-th assistant message, once it has reached `state`."""
    message = page.locator(".message.assistant").nth(index)
    expect(message).to_have_attribute("data-state", state, timeout=timeout)
    return message


def test_streamed_answer_grows_and_equals_the_direct_answer_and_turns_carry_history(server, open_page):
    page = open_page(server.url)
    expect(page.locator("#model")).to_have_text(MODEL)
    bodies = chat_bodies(page)
    open_settings(page)
    page.fill("#system", "You are terse.")
    page.fill("#temperature", "1")  # seeded sampling: greedy picks only newlines here
    page.fill("#seed", "7")
    page.fill("#max_tokens", "24")
    record_answer_text(page)
    trickle_downloads(page, 2_000)  # about 4 KB of events: 2 s

    page.click("#prompt")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("line two")
    assert bodies == []
    page.keyboard.press("Enter")
    first = answer(page, 0)

    system = {"role": "system", "content": "You are terse."}
    user = {"role": "user", "content": "line one\nline two"}
    assert len(bodies) == 1
    assert bodies[0]["messages"] == [system, user]
    assert bodies[0]["stream"] is True
    assert (bodies[0]["temperature"], bodies[0]["seed"], bodies[0]["max_tokens"]) == (1, 7, 24)
    assert bodies[0]["model"] == MODEL
    assert page.locator(".message.user .body").first.text_content() == "line one\nline two"

    # The answer appeared piece by piece while it streamed, not all at once at the end.
    shown = page.evaluate("() => window.answerTexts")
    assert len(shown) >= 2 and len(shown[0]) < len(shown[-1]), shown
    assert first.locator(".body").inner_text() == shown[-1]
    assert re.search(r"\b24 tokens\b", first.locator(".meta").text_content())

    direct = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [system, user], "temperature": 1, "seed": 7, "max_tokens": 24},
        timeout=60,
    ).json()
    expected = direct["choices"][0]["message"]["content"]
    assert expected.strip()
    assert " ".join(shown[-1].split()) == " ".join(expected.split())  # what the page shows

    # The second turn sends the whole conversation; the first answer as streamed is exactly the direct one.
    trickle_downloads(page, -1)
    page.fill("#max_tokens", "2")
    page.fill("#prompt", "And again?")
    page.click("#send")
    answer(page, 1)
    assert len(bodies) == 2
    assert bodies[1]["messages"] == [
        system,
        user,
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "And again?"},
    ]
    assert page.locator(".message.assistant").count() == 2


def test_stop_button_ends_a_running_answer_and_the_server_aborts_it(server, open_page):
    page = open_page(server.url)
    # An answer that would run for thousands of tokens: the page's max_tokens plus ignore_eos added here.
    page.route(
        CHAT_URL,
        lambda route: route.continue_(
            post_data=json.dumps({**route.request.post_data_json, "ignore_eos": True})
        ),
    )
    open_settings(page)
    page.fill("#max_tokens", "6000")
    page.fill("#temperature", "1")
    page.fill("#prompt", "Tell me a long story.")
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.assistant[data-state=streaming]")
    page.wait_for_function("() => document.querySelector('.message.assistant .body').textContent.length > 40")
    assert page.is_visible("#stop") and not page.is_visible("#send")

    page.click("#stop")
    stopped = answer(page, 0, state="stopped", timeout=5_000)
    assert stopped.locator(".meta").text_content() == "Stopped."
    assert page.is_visible("#send") and not page.is_visible("#stop")
    text = stopped.locator(".body").text_content()
    assert text
    time.sleep(0.5)
    assert stopped.locator(".body").text_content() == text  # nothing arrives after the stop

    # The server saw the disconnect and aborted the request: nothing is left running.
    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
        running = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", metrics, re.M)
        assert running, metrics
        if float(running.group(1)) == 0:
            break
        assert time.monotonic() < deadline, "the stopped request still runs on the server"
        time.sleep(0.1)

    # Escape stops an answer too, wherever the focus is.
    page.fill("#prompt", "Go on.")
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.assistant[data-state=streaming] >> nth=0")
    page.focus("#new-chat")
    page.keyboard.press("Escape")
    expect(page.locator(".message.assistant").nth(1)).to_have_attribute("data-state", "stopped")

    # "New chat" in the middle of an answer stops it and starts from an empty conversation.
    bodies = chat_bodies(page)
    page.fill("#prompt", "Another long one.")
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.assistant[data-state=streaming]")
    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    page.fill("#max_tokens", "2")
    page.fill("#prompt", "Fresh start.")
    page.keyboard.press("Enter")
    answer(page, 0)
    assert bodies[-1]["messages"] == [{"role": "user", "content": "Fresh start."}]
    expect(page.locator(".message")).to_have_count(2)


def test_errors_are_shown_before_and_during_an_answer(server, open_page):
    page = open_page(server.url)
    open_settings(page)
    page.fill("#max_tokens", "100000")  # past the model's 8192-token context: the real server's 400
    page.fill("#prompt", "Hello")
    page.keyboard.press("Enter")
    error = page.wait_for_selector("#error:not([hidden])")
    assert "400" in error.text_content()
    assert "maximum context length is 8192 tokens" in error.text_content()
    assert page.locator(".message").count() == 0  # the failed turn is taken back ...
    assert page.input_value("#prompt") == "Hello"  # ... and the message is back in the box to retry

    # An error event in the middle of a stream: the part that came stays, marked as failed.
    first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Partial"}}]}
    failure = {"error": {"message": "the engine failed on this request", "type": "server_error"}}
    body = f"data: {json.dumps(first)}\n\ndata: {json.dumps(failure)}\n\ndata: [DONE]\n\n"
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.fill("#max_tokens", "")
    page.press("#prompt", "Enter")  # "Hello", kept from the failed turn
    message = answer(page, 0, state="error")
    assert message.locator(".body").text_content().strip() == "Partial"
    assert message.locator(".meta").text_content() == "Failed: the engine failed on this request"
    assert page.text_content("#error") == "the engine failed on this request"


def test_a_failure_to_list_the_models_is_cleared_when_the_server_answers_again(server, open_page):
    """The page looks at /v1/models again when it is come back to: after a failure (the server restarting)
    the next good answer showed the model, but the alert that it could not be listed stayed."""
    page = open_page(server.url)
    expect(page.locator("#model")).to_have_text(MODEL)
    page.route(
        "**/v1/models", lambda route: route.fulfill(status=503, json={"error": {"message": "loading"}})
    )
    page.evaluate("window.dispatchEvent(new Event('focus'))")
    expect(page.locator("#error")).to_have_text("Could not list models: 503 Service Unavailable: loading")
    expect(page.locator("#model")).to_have_text("model unavailable")
    page.unroute("**/v1/models")
    page.evaluate("window.dispatchEvent(new Event('focus'))")
    expect(page.locator("#model")).to_have_text(MODEL)
    expect(page.locator("#error")).to_be_hidden()


def test_api_key_is_sent_as_bearer_and_kept_in_the_browser(make_server, open_page):
    page = open_page(make_server(api_key=API_KEY).url)
    error = page.wait_for_selector("#error:not([hidden])")
    assert "401" in error.text_content() and "API key" in error.text_content()

    open_settings(page)
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")  # commit the field: the page lists the models again with the key
    expect(page.locator("#model")).to_have_text(MODEL)
    assert page.is_hidden("#error")
    page.fill("#system", "Be brief.")
    page.fill("#max_tokens", "3")

    with page.expect_request(CHAT_URL) as request:
        page.fill("#prompt", "Hi")
        page.keyboard.press("Enter")
    assert request.value.headers["authorization"] == f"Bearer {API_KEY}"
    assert answer(page, 0).locator(".body").text_content()

    page.reload()
    assert page.input_value("#api-key") == API_KEY
    assert page.input_value("#system") == "Be brief."
    assert page.input_value("#max_tokens") == "3"
    expect(page.locator("#model")).to_have_text(MODEL)


# One answer served by the browser itself, so its content is known: Qwen3 thinking, markdown with a code
# block, and HTML that tries to run script. Framed with \r\n and a keep-alive comment, split mid-line
# across events.
ANSWER = (
    "<think>\nThe user wants code.\n</think>\n\nHere is **bold** and code:\n\n```python\nprint('hi')  # "
    + "x" * 300
    + '\n```\n\n<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">\n\n'
    "[click](javascript:window.pwned=3) [site](https://example.com)\n\n"
    "To center a <div>, flex its parent; <br> breaks a line, and <title> goes in <head>. 1 < 2."
)


def _sse(pieces: list[str]) -> str:
    def chunk(choices: list[dict], **extra: object) -> dict:
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "qwenkit",
                "choices": choices, **extra}  # fmt: skip

    deltas = [{"role": "assistant", "content": pieces[0]}] + [{"content": p} for p in pieces[1:]]
    events = [chunk([{"index": 0, "delta": d, "finish_reason": None}]) for d in deltas]
    events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    events.append(chunk([], usage={"prompt_tokens": 9, "completion_tokens": 42, "total_tokens": 51}))
    body = ": ping\r\n\r\n" + "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events)
    return body + "data: [DONE]\r\n\r\n"


def test_markdown_is_rendered_and_model_html_cannot_run_script_on_a_phone_screen(server, open_page):
    # The page's Content-Security-Policy would block inline script too; bypass it so the sanitizer alone
    # is what keeps the script from running.
    assert "script-src 'self'" in httpx.get(server.url, timeout=10).text
    phone = {"viewport": {"width": 390, "height": 800}, "is_mobile": True, "has_touch": True}
    clipboard = ["clipboard-read", "clipboard-write"]
    page = open_page(server.url, **phone, bypass_csp=True, permissions=clipboard)
    cut = [0, 5, 30, 60, 90, len(ANSWER) - 40, len(ANSWER)]
    pieces = [ANSWER[a:b] for a, b in itertools.pairwise(cut)]
    page.route(
        CHAT_URL,
        lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=_sse(pieces)
        ),
    )
    page.fill("#prompt", "Show me code")
    page.keyboard.press("Enter")
    message = answer(page, 0)

    code = message.locator("pre > code")
    assert code.count() == 1
    assert code.get_attribute("class") == "language-python"
    assert code.text_content().startswith("print('hi')  # xxx")
    assert message.locator("strong").text_content() == "bold"
    message.locator("pre button.copy").click()
    expect(message.locator("pre button.copy")).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == code.text_content()
    thinking = message.locator("details.thinking")
    assert thinking.locator("summary").text_content() == "Thought"
    assert thinking.locator(".markdown").text_content().strip() == "The user wants code."
    assert "The user wants code" not in message.locator(".body").text_content()
    assert "42 tokens" in message.locator(".meta").text_content()

    assert page.evaluate("() => window.pwned") is None
    assert message.locator("script, img, [onerror]").count() == 0
    # HTML the model writes is shown as text: rendered, "<div>" vanished and "<title>" took the rest along
    shown = message.locator(".body").inner_text()
    assert '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">' in shown
    assert shown.endswith(
        "To center a <div>, flex its parent; <br> breaks a line, and <title> goes in <head>. 1 < 2."
    )
    assert message.locator(".body div, .body title, .body br").count() == 0
    hrefs = message.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert "https://example.com" in hrefs
    assert not [h for h in hrefs if h and not h.startswith("https://")]
    site = message.locator("a[href='https://example.com']")
    assert site.get_attribute("target") == "_blank" and "noopener" in site.get_attribute("rel")

    # Readable on a phone: a long code line scrolls inside its block; the page does not scroll sideways.
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    pre = message.locator("pre")
    assert pre.evaluate("pre => pre.scrollWidth > pre.clientWidth")
    assert page.is_visible("#prompt") and page.is_visible("#send")


def test_code_copies_on_a_page_served_to_the_network_over_plain_http(server, open_page):
    """Browsers give the Clipboard API only to secure contexts (https, localhost): the page that
    `serve --host 0.0.0.0` gives another machine had no Copy buttons at all; it copies another way."""
    page = open_page(server.url.replace("127.0.0.1", LAN_HOST))
    assert page.evaluate("() => [window.isSecureContext, typeof navigator.clipboard]") == [False, "undefined"]
    body = _sse(["Run:\n\n```sh\nls -la ~\n```\n"])
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.fill("#prompt", "Show me code")
    page.keyboard.press("Enter")
    copy = answer(page, 0).locator("pre button.copy")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("() => document.activeElement.className") == "copy"  # the keyboard stays on it
    # the browser's clipboard, read back from a page that has the API (the same origin as the server's)
    reader = page.context.new_page()
    reader.goto(server.url)
    page.context.grant_permissions(["clipboard-read"], origin=server.url)
    assert reader.evaluate("() => navigator.clipboard.readText()") == "ls -la ~\n"


def _thinking_events(reasoning: list[str], content: list[str], finish_reason: str) -> str:
    deltas = [{"reasoning_content": r} for r in reasoning] + [{"content": c} for c in content]
    events = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("reasoning", "content"),
    [(["The user", " wants"], []), ([], ["<think>\nThe user", " wants"])],
    ids=["reasoning_content", "think-tag-in-content"],
)
def test_an_answer_cut_off_while_thinking_no_longer_says_thinking(server, open_page, reasoning, content):
    """max_tokens reached inside Qwen3's thinking: the answer is over, but its fold went on saying
    "Thinking…" as if more were coming."""
    page = open_page(server.url)
    body = _thinking_events(reasoning, content, "length")
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.fill("#prompt", "hi")
    page.keyboard.press("Enter")
    message = answer(page, 0)
    assert message.locator("details.thinking summary").text_content() == "Thought"
    assert message.locator("details.thinking .markdown").text_content().strip() == "The user wants"
    assert message.locator(".meta").text_content().startswith("Cut off at the server's default length: ")


def test_the_keyboard_stays_in_the_composer_when_the_focused_stop_button_hides(server, open_page):
    """A keyboard user tabs to Stop while an answer streams; the answer ends on its own and Stop hides:
    the focus fell to the start of the page, and the next Tab went to the header."""
    page = open_page(server.url)
    open_settings(page)
    page.fill("#temperature", "1")
    page.fill("#seed", "7")
    page.fill("#max_tokens", "24")
    trickle_downloads(page, 2_000)  # the answer takes about 2 s to arrive
    page.fill("#prompt", "Hello")
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.assistant[data-state=streaming]")
    page.keyboard.press("Tab")  # from the message box: Send is hidden, Stop is next
    assert page.evaluate("() => document.activeElement.id") == "stop"
    answer(page, 0)
    assert page.is_hidden("#stop")
    assert page.evaluate("() => document.activeElement.id") == "prompt"


def test_event_stream_parser_is_indifferent_to_where_network_reads_split_the_bytes(server, open_page):
    """static/sse.js on every two-read split of a stream mixing \\r\\n, \\r and \\n line ends, comments,
    multi-line data, fields other than data, and a multi-byte character."""
    page = open_page(server.url)
    stream = (
        ': ping\r\n\r\ndata: {"a":1}\r\n\r\n'
        "event: x\rdata:no-space\r\r"
        "data: two\ndata: lines\n\n"
        "data: crlf\r\ndata: joined\r\n\r\n"
        "id: 5\ndata: é€😀\n\n"
        "data: unterminated"  # no blank line before the end: the spec drops it
    )
    events = page.evaluate(
        """async (text) => {
            const { sseData } = await import('./static/sse.js');
            const bytes = new TextEncoder().encode(text);
            const results = [];
            for (let cut = 0; cut <= bytes.length; cut++) {
                const body = new ReadableStream({
                    start(controller) {
                        controller.enqueue(bytes.slice(0, cut));
                        controller.enqueue(bytes.slice(cut));
                        controller.close();
                    },
                });
                const seen = [];
                for await (const data of sseData(body)) seen.push(data);
                results.push(JSON.stringify(seen));
            }
            return [...new Set(results)];
        }""",
        stream,
    )
    assert [json.loads(e) for e in events] == [['{"a":1}', "no-space", "two\nlines", "crlf\njoined", "é€😀"]]


def test_a_server_with_lora_adapters_gets_a_model_picker(tiny_chat_model, tmp_path, open_page):
    """With adapters served beside the base model (--lora-modules) the page shows a picker of the models;
    the one picked is asked, the answer equals the API's for that model, and the pick is kept."""
    from factories import write_lora_adapter
    from live import LiveServer

    from qwenkit.generate import LLM
    from qwenkit.server import ServerConfig, create_app

    adapter = str(write_lora_adapter(tiny_chat_model, tmp_path / "poet", seed=2, std=0.5))
    llm = LLM.load(tiny_chat_model, max_batch_size=4, progress=False, adapters={"poet": adapter})
    config = ServerConfig(served_model_name=MODEL, lora_modules=(("poet", adapter),))
    try:
        with LiveServer(create_app(llm, config)) as live:
            page = open_page(live.url)
            pick = page.locator("#model-pick")
            expect(pick).to_be_visible()
            assert pick.locator("option").all_inner_texts() == [MODEL, "poet"]
            assert pick.input_value() == MODEL and page.locator("#model").is_hidden()
            bodies = chat_bodies(page)
            pick.select_option("poet")
            open_settings(page)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.fill("#prompt", "Name three colours.")
            page.click("#send")
            shown = answer(page, 0).locator(".body").inner_text()
            assert bodies[0]["model"] == "poet"
            assert page.locator(".message.assistant .who").first.text_content() == "poet"
            messages = [{"role": "user", "content": "Name three colours."}]
            direct = {
                m: httpx.post(
                    f"{live.url}/v1/chat/completions",
                    json={"model": m, "messages": messages, "temperature": 0, "max_tokens": 12},
                    timeout=60,
                ).json()["choices"][0]["message"]["content"]
                for m in ("poet", MODEL)
            }
            assert direct["poet"] != direct[MODEL]
            assert " ".join(shown.split()) == " ".join(direct["poet"].split())
            page.reload()
            expect(page.locator("#model-pick")).to_have_value("poet")  # kept in this browser
    finally:
        llm.close()


def test_adapters_loaded_or_unloaded_while_the_page_is_open_show_in_its_picker(
    tiny_chat_model, tmp_path, open_page
):
    """With runtime LoRA loading on, the page looks at the served models again when it is come back to
    (window focus), and when the model it asked for is gone (404): an adapter loaded meanwhile joins the
    picker, one unloaded leaves it, with the server's error shown."""
    from factories import write_lora_adapter
    from live import LiveServer

    from qwenkit.generate import LLM
    from qwenkit.server import ServerConfig, create_app

    adapter = str(write_lora_adapter(tiny_chat_model, tmp_path / "poet", seed=2, std=0.5))
    llm = LLM.load(tiny_chat_model, max_batch_size=4, progress=False)
    config = ServerConfig(served_model_name=MODEL, runtime_lora=True)
    try:
        with LiveServer(create_app(llm, config)) as live:
            page = open_page(live.url)
            expect(page.locator("#model")).to_have_text(MODEL)
            assert page.locator("#model-pick").is_hidden()
            body = {"lora_name": "poet", "lora_path": adapter}
            assert httpx.post(f"{live.url}/v1/load_lora_adapter", json=body, timeout=60).status_code == 200
            page.evaluate("window.dispatchEvent(new Event('focus'))")
            pick = page.locator("#model-pick")
            expect(pick).to_be_visible()
            assert pick.locator("option").all_inner_texts() == [MODEL, "poet"]
            pick.select_option("poet")
            body = {"lora_name": "poet"}
            assert httpx.post(f"{live.url}/v1/unload_lora_adapter", json=body, timeout=60).status_code == 200
            page.fill("#prompt", "Name three colours.")
            page.click("#send")
            error = page.wait_for_selector("#error:not([hidden])")
            assert "the model 'poet' does not exist" in error.text_content()
            expect(pick).to_be_hidden()
            expect(page.locator("#model")).to_have_text(MODEL)
    finally:
        llm.close()
