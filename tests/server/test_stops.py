"""Stop strings and stop tokens on the OpenAI routes: refusals, vLLM's stop_reason, and streams that
concatenate to the whole answer."""

from __future__ import annotations

import json
import random

import httpx
from test_reliability import CHAT, HELLO, error_of


def test_a_stop_string_spanning_a_special_token_and_text_is_a_400_naming_stop(server):
    """Special tokens never show in the text, so the stop string could never be found (vLLM takes it and
    runs on): a 400 in one line, before anything runs, on each route that takes stop strings."""
    for path, extra in (("/v1/completions", {"prompt": "Hi"}), (CHAT, {"messages": HELLO})):
        for stream in (False, True):
            body = {**extra, "max_tokens": 4, "stream": stream, "stop": ["x", "<|im_end|>\n"]}
            r = httpx.post(server.url + path, json=body)
            assert r.status_code == 400, (path, stream)
            error = error_of(r)
            assert (error["param"], error["code"]) == ("stop", "invalid_value")
            assert error["message"].startswith("stop string '<|im_end|>\\n' holds the special token")
    r = httpx.post(
        server.url + "/v1/responses", json={"input": "Hi", "max_output_tokens": 4, "stop": ["<|im_start|>x"]}
    )
    assert r.status_code == 400 and error_of(r)["param"] == "stop"


def test_stop_reason_is_the_stop_string_or_token_id_streamed_or_not(server, chat_llm):
    """vLLM's stop_reason beside finish_reason, on both routes, whole and streamed: the stop string found,
    the stop_token_ids id that ended the choice, null for length."""
    token = chat_llm.tokenizer.encode(" hello")[0]
    sampled = {"max_tokens": 8, "seed": 3, "temperature": 1, "ignore_eos": True}
    for path, extra in (("/v1/completions", {"prompt": "Hi"}), (CHAT, {"messages": HELLO})):
        free = httpx.post(server.url + path, json={**extra, **sampled}).json()["choices"][0]
        text = free.get("text") or free.get("message", {}).get("content")
        assert (free["finish_reason"], free["stop_reason"], len(text) > 6) == ("length", None, True)
        cases = [
            ({"stop": ["\x00never", text[3:6]]}, text[3:6]),
            ({"stop_token_ids": [token], "logit_bias": {str(token): 100}}, token),
        ]
        for fields, reason in cases:
            body = {**extra, **sampled, **fields}
            whole = httpx.post(server.url + path, json=body).json()["choices"][0]
            assert (whole["finish_reason"], whole["stop_reason"]) == ("stop", reason), path
            events = httpx.post(server.url + path, json={**body, "stream": True}).text.split("\n\n")
            chunks = [json.loads(e.removeprefix("data: ")) for e in events if e and "[DONE]" not in e]
            *rest, last = [c["choices"][0] for c in chunks]
            assert (last["finish_reason"], last["stop_reason"]) == ("stop", reason), path
            assert all(c["stop_reason"] is None for c in rest)


def test_random_stop_sets_stream_to_the_whole_text_with_usage_to_match(server):
    """Streamed deltas of /v1/completions concatenate to the whole answer's text for the same seed, over
    random stop sets cut from a seeded answer; usage counts the tokens up to the one that stopped it."""
    rng = random.Random(1)
    sampled = {
        "prompt": "Once upon a time",
        "max_tokens": 24,
        "seed": 9,
        "temperature": 1,
        "ignore_eos": True,
    }
    text = httpx.post(server.url + "/v1/completions", json=sampled).json()["choices"][0]["text"]
    for _ in range(8):
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 5)])
        body = {**sampled, "stop": stops, "include_stop_str_in_output": rng.random() < 0.3, "logprobs": 0}
        whole = httpx.post(server.url + "/v1/completions", json=body).json()
        options = {"stream": True, "stream_options": {"include_usage": True}}
        events = httpx.post(server.url + "/v1/completions", json={**body, **options}).text.split("\n\n")
        chunks = [json.loads(e.removeprefix("data: ")) for e in events if e and "[DONE]" not in e]
        streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert streamed == whole["choices"][0]["text"], stops
        assert chunks[-1]["usage"] == whole["usage"] and whole["choices"][0]["finish_reason"] == "stop"
        tokens = whole["choices"][0]["logprobs"]["tokens"]  # one a token generated, the stopping one last
        assert whole["usage"]["completion_tokens"] == len(tokens) <= 24
