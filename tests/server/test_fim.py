"""Fill-in-the-middle on /v1/completions (``prompt`` + ``suffix``), as code-completion clients send it: the
prompt is Qwen2.5-Coder's <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|> with the control tokens
as their ids and the code as plain text, and the reply is the middle. A steered tiny model with the real
Qwen3 tokenizer (which has the FIM tokens) writes a scripted middle, and every prompt the engine receives is
recorded."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import openai
import pytest
from live import LiveServer

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from factories import qwen3_tokenizer_dir
from scripted import ScriptedModel, steer_next_request

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app
from qwenkit.tokenizer import TokenizerError

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, FILE_SEP = 151659, 151660, 151661, 151662, 151664
PREFIX = "def add(a, b):\n"
SUFFIX = "\n\nprint(add(1, 2))\n"
MIDDLE = "    return a + b"


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    """The tiny chat model steered to write queued middles, each ended by <|fim_pad|> (a FIM stop token,
    not an eos), with the prompts its engine received."""
    loaded = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=4, progress=False)
    model = ScriptedModel(loaded.model, FIM_PAD)
    llm = LLM(model, loaded.tokenizer, max_batch_size=4, max_seq_len=512)
    pending = steer_next_request(llm, model)
    received: list[list[int]] = []
    steered_submit = llm.submit

    def recording_submit(prompt, params=None, request_id=None, loop=None, name=None):
        received.append(list(prompt))
        return steered_submit(prompt, params, request_id, loop, name)

    llm.submit = recording_submit
    app = create_app(llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    with LiveServer(app) as live:
        yield live, llm, pending, received
    llm.close()


@pytest.fixture
def client(steered):
    return openai.OpenAI(base_url=f"{steered[0].url}/v1", api_key="unused", max_retries=0)


def fim_ids(llm, prefix: str, suffix: str) -> list[int]:
    text = llm.tokenizer.encode
    return [FIM_PREFIX, *text(prefix), FIM_SUFFIX, *text(suffix), FIM_MIDDLE]


def queue_middle(steered, middle: str) -> list[int]:
    _live, llm, pending, received = steered
    received.clear()
    ids = llm.tokenizer.encode(middle)
    pending.append(ids)
    return ids


def test_the_prompt_is_the_one_transformers_makes_of_qwens_fim_layout():
    import transformers

    from qwenkit.tokenizer import load_tokenizer

    ours = load_tokenizer(qwen3_tokenizer_dir())
    hf = transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    ids = ours.encode_fim(PREFIX, SUFFIX)
    assert ids == hf(f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>")["input_ids"]
    assert ids[0] == FIM_PREFIX and ids[-1] == FIM_MIDDLE and ids.count(FIM_SUFFIX) == 1
    assert ours.has_fim and ours.fim_stop_token_ids == {151643, 151645, *range(151659, 151665)}


def test_the_openai_client_gets_the_middle(steered, client):
    _live, llm, _pending, received = steered
    middle = queue_middle(steered, MIDDLE)
    r = client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=20, temperature=0)
    prompt = fim_ids(llm, PREFIX, SUFFIX)
    assert received == [prompt]
    (choice,) = r.choices
    assert choice.text == MIDDLE and choice.finish_reason == "stop"  # <|fim_pad|> ended it, unseen
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(middle) + 1


def test_the_middle_streams(steered, client):
    _live, llm, _pending, received = steered
    queue_middle(steered, MIDDLE)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PREFIX,
            suffix=SUFFIX,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert received == [fim_ids(llm, PREFIX, SUFFIX)]
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == MIDDLE
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens == len(received[0])


def test_control_token_text_in_the_code_is_plain_text(steered, client):
    _live, llm, _pending, received = steered
    prefix = 's = "<|fim_suffix|>"\n# <|fim_middle|><|endoftext|>\n'
    suffix = 'x = "<|fim_prefix|><|file_sep|>"\n'
    queue_middle(steered, "t = 1")
    r = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=8, temperature=0)
    (prompt,) = received
    assert prompt == fim_ids(llm, prefix, suffix)
    # each control token once, where the layout puts it; the code's copies are ordinary text
    assert [t for t in prompt if t >= 151643] == [FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]
    cut = prompt.index(FIM_SUFFIX)
    assert llm.tokenizer.decode(prompt[1:cut]) == prefix
    assert llm.tokenizer.decode(prompt[cut + 1 : -1]) == suffix
    assert r.choices[0].text == "t = 1" and r.usage.prompt_tokens == len(prompt)


def test_each_of_several_prompts_is_filled_against_the_suffix(steered):
    live, llm, _pending, received = steered
    received.clear()
    body = {"prompt": ["a = 1\n", "b = 2\n"], "suffix": "c = 3\n", "max_tokens": 2, "temperature": 0}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    assert sorted(received) == sorted(fim_ids(llm, p, "c = 3\n") for p in body["prompt"])
    assert r.json()["usage"]["prompt_tokens"] == sum(map(len, received))


def test_the_fim_stop_tokens_end_the_middle_besides_the_requests_own(steered):
    live, _llm, _pending, _received = steered
    queue_middle(steered, MIDDLE)
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 20, "temperature": 0, "stop_token_ids": [7]}
    choice = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["text"] == MIDDLE and choice["finish_reason"] == "stop"


def test_the_python_api_fills_the_middle(steered):
    _live, llm, _pending, received = steered
    middle = queue_middle(steered, MIDDLE)
    out = llm.infill(PREFIX, SUFFIX, SamplingParams(temperature=0, max_tokens=20))
    assert received == [fim_ids(llm, PREFIX, SUFFIX)] and out.prompt_ids == received[0]
    assert out.text == MIDDLE and out.finish_reason == "stop" and out.token_ids == [*middle, FIM_PAD]
    # the FIM stop tokens the model's eos does not already stop on; none where eos is ignored
    assert llm.fim_params(SamplingParams(stop_token_ids=(5,))).stop_token_ids == (5, *range(151659, 151665))
    assert llm.fim_params(SamplingParams(ignore_eos=True)).stop_token_ids == ()


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"echo": True}, "echo", "echo is not supported with suffix"),
        (
            {"prompt": [1, 2, 3]},
            "suffix",
            "suffix needs a text prompt (the code before the gap), not token ids",
        ),
        ({"prompt": [[1, 2], [3]]}, "suffix", "suffix needs a text prompt"),
    ],
)
def test_what_cannot_fill_the_middle_is_a_400_naming_the_field(steered, fields, param, words):
    live, _llm, _pending, received = steered
    received.clear()
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 2, **fields}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and words in error["message"], error
    assert received == []  # nothing ran


def test_a_chat_request_with_a_suffix_is_refused_not_answered_without_it(steered):
    live, _llm, _pending, received = steered
    received.clear()
    body = {"messages": [{"role": "user", "content": "hi"}], "suffix": SUFFIX, "max_tokens": 2}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "suffix" and received == []
    assert (
        error["message"] == "suffix (fill-in-the-middle) is supported on /v1/completions, with a text prompt"
    )


def test_a_suffix_that_is_not_valid_unicode_is_named(steered):
    live = steered[0]
    raw = '{"prompt": "a", "suffix": "b\\ud800", "max_tokens": 2}'
    r = httpx.post(live.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "suffix"
    assert error["message"].startswith(
        "the suffix is not valid Unicode: a lone surrogate '\\ud800' at position 1"
    )


def test_a_model_without_fim_tokens_refuses_a_suffix(tmp_path):
    from llama_tokenizers import write_tiny_llama

    llm = LLM.load(write_tiny_llama(tmp_path / "llama"), dtype="float32", progress=False)
    try:
        assert not llm.tokenizer.has_fim
        app = create_app(llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
        with LiveServer(app) as live:
            url = live.url + "/v1/completions"
            body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
            r = httpx.post(url, json={**body, "suffix": " world"}, timeout=60)
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == "suffix"
            assert error["message"] == (
                "suffix (fill-in-the-middle) needs a model whose tokenizer has the tokens <|fim_prefix|>, "
                "<|fim_suffix|> and <|fim_middle|> (Qwen2.5-Coder, Qwen3-Coder); this model's has not"
            )
            # an empty suffix leaves nothing after the gap: a plain completion, as before
            empty = httpx.post(url, json={**body, "suffix": ""}, timeout=60).json()
            plain = httpx.post(url, json=body, timeout=60).json()
            assert empty["choices"][0]["text"] == plain["choices"][0]["text"]
            assert empty["usage"] == plain["usage"]
        with pytest.raises(TokenizerError, match="this model's tokenizer does not have them"):
            llm.infill("a", "b")
    finally:
        llm.close()
