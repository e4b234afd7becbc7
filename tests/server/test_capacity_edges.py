"""The server at its capacity boundaries, as users reach them: a 64-token context window and a KV pool of
exactly one such sequence (4 blocks of 16), 4 batch rows. Prompts one below, at and above the window;
prompt + max_tokens one over it; a generation that runs into the window mid-stream; more concurrent
requests, copies (n > 1) and shared prefixes than the pool holds, which wait or are preempted and
recomputed, and still equal their lone runs."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live import LiveServer

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app

WINDOW = 64
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def tight(chat_llm):
    """The tiny chat model behind a 64-token window and a pool of one sequence, with its LLM."""
    llm = LLM(
        chat_llm.model,
        chat_llm.tokenizer,
        max_batch_size=4,
        max_seq_len=WINDOW,
        kv_cache_tokens=WINDOW,
        prefill_chunk=32,
    )
    assert llm.engine.blocks.num_blocks == 4
    app = create_app(llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    with LiveServer(app) as live:
        yield live, llm
    llm.close()


def ids(n: int, start: int = 300) -> list[int]:
    return list(range(start, start + n))


def error_of(response: httpx.Response) -> dict:
    assert set(response.json()) == {"error"}
    return response.json()["error"]


def post(live: LiveServer, body: dict, path: str = COMPLETIONS) -> httpx.Response:
    return httpx.post(live.url + path, json=body, timeout=60)


def lone_texts(chat_llm, prompts: list[list[int]], max_tokens: list[int]) -> list[tuple[str, int]]:
    """Each prompt's greedy text and token count, run alone: one row, no prefix cache, a full pool."""
    with LLM(
        chat_llm.model, chat_llm.tokenizer, max_batch_size=1, max_seq_len=WINDOW, prefix_caching=False
    ) as one:
        out = []
        for prompt, n in zip(prompts, max_tokens, strict=True):
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            c = one.generate([prompt], params)[0]
            out.append((c.text, len(c.token_ids)))
        return out


def streamed(live: LiveServer, body: dict) -> tuple[dict[int, str], dict[int, str], dict | None, str]:
    """Text and finish reason per choice index, the usage chunk, and the last line of an SSE stream."""
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage, last = None, ""
    with httpx.stream("POST", live.url + COMPLETIONS, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            last = line
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: ") :])
                usage = chunk.get("usage") or usage
                for c in chunk["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                    if c["finish_reason"] is not None:
                        finish[c["index"]] = c["finish_reason"]
    return texts, finish, usage, last


@pytest.mark.parametrize("length", [WINDOW - 2, WINDOW - 1])
def test_a_prompt_just_under_the_window_gets_what_room_is_left(tight, length):
    live, _ = tight
    r = post(live, {"prompt": ids(length), "max_tokens": WINDOW - length, "ignore_eos": True})
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == length
    assert body["usage"]["completion_tokens"] == WINDOW - length
    assert body["usage"]["total_tokens"] == WINDOW


def test_max_tokens_left_out_is_capped_to_the_room_left(tight):
    """/v1/completions' default of 16 becomes the 3 tokens that fit, never a 400."""
    live, _ = tight
    r = post(live, {"prompt": ids(WINDOW - 3), "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("length", [WINDOW, WINDOW + 1])
def test_a_prompt_at_or_past_the_window_is_400_naming_both_lengths(tight, length):
    live, _ = tight
    r = post(live, {"prompt": ids(length), "max_tokens": 1})
    assert r.status_code == 400
    assert error_of(r) == {
        "message": f"This model's maximum context length is {WINDOW} tokens. However, your prompt has "
        f"{length} tokens. Please reduce the length of the prompt.",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "context_length_exceeded",
    }


@pytest.mark.parametrize(
    ("path", "field"), [(COMPLETIONS, "max_tokens"), ("/v1/chat/completions", "max_completion_tokens")]
)
def test_prompt_plus_max_tokens_one_past_the_window_is_400_naming_both(tight, path, field):
    live, _ = tight
    body = {"prompt": ids(60)} if path == COMPLETIONS else {"messages": [{"role": "user", "content": "Hi"}]}
    length = post(live, {**body, field: 1}, path).json()["usage"]["prompt_tokens"]
    fits = post(live, {**body, field: WINDOW - length, "ignore_eos": True}, path)
    assert fits.status_code == 200 and fits.json()["usage"]["total_tokens"] == WINDOW
    over = post(live, {**body, field: WINDOW - length + 1}, path)
    assert over.status_code == 400
    assert error_of(over) == {
        "message": f"This model's maximum context length is {WINDOW} tokens. However, you requested "
        f"{WINDOW + 1} tokens ({length} in the prompt, {WINDOW - length + 1} for the completion). "
        "Please reduce the length of the prompt or completion.",
        "type": "invalid_request_error",
        "param": field,
        "code": "context_length_exceeded",
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ids(10), "max_tokens": 0}, "max_tokens"),
        ({"prompt": ids(10), "max_tokens": -1}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [ids(3), []]}, "prompt.1"),
    ],
)
def test_no_tokens_to_generate_or_none_to_read_is_400(tight, body, param):
    live, _ = tight
    r = post(live, body)
    assert r.status_code == 400 and error_of(r)["param"] == param


def test_scoring_may_fill_the_whole_window(tight):
    """max_tokens 0 with echo and logprobs generates nothing, so a prompt of exactly the window fits."""
    live, _ = tight
    r = post(live, {"prompt": ids(WINDOW), "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert len(choice["logprobs"]["token_logprobs"]) == WINDOW
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert r.json()["usage"]["completion_tokens"] == 0


def test_a_stream_that_runs_into_the_window_ends_with_length_and_exact_usage(tight, chat_llm):
    live, _ = tight
    prompt = ids(52, 700)
    body = {"prompt": prompt, "max_tokens": WINDOW - 52, "temperature": 0, "ignore_eos": True}
    texts, finish, usage, last = streamed(live, {**body, "stream_options": {"include_usage": True}})
    [(text, count)] = lone_texts(chat_llm, [prompt], [WINDOW - 52])
    assert (texts, finish, last) == ({0: text}, {0: "length"}, "data: [DONE]")
    assert count == WINDOW - 52
    assert usage == {
        "prompt_tokens": 52,
        "completion_tokens": WINDOW - 52,
        "total_tokens": WINDOW,
        "prompt_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
    }


def test_more_requests_than_the_pool_holds_are_preempted_and_equal_their_lone_runs(tight, chat_llm):
    """Six requests of 12 to 64 tokens, three of them sharing a 40-token prefix, against a pool of one
    64-token sequence: each still gets its lone run's text, and afterwards every block is free."""
    live, llm = tight
    shared = ids(40, 900)
    prompts = [
        ids(10, 1000),
        ids(30, 2000),
        ids(45, 3000),
        [*shared, 5],
        [*shared, 6, 7],
        [*shared, *ids(9, 4000)],
    ]
    max_tokens = [WINDOW - len(p) for p in prompts]
    expected = lone_texts(chat_llm, prompts, max_tokens)
    before = llm.engine.preemptions

    def run(i: int) -> tuple[str, int]:
        body = {"prompt": prompts[i], "max_tokens": max_tokens[i], "temperature": 0, "ignore_eos": True}
        if i % 2:
            texts, finish, usage, _ = streamed(live, {**body, "stream_options": {"include_usage": True}})
            assert finish == {0: "length"}
            return texts[0], usage["completion_tokens"]
        r = post(live, body)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        return r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(run, range(len(prompts))))
    assert got == expected
    assert llm.engine.preemptions > before  # the pool ran dry mid-generation
    stats = llm.engine.stats()
    assert (stats.running, stats.waiting, llm.engine.blocks.num_free) == (0, 0, 4)


def test_n_copies_that_together_outgrow_the_pool_each_equal_the_lone_run(tight, chat_llm):
    live, _ = tight
    prompt = ids(40, 5000)
    [(text, _)] = lone_texts(chat_llm, [prompt], [24])
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "n": 3}
    r = post(live, body)
    assert r.status_code == 200
    assert [c["text"] for c in r.json()["choices"]] == [text] * 3
    assert r.json()["usage"]["completion_tokens"] == 72
    texts, finish, _, _ = streamed(live, body)
    assert texts == {0: text, 1: text, 2: text} and finish == {0: "length", 1: "length", 2: "length"}


def test_a_pool_smaller_than_one_window_is_refused_at_load_and_one_exactly_that_size_serves(tiny_chat_model):
    """A request needing more KV blocks than the whole pool would wait for ever, so no such pool is
    built: `qwenkit serve` exits with this one line instead of accepting requests it cannot finish."""
    from qwenkit.config import ModelConfig
    from qwenkit.engine import SamplingParamsError

    config = ModelConfig.from_hf(json.loads((tiny_chat_model / "config.json").read_text()))
    per_token = config.kv_cache_bytes_per_token(4)  # float32
    with pytest.raises(SamplingParamsError) as refused:
        LLM.load(
            tiny_chat_model,
            dtype="float32",
            max_seq_len=WINDOW,
            kv_cache_memory=per_token * (WINDOW - 1),
            progress=False,
        )
    assert str(refused.value) == (
        f"the KV cache holds {WINDOW - 1} tokens, less than one sequence of the {WINDOW}-token context: "
        "give it more memory or lower the maximum model length"
    )
    with LLM.load(
        tiny_chat_model,
        dtype="float32",
        max_seq_len=WINDOW,
        kv_cache_memory=per_token * WINDOW,
        progress=False,
    ) as one:
        assert one.engine.blocks.num_blocks == WINDOW // 16
        params = SamplingParams(temperature=0, max_tokens=WINDOW - 40, ignore_eos=True)
        [a, b] = one.generate([ids(40), ids(40, 600)], params)  # two windows in turn through one's pool
        assert (len(a.token_ids), len(b.token_ids)) == (WINDOW - 40, WINDOW - 40)
        assert (a.finish_reason, b.finish_reason) == ("length", "length")
