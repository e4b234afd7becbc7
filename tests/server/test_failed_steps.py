"""A failed engine step (a bug or a device fault inside ``Engine.step``) as the server shows it: the
engine's log line names the x-request-id of every request it failed, each client gets one clear error
(a 500, or one error event after the chunks it was owed), and nothing hangs."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HELLO = [{"role": "user", "content": "hello"}]
MESSAGE = "internal error: RuntimeError: device fault in the forward"
ERROR = {"message": MESSAGE, "type": "server_error", "param": None, "code": "generation_error"}


@pytest.fixture(scope="module")
def failing(tiny_chat_model):
    """A server of its own (response cache on) whose model's forward raises once ``fail_next()`` is
    called, at the first forward where ``when()`` holds (``delay`` seconds later: the loop has read what
    was ready by then)."""
    from live import LiveServer

    from qwenkit.generate import LLM
    from qwenkit.server import ServerConfig, create_app

    llm = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=4, progress=False)
    model = llm.model
    real = model.forward

    def fail_next(when=lambda: True, delay: float = 0.0) -> None:
        def broken(*args, **kwargs):
            if not when():
                return real(*args, **kwargs)
            time.sleep(delay)
            del model.forward  # once: the step after runs the real model again
            raise RuntimeError("device fault in the forward")

        model.forward = broken

    with LiveServer(create_app(llm, ServerConfig(served_model_name="tiny"))) as live:
        yield live, fail_next, llm
    assert model.forward == real


def events(response: httpx.Response) -> list:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_the_engine_log_line_names_every_failed_request(failing, caplog):
    """Four requests in one failed step (one of n=2, one on the Responses route, two under one client id):
    the engine's line with the traceback named none of them ("engine step failed"); now it names each
    choice by its request's x-request-id, and each client gets a 500 with the step's error."""
    live, fail_next, llm = failing
    caplog.set_level(logging.ERROR)
    sampled = {"temperature": 1.0}
    chat = {"messages": HELLO, "max_tokens": 64, "ignore_eos": True, **sampled}
    asked = [
        ("one-a", CHAT, chat),
        ("two-b", CHAT, {**chat, "n": 2}),
        ("same", "/v1/responses", {"input": "hello", "max_output_tokens": 64, **sampled}),
        ("same", CHAT, chat),
    ]
    answers: list[httpx.Response | None] = [None] * len(asked)
    ready = threading.Barrier(len(asked) + 1)

    def send(k: int) -> None:
        rid, path, body = asked[k]
        ready.wait()
        answers[k] = httpx.post(live.url + path, json=body, headers={"X-Request-Id": rid}, timeout=60)

    fail_next(when=lambda: len(llm.engine.requests) == 5)  # the step all five choices are in
    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(asked))]
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join(60)
    assert [(r.status_code, r.json()["error"]) for r in answers] == [(500, ERROR)] * len(asked)
    assert [r.headers["x-request-id"] for r in answers] == [rid for rid, _, _ in asked]
    engine = [r for r in caplog.records if r.name == "qwenkit.engine.driver"]
    assert len(engine) == 1 and engine[0].exc_info[0] is RuntimeError
    head, names = engine[0].getMessage().split(", failing requests ")
    assert head == "engine step failed"
    assert sorted(names.split(", ")) == ["one-a", "same", "same#2", "two-b/0", "two-b/1"]
    served = [r.getMessage() for r in caplog.records if r.name == "qwenkit.server.errors"]
    assert sorted(served) == sorted(f"{rid}: {MESSAGE}" for rid, _, _ in asked)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_failed_choice_after_held_chunks_sends_them_then_one_error(failing, path, caplog):
    """Choice 1 is answered whole from the response cache and held until choice 0 sends its first chunk;
    choice 0's first step fails: the client gets choice 1's chunks, then one error event, then [DONE]
    (it got the error first, then the held chunks after it, where the SDK, which raises at the error,
    never reads them; and an error event of each choice)."""
    live, fail_next, _ = failing
    seeded = {"max_tokens": 4, "seed": 7, "temperature": 1.0}
    asked = {"messages": HELLO} if path == CHAT else {"prompt": "hello"}
    warm = httpx.post(live.url + path, json={**asked, **seeded, "seed": 8}, timeout=60)
    assert warm.status_code == 200
    fail_next(delay=0.5)  # the cached choice is read, and held, before choice 0 fails
    caplog.set_level(logging.ERROR)
    r = httpx.post(live.url + path, json={**asked, **seeded, "n": 2, "stream": True}, timeout=60)
    got = events(r)
    assert r.status_code == 200 and got[-1] == "[DONE]"
    errors = [e for e in got[:-1] if "error" in e]
    assert errors == [{"error": ERROR}] and got[-2] == {"error": ERROR}
    chunks = [e for e in got[:-1] if "choices" in e]
    assert {c["index"] for e in chunks for c in e["choices"]} == {1}
    assert chunks[-1]["choices"][0]["finish_reason"] == warm.json()["choices"][0]["finish_reason"]
    parts = [c["choices"][0] for c in chunks]
    text = "".join(p["text"] if path == COMPLETIONS else p["delta"].get("content") or "" for p in parts)
    whole = warm.json()["choices"][0]
    assert text == (whole["text"] if path == COMPLETIONS else whole["message"]["content"])
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "qwenkit.server.errors"]
    assert lines == [f"{r.headers['x-request-id']}: {MESSAGE}"]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_step_that_fails_every_choice_sends_one_error(failing, path, caplog):
    """n=3 choices in one failed step: one error event and one log line for the request (it sent one
    of each per choice: the SDK raised at the first, and the log said the same thing three times)."""
    live, fail_next, llm = failing
    asked = {"messages": HELLO} if path == CHAT else {"prompt": "hello"}
    fail_next(when=lambda: len(llm.engine.requests) == 3)
    caplog.set_level(logging.ERROR)
    body = {**asked, "n": 3, "max_tokens": 8, "temperature": 1.0, "stream": True}
    r = httpx.post(live.url + path, json=body, headers={"X-Request-Id": "three"}, timeout=60)
    assert r.status_code == 200 and events(r)[-2:] == [{"error": ERROR}, "[DONE]"]
    assert sum("error" in e for e in events(r)[:-1]) == 1
    lines = [rec.getMessage() for rec in caplog.records if rec.name.startswith("qwenkit.")]
    assert lines == ["engine step failed, failing requests three/0, three/1, three/2", f"three: {MESSAGE}"]
