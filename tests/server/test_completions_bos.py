"""On a model whose tokenizer adds a BOS (Llama), a text prompt to /v1/completions is read with it, as vLLM
reads it; token-id prompts are used as given; a chat request has the template's one BOS."""

from __future__ import annotations

import json

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


def echo_of(url: str, prompt: str | list[int], stream: bool) -> tuple[str, dict]:
    """The echoed text and its logprobs (streamed chunks joined) of a greedy two-token completion."""
    body = {
        "prompt": prompt,
        "max_tokens": 2,
        "temperature": 0,
        "logprobs": 1,
        "echo": True,
        "stream": stream,
    }
    if not stream:
        choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        return choice["text"], choice["logprobs"]
    text, arrays = "", {"tokens": [], "token_logprobs": [], "text_offset": []}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                for key in arrays:
                    arrays[key] += (choice["logprobs"] or {}).get(key, [])
    return text, arrays


@pytest.mark.parametrize("stream", [False, True])
def test_echo_gives_the_text_prompt_back_as_written(url, llama, stream):
    """vLLM echoes a text prompt as sent: the BOS it was read with is in the logprobs, at no width in the
    text, so every token's text_offset points at its own text (the old echo began "<s>Hello")."""
    text, lps = echo_of(url, TEXT, stream)
    assert text.startswith(TEXT) and not text.startswith("<s>")
    ids = llama.tokenizer.encode(TEXT)
    assert lps["tokens"][0] == "<s>" and len(lps["tokens"]) == len(ids) + 3
    offsets = lps["text_offset"]
    assert offsets[0] == offsets[1] == 0 and offsets[len(ids) + 1] == len(TEXT)
    pieces = [text[a:b] for a, b in zip(offsets[1:], [*offsets[2:], len(text)], strict=True)]
    assert "".join(pieces) == text and pieces[: len(ids)] == [
        llama.tokenizer.decode(ids[: i + 1])[len(llama.tokenizer.decode(ids[:i])) :] for i in range(len(ids))
    ]
    assert lps["token_logprobs"][0] is None and all(v is not None for v in lps["token_logprobs"][1:])
    # token ids are echoed decoded, their BOS included, as before, and offsets count the BOS's text
    ids_text, ids_lps = echo_of(url, [BOS, *ids], stream)
    assert ids_text.startswith("<s> " + TEXT) and ids_lps["text_offset"][:2] == [0, 3]
    assert ids_lps["text_offset"][len(ids) + 1] == len("<s> " + TEXT)
