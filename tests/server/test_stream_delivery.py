"""Tokens reach a streaming client as the engine makes them: nothing piles up between the engine's
thread and the event loop, and ``vllm:num_requests_running`` counts the request while its tokens stream.

That gauge is the engine's count, as vLLM's ("Number of requests in model execution batches", the
scheduler's running list): a request whose last token was made but not yet read by a slow client (its
bytes in the socket's buffers) is no longer counted. A reader that keeps up never sees that window.
"""

from __future__ import annotations

import itertools
import json
import re
import time

import httpx

CHAT = "/v1/chat/completions"
LONG = 2000  # tokens asked for; the client stops reading long before
READ = 40  # chunks read before the engine's count is compared


def running(live) -> float:
    metrics = httpx.get(live.url + "/metrics", timeout=10).text
    return float(re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", metrics, re.M).group(1))


def aborts(live) -> float:
    metrics = httpx.get(live.url + "/metrics", timeout=10).text
    found = re.search(
        r'^vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', metrics, re.M
    )
    return float(found.group(1)) if found else 0.0


def test_a_reader_that_keeps_up_sees_tokens_as_the_engine_makes_them(server, chat_llm):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": LONG,
        "ignore_eos": True,
        "seed": 3,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    aborted_before = aborts(server)
    counts, texts = [], []
    with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if not chunk["choices"]:
                continue
            counts.append(chunk["usage"]["completion_tokens"])
            texts.append(chunk["choices"][0]["delta"].get("content", ""))
            if len(counts) == READ:
                # the engine is still making this request's tokens, and is not far ahead of the reader
                made = [len(req.output_ids) for req in list(chat_llm.engine.scheduler.running)]
                assert running(server) == 1
                break
    # the chunks came in order, each with new tokens and the count made so far
    assert all(b > a for a, b in itertools.pairwise(counts)), counts
    assert len(made) == 1 and counts[-1] <= made[0] < LONG // 2, (counts[-1], made)
    assert "".join(texts)  # gibberish, but text
    # the client left: the request was stopped, counted once as an abort, and runs no more
    deadline = time.monotonic() + 10
    while running(server) != 0 or aborts(server) != aborted_before + 1:
        assert time.monotonic() < deadline, (running(server), aborts(server), aborted_before)
        time.sleep(0.05)
