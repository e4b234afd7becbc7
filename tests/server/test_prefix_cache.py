"""Prefix caching through the server: a shared long prefix is reported as cached, is faster to the
first token, and changes no token."""

from __future__ import annotations

import time

import httpx
import pytest
from live import LiveServer

from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app

SYSTEM = "You are a careful assistant. " + " ".join(f"Rule {i}: answer plainly." for i in range(600))


def ask(url: str, question: str) -> tuple[dict, float]:
    """Stream a request; return the final body's usage and text, and the time to the first chunk."""
    payload = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    import json

    start, first, text, usage = time.perf_counter(), None, "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                text += chunk["choices"][0]["delta"]["content"]
            usage = chunk.get("usage") or usage
    return {"text": text, "usage": usage}, first - start


@pytest.fixture(scope="module")
def uncached(tiny_chat_model):
    llm = LLM.load(tiny_chat_model, dtype="float32", prefix_caching=False, progress=False)
    with LiveServer(
        create_app(llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    ) as live:
        yield live


def test_shared_prefix_is_cached_faster_and_identical(server, uncached):
    questions = [f"Question {i}: what is {i} plus {i}?" for i in range(4)]
    first, _ = ask(server.url, "Warm the cache with this one.")
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert prompt_tokens > 4000 and first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached_ttft, plain_ttft = [], []
    for q in questions:
        hit, t_hit = ask(server.url, q)
        miss, t_miss = ask(uncached.url, q)
        assert hit["text"] == miss["text"]
        assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] >= prompt_tokens - 64
        assert miss["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cached_ttft.append(t_hit)
        plain_ttft.append(t_miss)
    # Lower medians of four: the cached prompt computes one block instead of ~300. (The 5x figure is the
    # serving benchmark's to show; a shared 2-core machine makes timing in tests noisy.)
    assert sorted(plain_ttft)[1] > sorted(cached_ttft)[1], (plain_ttft, cached_ttft)


def test_copies_of_a_new_prompt_report_no_cached_tokens(server, chat_llm):
    """n copies of a prompt never seen compute it once (the copies read its blocks from the prefix
    cache), and usage says so: none of its tokens was cached when the request came."""
    prompt = list(range(1000, 1040))  # 2 full blocks of 16 and 8 tokens more, in no earlier prompt
    stats = chat_llm.engine.stats
    hits = stats().prefix_hits
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "n": 3}
    usage = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["usage"]
    assert stats().prefix_hits - hits == 2 * 32  # the two copies' blocks
    assert usage["prompt_tokens"] == 40 and usage["prompt_tokens_details"]["cached_tokens"] == 0
    again = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] == 32


def test_scoring_requests_read_kept_log_probabilities_and_equal_an_uncached_server(server, uncached):
    """lm-eval's loglikelihood requests (echo, logprobs, max_tokens 0): a question's candidates share its
    context, and questions share their few-shot examples. The server computes those once and reads the
    prompt log-probabilities they kept; the answers equal a server without a prefix cache."""
    shots = list(range(2000, 2070))  # 4 full blocks of 16 and 6 tokens more, in no other test's prompt

    def scores(url: str, question: list[int]) -> tuple[list[list[float]], int]:
        body = {"prompt": [[*shots, *question, c] for c in (31, 32, 33, 34)], "max_tokens": 0}
        body |= {"echo": True, "logprobs": 1, "temperature": 0}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        values = [[c["logprobs"]["token_logprobs"], c["logprobs"]["top_logprobs"]] for c in choices]
        return values, reply["usage"]["prompt_tokens_details"]["cached_tokens"]

    for question in ([7, 8, 9, 10, 11], [12, 13]):
        cached, cached_tokens = scores(server.url, question)
        plain, none = scores(uncached.url, question)
        assert none == 0 and cached_tokens >= 3 * 63  # at least three candidates read the shots' blocks
        for (got, got_top), (want, want_top) in zip(cached, plain, strict=True):
            assert got[0] is None and got_top[0] is None
            assert got[1:] == pytest.approx(want[1:], abs=1e-5)
            assert [list(t) for t in got_top[1:]] == [list(t) for t in want_top[1:]]
