"""How long an answer may run when the request names no length: a chat request (and /v1/responses) to the
end of the context window, as vLLM and OpenAI's chat API, unless the model's generation_config.json names
``max_new_tokens`` (vLLM caps there too); legacy /v1/completions OpenAI's and vLLM's 16. qwenkit's own
512 of ``generate`` cut a thinking model's answer off inside its thinking."""

from __future__ import annotations

import httpx
import pytest
from live import LiveServer

from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app

WINDOW = 600  # past the 512 a request used to get


@pytest.fixture(scope="module")
def unnamed(tmp_path_factory):
    """A model whose generation_config.json names no max_new_tokens (Qwen2.5's and Qwen3's name none)."""
    from factories import write_tiny_chat_model

    path = write_tiny_chat_model(
        tmp_path_factory.mktemp("length") / "tiny",
        generation_config={"eos_token_id": [151645, 151643], "do_sample": False},
    )
    llm = LLM.load(path, dtype="float32", max_batch_size=2, max_seq_len=WINDOW, progress=False)
    with LiveServer(create_app(llm, ServerConfig(served_model_name="tiny"))) as live:
        yield live, llm


def chat(url: str, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "ignore_eos": True, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_chat_request_without_a_length_runs_to_the_end_of_the_window(unnamed):
    live, llm = unnamed
    assert llm.named_max_tokens is None
    answer = chat(live.url)
    usage = answer["usage"]
    assert usage["completion_tokens"] == WINDOW - usage["prompt_tokens"] > 512
    assert answer["choices"][0]["finish_reason"] == "length"
    assert chat(live.url, max_tokens=3)["usage"]["completion_tokens"] == 3


def test_the_responses_route_runs_to_the_end_of_the_window_too(unnamed):
    live, _ = unnamed
    r = httpx.post(
        live.url + "/v1/responses", json={"input": "Tell me a story.", "ignore_eos": True}, timeout=120
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["output_tokens"] == WINDOW - usage["input_tokens"] > 512


def test_the_legacy_completions_route_keeps_16(unnamed):
    live, _ = unnamed
    body = {"prompt": "Once upon a time", "ignore_eos": True}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16


def test_a_length_the_generation_config_names_caps_it(server, chat_llm):
    """The tiny chat model's generation_config.json names max_new_tokens 64."""
    assert chat_llm.named_max_tokens == 64
    assert chat(server.url)["usage"]["completion_tokens"] == 64
