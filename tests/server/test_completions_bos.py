"""On a model whose tokenizer adds a BOS (Llama), a text prompt to /v1/completions is read with it, as vLLM
reads it; token-id prompts are used as given; a chat request has the template's one BOS."""

from __future__ import annotations

import httpx
import pytest
from live import LiveServer
from llama_tokenizers import write_tiny_llama

from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app

BOS = 1
TEXT = "Hello world"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    llm = LLM.load(write_tiny_llama(tmp_path_factory.mktemp("llama")), dtype="float32", progress=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def url(llama):
    with LiveServer(
        create_app(llama, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    ) as live:
        yield live.url


def first_token(url: str, prompt: str | list[int]) -> tuple[int, dict[str, float]]:
    """prompt_tokens and the first token's top log-probabilities of a greedy one-token completion."""
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 5}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    return reply["usage"]["prompt_tokens"], reply["choices"][0]["logprobs"]["top_logprobs"][0]


def test_a_text_prompt_is_read_with_the_bos(url, llama):
    ids = llama.tokenizer.encode(TEXT)
    assert BOS not in ids
    count, top = first_token(url, TEXT)
    assert count == len(ids) + 1
    assert (count, top) == first_token(url, [BOS, *ids])
    without = first_token(url, ids)  # ids are used as given: no BOS is added to them
    assert without[0] == len(ids) and without[1] != top


def test_tokenize_gives_what_completions_reads(url, llama):
    ids = llama.tokenizer.encode(TEXT)
    tokens = httpx.post(url + "/tokenize", json={"prompt": TEXT}).json()["tokens"]
    assert tokens == [BOS, *ids]
    bare = httpx.post(url + "/tokenize", json={"prompt": TEXT, "add_special_tokens": False}).json()
    assert bare["tokens"] == ids


def test_a_chat_prompt_has_one_bos(url, llama):
    messages = [{"role": "user", "content": TEXT}]
    tokens = httpx.post(url + "/tokenize", json={"messages": messages}).json()["tokens"]
    assert tokens == llama.tokenizer.apply_chat_template(messages)
    assert tokens[0] == BOS and tokens.count(BOS) == 1
    body = {"messages": messages, "max_tokens": 1, "temperature": 0}
    usage = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["usage"]
    assert usage["prompt_tokens"] == len(tokens)


def test_tokenizer_info_names_the_bos(url):
    assert httpx.get(url + "/tokenizer_info").json()["bos_token"] == "<s>"
