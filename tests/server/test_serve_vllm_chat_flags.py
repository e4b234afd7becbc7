"""vLLM's chat flags on `qwenkit serve`, as deployment commands copied from vLLM give them:
``--default-chat-template-kwargs`` (the template's kwargs on every chat request, a request's own winning key
by key) and ``--reasoning-parser qwen3|deepseek_r1`` (qwenkit's own <think> split, accepted by name)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from live import free_port

from qwenkit.tokenizer import load_tokenizer

USER = [{"role": "user", "content": "Capital of France?"}]
OPEN = "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
NOT_THINKING = OPEN + "<think>\n\n</think>\n\n"  # Qwen3's template with enable_thinking false


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    """`qwenkit serve` of a tiny Qwen3 with thinking off by default, the parser named by the environment."""
    port = free_port()
    args = [
        "--port",
        str(port),
        "--max-batch",
        "2",
        "--default-chat-template-kwargs",
        '{"enable_thinking": false}',
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwenkit.cli", "serve", str(tiny_chat_model), *args],
        env={**os.environ, "QWENKIT_REASONING_PARSER": "deepseek_r1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "qwenkit serve did not become healthy"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_the_default_kwargs_render_every_chat_request_and_a_request_overrides_them(served, tiny_chat_model):
    tokenizer = load_tokenizer(tiny_chat_model)
    off = tokenizer.encode(NOT_THINKING, allow_special=True)
    on = tokenizer.encode(OPEN, allow_special=True)  # the template's own default: thinking on
    assert len(off) == len(on) + 4  # <think>, \n\n, </think>, \n\n

    def tokenize(**extra) -> list[int]:
        r = httpx.post(served + "/tokenize", json={"messages": USER, **extra}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    assert tokenize() == off
    assert tokenize(chat_template_kwargs={"enable_thinking": True}) == on

    client = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)

    def prompt_tokens(**extra) -> int:
        reply = client.chat.completions.create(model="tiny-qwen3", messages=USER, max_tokens=1, **extra)
        return reply.usage.prompt_tokens

    assert prompt_tokens() == len(off)
    assert prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": True}}) == len(on)
    assert prompt_tokens(extra_body={"enable_thinking": True}) == len(on)  # the top-level spelling too
    # another key of the request's leaves the default's enable_thinking in place (merged key by key)
    assert prompt_tokens(extra_body={"chat_template_kwargs": {"unused_by_qwen3": 1}}) == len(off)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--default-chat-template-kwargs", "{enable_thinking: false}"],
            {},
            "--default-chat-template-kwargs: '{enable_thinking: false}' is not JSON",
        ),
        (
            [],
            {"QWENKIT_DEFAULT_CHAT_TEMPLATE_KWARGS": '["enable_thinking"]'},
            "--default-chat-template-kwargs must be a JSON object, got '[\"enable_thinking\"]'",
        ),
        (
            ["--reasoning-parser", "mistral"],
            {},
            "unknown --reasoning-parser 'mistral'; qwenkit takes qwen3 or deepseek_r1",
        ),
        (
            [],
            {"QWENKIT_REASONING_PARSER": "granite"},
            "unknown --reasoning-parser 'granite'; qwenkit takes qwen3 or deepseek_r1",
        ),
    ],
    ids=["not-json", "not-an-object", "other-parser", "other-parser-env"],
)
def test_a_bad_value_is_refused_at_start_up_in_one_line(args, env, message):
    r = subprocess.run(
        [sys.executable, "-m", "qwenkit.cli", "serve", "--port", "1", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,  # refused before the model loads, or this would serve on port 1
    )
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
