"""Every response carries ``x-request-id`` (OpenAI's and vLLM's header): the openai SDK reads it into
``_request_id`` and an error's ``request_id``; a client's sane ``X-Request-Id`` is echoed, anything else
replaced; the server's log lines about a request name the same id."""

from __future__ import annotations

import logging
import re

import httpx
import openai
import pytest

from qwenkit.server import completions as routes
from qwenkit.server import responses as responses_route
from qwenkit.server.request_ids import chosen_request_id

OURS = re.compile(r"req_[0-9a-f]{32}")
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_the_sdk_reads_the_id_of_answers_streams_and_errors(client):
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=HELLO, max_tokens=2)
    completion = raw.parse()
    assert OURS.fullmatch(raw.request_id) and completion._request_id == raw.request_id
    assert raw.headers["x-request-id"] == raw.request_id
    assert completion.id.startswith("chatcmpl-") and completion.id != raw.request_id  # two ids, as OpenAI's
    again = client.completions.with_raw_response.create(model="tiny", prompt="hello", max_tokens=2)
    assert OURS.fullmatch(again.request_id) and again.request_id != raw.request_id
    assert again.parse().id.startswith("cmpl-")
    for stream in (
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, stream=True),
        client.completions.create(model="tiny", prompt="hello", max_tokens=2, stream=True),
    ):
        with stream:
            assert OURS.fullmatch(stream.response.headers["x-request-id"])
            assert len(list(stream)) >= 2
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=HELLO, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=-1)
    assert OURS.fullmatch(missing.value.request_id) and OURS.fullmatch(bad.value.request_id)
    assert missing.value.request_id != bad.value.request_id


def test_a_sane_client_id_is_echoed_on_every_answer(server, make_server):
    """As ``vllm bench serve`` sends it (a prefix and a count): on an answer, a stream, a 4xx, the gate's
    401, a CORS preflight, /health and an unknown path."""
    sent = {"X-Request-Id": "bench-0-17"}
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 2}
    answers = [
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=sent),
        httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, headers=sent),
        httpx.post(server.url + "/v1/chat/completions", json={**body, "n": 0}, headers=sent),
        httpx.get(server.url + "/health", headers=sent),
        httpx.get(server.url + "/nowhere", headers=sent),
    ]
    guarded = make_server(api_key="k", allowed_origins=("http://a.example",))
    preflight = {"Origin": "http://a.example", "Access-Control-Request-Method": "POST", **sent}
    answers += [
        httpx.post(guarded.url + "/v1/chat/completions", json=body, headers=sent),
        httpx.options(guarded.url + "/v1/chat/completions", headers=preflight),
    ]
    statuses = [r.status_code for r in answers]
    assert statuses == [200, 200, 400, 200, 404, 401, 200]
    assert [r.headers.get_list("x-request-id") for r in answers] == [["bench-0-17"]] * len(answers)
    # a page on another origin may read it (the openai JS client does, for its errors)
    cors = httpx.post(guarded.url + "/v1/chat/completions", json=body, headers={"Origin": "http://a.example"})
    assert "x-request-id" in cors.headers["access-control-expose-headers"].lower().split(", ")


@pytest.mark.parametrize(
    "hostile",
    [b"a" * 513, b"a\tb", b"caf\xc3\xa9", b"\xff\xfe", b"a" * 100_000],
    ids=["513 chars", "tab", "utf-8", "bytes", "100kB"],
)
def test_a_hostile_client_id_is_replaced_not_repeated(server, hostile):
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": "tiny", "prompt": "hi", "max_tokens": 1},
        headers={"X-Request-Id": hostile},
    )
    assert r.status_code == 200 and OURS.fullmatch(r.headers["x-request-id"])


def test_control_characters_never_come_back():
    """Those h11 lets through (a tab, bytes past ASCII) are above; the ones it refuses before the app
    sees them (a NUL, a newline, DEL) are refused here too, as a proxy in front of another HTTP parser
    might pass them on."""
    assert chosen_request_id("a" * 512) == "a" * 512 and chosen_request_id("x y!~") == "x y!~"
    for value in ("a\x00b", "a\nb", "a\rb", "a\x7fb", "a\x1bb", "", " a", "a ", "a" * 513, None):
        assert OURS.fullmatch(chosen_request_id(value)), repr(value)


def test_the_log_lines_of_a_failed_request_name_its_id(make_server, monkeypatch, caplog):
    """An unhandled error (a bug) is a 500 whose header and log line carry the same id; the 500 is
    answered outside the middleware, so the handler puts the header on itself."""
    live = make_server(response_cache_entries=0)

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(routes, "chat_prompt", broken)
    caplog.set_level(logging.ERROR, logger="qwenkit.server.errors")
    for sent in ({}, {"X-Request-Id": "mine-1"}):
        caplog.clear()
        r = httpx.post(live.url + "/tokenize", json={"messages": HELLO}, headers=sent)
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: KeyError"
        rid = r.headers["x-request-id"]
        assert rid == "mine-1" if sent else OURS.fullmatch(rid)
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "qwenkit.server.errors"]
        assert lines == [f"{rid}: unhandled error in /tokenize"]


def test_a_stream_that_fails_after_its_200_logs_its_id(make_server, monkeypatch, caplog):
    """A bug inside a stream (after the 200 and its header went out) is an error event to the client and,
    as a whole answer's 500, a log line with the request's id and the traceback: it logged nothing, so
    the id the client saw found no line about it."""
    live = make_server(response_cache_entries=0)
    real_sse = routes.sse

    def broken_sse(payload):  # the first chunk of a choice
        if isinstance(payload, dict) and payload.get("choices"):
            raise KeyError("a bug")
        return real_sse(payload)

    def broken_feed(self, *args):
        raise KeyError("a bug")

    monkeypatch.setattr(routes, "sse", broken_sse)
    monkeypatch.setattr(responses_route.ItemWriter, "feed", broken_feed)
    caplog.set_level(logging.ERROR, logger="qwenkit.server.errors")
    asked = [
        ("/v1/chat/completions", {"messages": HELLO}),
        ("/v1/completions", {"prompt": "hello"}),
        ("/v1/responses", {"input": "hello"}),
    ]
    for n, (path, body) in enumerate(asked):
        caplog.clear()
        sent = {"X-Request-Id": f"mine-{n}"}
        stream = {**body, "model": "tiny", "stream": True}
        r = httpx.post(live.url + path, json=stream, headers=sent, timeout=60)
        assert (r.status_code, r.headers["x-request-id"]) == (200, f"mine-{n}")
        assert "internal error: KeyError" in r.text, r.text
        records = [rec for rec in caplog.records if rec.name == "qwenkit.server.errors"]
        assert [rec.getMessage() for rec in records] == [f"mine-{n}: unhandled error in {path}"]
        assert records[0].exc_info[0] is KeyError  # the traceback, as a whole answer's bug logs it
