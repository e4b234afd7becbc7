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
    live, fail_next, llm = failing
    caplog.set_level(logging.ERROR)
    body = {"messages": HELLO, "max_tokens": 64, "ignore_eos": True, "temperature": 1.0}
    answers: dict[str, httpx.Response] = {}
    ready = threading.Barrier(3)

    def send(rid: str, extra: dict) -> None:
        ready.wait()
        answers[rid] = httpx.post(
            live.url + CHAT, json={**body, **extra}, headers={"X-Request-Id": rid}, timeout=60
        )

    fail_next(when=lambda: len(llm.engine.requests) == 3)  # the step all three choices are in
    threads = [threading.Thread(target=send, args=a) for a in (("one-a", {}), ("two-b", {"n": 2}))]
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join(60)
    assert [answers[r].status_code for r in ("one-a", "two-b")] == [500, 500]
    assert [answers[r].json()["error"] for r in ("one-a", "two-b")] == [ERROR, ERROR]
    engine = [r for r in caplog.records if r.name == "qwenkit.engine.driver"]
    assert len(engine) == 1 and engine[0].exc_info[0] is RuntimeError
    line = engine[0].getMessage()
    assert "one-a" in line and "two-b" in line, line
