"""Prompts that cannot fit the context are refused from their UTF-8 length, before they are tokenized:
every token of both tokenizer kinds (tokenizer.json and qwen.tiktoken) stands for at most 128 bytes (a
run of spaces), so a text of B bytes is at least ceil(B / 128) tokens. A 20 MB prompt took the old path
seconds of tokenizing (a 48 MB one 52 s) to reach the same 400; a prompt the bound cannot rule out, even one
exactly as long as the bound says, still runs."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
from live import LiveServer

from qwenkit.engine import SamplingParams, SamplingParamsError
from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app
from qwenkit.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizer"))
from tokenizer_data import QWEN_TIKTOKEN

WINDOW = 64
BIG = 20_000_000  # bytes of prompt text
LONGEST = 128  # bytes of the longest token of both vocabularies
TIGHT = " " * (LONGEST * (WINDOW - 1))  # exactly WINDOW - 1 tokens of 128 spaces: the bound is its count


def encode_refused(*args, **kwargs):
    raise AssertionError("a prompt past the window was tokenized")


@pytest.fixture(scope="module", params=["tokenizer.json", "qwen.tiktoken"])
def tight(request, chat_llm, tmp_path_factory):
    """The tiny chat model behind a 64-token window, with each kind of tokenizer, served."""
    tokenizer = chat_llm.tokenizer
    if request.param == "qwen.tiktoken":
        folder = tmp_path_factory.mktemp("v1")
        shutil.copy(QWEN_TIKTOKEN, folder / "qwen.tiktoken")
        tokenizer = load_tokenizer(folder)
    llm = LLM(chat_llm.model, tokenizer, max_batch_size=2, max_seq_len=WINDOW, kv_cache_tokens=4 * WINDOW)
    app = create_app(llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    with LiveServer(app) as live:
        yield live, llm
    llm.close()


def post(live: LiveServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(live.url + path, json=body, timeout=120)


def too_long(bound: int, param: str) -> dict:
    return {
        "error": {
            "message": f"This model's maximum context length is {WINDOW} tokens. However, your prompt has "
            f"at least {bound} tokens. Please reduce the length of the prompt.",
            "type": "invalid_request_error",
            "param": param,
            "code": "context_length_exceeded",
        }
    }


def test_both_tokenizers_bound_a_token_at_128_bytes(tight):
    _, llm = tight
    assert llm.tokenizer.min_tokens("x" * BIG) == BIG // LONGEST
    assert len(llm.tokenizer.encode(TIGHT)) == llm.tokenizer.min_tokens(TIGHT) == WINDOW - 1


def test_a_huge_prompt_is_refused_without_tokenizing_it(tight, monkeypatch):
    live, llm = tight
    monkeypatch.setattr(llm.tokenizer, "encode_with_added", encode_refused)
    monkeypatch.setattr(llm.tokenizer, "encode_plain", encode_refused)
    started = time.perf_counter()
    r = post(live, "/v1/completions", {"prompt": "word " * (BIG // 5), "max_tokens": 1})
    assert r.status_code == 400
    assert r.json() == too_long(BIG // LONGEST, "prompt")
    # the batch's long prompt is named, and the short one before it is not tokenized either
    r = post(live, "/v1/completions", {"prompt": ["Hi", "é" * (BIG // 2)], "max_tokens": 1})
    assert r.json() == too_long(BIG // LONGEST, "prompt.1")
    body = {"messages": [{"role": "user", "content": "word " * (BIG // 5)}], "max_completion_tokens": 1}
    r = post(live, "/v1/chat/completions", body)
    assert r.status_code == 400
    # the rendered prompt's 43 bytes of template text are a token more; v1's ChatML counts the contents
    template = 0 if type(llm.tokenizer).__name__ == "QwenV1Tokenizer" else 1
    assert r.json() == too_long(BIG // LONGEST + template, "messages")
    assert time.perf_counter() - started < 30  # was minutes: every prompt tokenized first


def test_a_prompt_the_bound_leaves_inside_the_window_gets_the_exact_count(tight):
    """A prompt whose bound is inside the window is tokenized (a window's worth of text at most), so its
    refusal for max_tokens names the exact counts, as before."""
    live, _ = tight
    r = post(live, "/v1/completions", {"prompt": TIGHT, "max_tokens": 2})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": f"This model's maximum context length is {WINDOW} tokens. However, you requested "
        f"{WINDOW + 1} tokens ({WINDOW - 1} in the prompt, 2 for the completion). Please reduce the "
        "length of the prompt or completion.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "context_length_exceeded",
    }


def test_a_prompt_as_long_as_its_bound_still_runs_when_it_fits(tight):
    live, llm = tight
    r = post(live, "/v1/completions", {"prompt": TIGHT, "max_tokens": 1, "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        WINDOW - 1,
        1,
        WINDOW,
    )
    ids = llm.tokenizer.encode(TIGHT)
    spaces = [llm.tokenizer.token_bytes(i) for i in ids]
    assert spaces == [b" " * LONGEST] * (WINDOW - 1)
    assert body["choices"][0]["logprobs"]["tokens"][: WINDOW - 1] == [" " * LONGEST] * (WINDOW - 1)


def test_the_python_api_refuses_a_huge_text_before_tokenizing_it(tight, monkeypatch):
    _, llm = tight
    monkeypatch.setattr(llm.tokenizer, "encode_with_added", encode_refused)
    with pytest.raises(SamplingParamsError) as e:
        llm.generate(["Hi", "word " * (BIG // 5)], SamplingParams(max_tokens=1))
    assert str(e.value) == (  # named by its index among the prompts
        f"prompts[1]: the prompt has at least {BIG // LONGEST} tokens; the context window is {WINDOW}, "
        f"and a prompt may take at most {WINDOW - 1} to leave room for a token to be generated"
    )
    with pytest.raises(SamplingParamsError, match=f"^the prompt has at least {BIG // LONGEST} tokens; the"):
        llm.submit("word " * (BIG // 5), SamplingParams(max_tokens=1))
    monkeypatch.undo()
    [done] = llm.generate([TIGHT], SamplingParams(max_tokens=1, temperature=0))
    assert len(done.prompt_ids) == WINDOW - 1 and len(done.token_ids) == 1


@pytest.mark.parametrize("config", [{"response_cache_entries": 0}, {}])
def test_more_prompts_than_the_server_can_ever_take_are_refused_before_reading_them(
    make_server, chat_llm, monkeypatch, config
):
    """100,000 prompts of 8 rows and no queue: the same 400 as once every prompt was tokenized (a million
    took a worker 55 s), now before any is. With the response cache on, only choices it could never answer
    (sampled without a seed) are counted so early."""
    live = make_server(max_queue=0, **config)
    monkeypatch.setattr(chat_llm.tokenizer, "encode_with_added", encode_refused)
    body = {"prompt": ["Hello"] * 100_000, "max_tokens": 1, "temperature": 0.7}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "100000 prompts of n=1 choices each can never be taken by this server: it runs 8 rows and "
        "queues 0 more (--max-batch, --max-queue); ask for at most 8 choices in one request",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "invalid_value",
    }


def test_a_huge_text_to_embed_is_refused_before_any_input_is_tokenized(tight, monkeypatch):
    """/v1/embeddings and `LLM.embed` read their texts as /v1/completions does: one surely past the window
    is refused from its length (it was tokenized first, the short input before it too)."""
    live, llm = tight
    monkeypatch.setattr(llm.tokenizer, "encode_with_added", encode_refused)
    monkeypatch.setattr(llm.tokenizer, "encode_plain", encode_refused)
    huge = "word " * (BIG // 5)
    message = f"the prompt has at least {BIG // LONGEST} tokens; the context window is {WINDOW}"
    r = post(live, "/v1/embeddings", {"input": ["Hi", huge]})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": f"input[1]: {message}",
        "type": "invalid_request_error",
        "param": "input",
        "code": "context_length_exceeded",
    }
    with pytest.raises(SamplingParamsError) as e:
        llm.embed(huge)
    assert str(e.value) == message
    monkeypatch.undo()
    [vector] = llm.embed(TIGHT)  # as long as its bound, inside the window: it runs
    assert len(vector) == llm.config.hidden_size


def test_tokenize_counts_a_chat_past_the_window_as_it_counts_a_prompt(tight):
    """/tokenize reports a prompt's count beside max_model_len and refuses none for its length (vLLM's
    does not either): a chat's messages past the window are counted, as a prompt's text is."""
    live, llm = tight
    text = " " * (LONGEST * 2 * WINDOW)  # 2 windows of 128-space tokens
    r = post(live, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["count"] == 2 * WINDOW
    r = post(live, "/tokenize", {"messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    assert r.json()["count"] == len(ids) > 2 * WINDOW and r.json()["max_model_len"] == WINDOW
    assert ids == llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
