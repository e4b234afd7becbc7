"""The official openai SDK against a live server: what it sends, what it parses, and the values behind."""

from __future__ import annotations

import openai
import pytest
import torch

from qwenkit.engine import SamplingParams

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def direct_chat(llm, messages, **params):
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return llm.generate([ids], SamplingParams(**params))[0]


def test_chat_greedy_equals_the_library(client, chat_llm):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    ref = direct_chat(chat_llm, MESSAGES, temperature=0, max_tokens=12)
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason == "length"
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny"
    assert r.system_fingerprint and r.created > 0
    assert r.usage.prompt_tokens == len(ref.prompt_ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ref.prompt_ids) + 12


def test_streamed_text_equals_non_streamed(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0.8, seed=3)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole
    assert content[0].choices[0].delta.role == "assistant" and content[0].choices[0].delta.content
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert [c.choices[0].finish_reason for c in content].count("length") == 1
    assert content[-1].choices[0].finish_reason == "length" and not content[-1].choices[0].delta.content
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 16 and all(c.usage is None for c in chunks[:-1])


def test_continuous_usage_counts_each_choice_so_far(client):
    """vLLM's continuous_usage_stats: every chunk carries its choice's usage so far; the last chunk the
    totals. Without it (above) every chunk's usage is null."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    kwargs = dict(
        model="tiny", max_tokens=6, temperature=0.9, seed=5, n=2, stream=True, stream_options=options
    )
    for chunks in (
        list(client.chat.completions.create(messages=MESSAGES, **kwargs)),
        list(client.completions.create(prompt="one two three", **kwargs)),
    ):
        seen: dict[int, list[int]] = {0: [], 1: []}
        prompt = {c.usage.prompt_tokens for c in chunks}
        for c in chunks[:-1]:
            (choice,) = c.choices
            seen[choice.index].append(c.usage.completion_tokens)
            assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
        assert len(prompt) == 1  # the same prompt for both choices, and the same in the totals
        for counts in seen.values():  # grows one token a chunk, from 1 to max_tokens, then the finish
            assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == 6
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens == 12
        assert last.usage.prompt_tokens == prompt.pop()


def test_n_choices_with_a_seed(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=11, n=3)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # seed, seed+1, seed+2
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts
    assert a.usage.completion_tokens == 24 and a.usage.prompt_tokens == b.usage.prompt_tokens


def test_stop_strings_cut_text(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=24, temperature=1.0, seed=5)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[6:9]
    cut = client.chat.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kwargs, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == full[: full.index(stop)]


@pytest.mark.parametrize(
    ("stop", "param"), [("", "stop"), (["\n", ""], "stop.1")], ids=["empty", "empty-in-a-list"]
)
def test_an_empty_stop_string_is_a_400_naming_it(client, stop, param):
    """An empty stop string was dropped and the request answered as if it had none; vLLM refuses it."""
    for create, field in (
        (client.chat.completions.create, "messages"),
        (client.completions.create, "prompt"),
    ):
        given = MESSAGES if field == "messages" else "Hello"
        with pytest.raises(openai.BadRequestError) as e:
            create(model="tiny", **{field: given}, max_tokens=4, stop=stop)
        assert e.value.status_code == 400 and e.value.param == param
        assert e.value.body["message"] == f"{param}: a stop sequence cannot be empty"


@pytest.mark.parametrize(
    ("prompt", "param", "words"),
    [
        ([9707, 1.0], "prompt.1", "a token id is an integer >= 0, got 1.0"),  # ran as token 1
        ([True, 9707], "prompt.0", "a token id is an integer >= 0, got true"),  # ran as token 1
        ([9707, -1], "prompt.1", "a token id is an integer >= 0, got -1"),
        ([[9707], [11, 2.0]], "prompt.1.1", "a token id is an integer >= 0, got 2.0"),
        ([[9707], [11, 10**6]], "prompt.1", "prompt token id 1000000 is outside the vocabulary (0..151935)"),
        (["Hello", 9707], "prompt.1", "expected a string, as prompt.0 is, got 9707"),
    ],
)
def test_token_id_prompts_are_strict(client, prompt, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    assert e.value.status_code == 400 and e.value.param == param and words in e.value.body["message"]


def test_chat_logprobs_are_the_models(client, chat_llm):
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    ref = direct_chat(chat_llm, MESSAGES, temperature=0, max_tokens=4, logprobs=3)
    assert [round(e.logprob, 4) for e in content] == [round(lp.logprob, 4) for lp in ref.logprobs]
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
    assert bytes(content[0].bytes).decode("utf-8", "replace") == content[0].token


def test_completions_echo_logprobs_for_token_prompts(client, chat_llm):
    """lm-eval's loglikelihood request: token-id prompts in a batch, echo, logprobs, max_tokens 1."""
    prompts = [[9707, 11, 1879, 0], [785, 6722, 315]]
    r = client.completions.create(
        model="tiny", prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    model = chat_llm.model
    for prompt, choice in zip(prompts, sorted(r.choices, key=lambda c: c.index), strict=True):
        lp = choice.logprobs
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), -1)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.token_logprobs) == len(prompt) + 1
        for i in range(1, len(prompt)):
            assert abs(lp.token_logprobs[i] - ref[i - 1, prompt[i]].item()) < 1e-4
        assert abs(lp.token_logprobs[-1] - ref[-1].max().item()) < 1e-4  # the greedy continuation
        assert max(lp.top_logprobs[-1].values()) == pytest.approx(lp.token_logprobs[-1], abs=1e-6)
        prompt_text = chat_llm.tokenizer.decode(prompt)
        assert choice.text.startswith(prompt_text) and lp.text_offset[0] == 0
        assert lp.text_offset == sorted(lp.text_offset)


def test_completions_max_tokens_zero_scores_the_prompt(client):
    kwargs = dict(model="tiny", prompt="Hello world", max_tokens=0, echo=True, logprobs=0)
    r = client.completions.create(**kwargs)
    lp = r.choices[0].logprobs
    assert r.usage.completion_tokens == 0 and lp.token_logprobs[0] is None
    assert all(v is not None and v < 0 for v in lp.token_logprobs[1:])
    assert r.choices[0].text == "Hello world"
    (streamed,) = [
        c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices[0].text
    ]
    assert streamed.text == "Hello world" and streamed.logprobs.model_dump() == lp.model_dump()


def test_text_completion_streams(client):
    kwargs = dict(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0.7, seed=2)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_models_and_async_client(server):
    import asyncio

    async def go():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        models = await client.models.list()
        one = await client.models.retrieve("tiny")
        assert one.model_dump() == models.data[0].model_dump()
        with pytest.raises(openai.NotFoundError, match="the model 'other' does not exist"):
            await client.models.retrieve("other")
        stream = await client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return models, text

    models, text = asyncio.run(go())
    assert [m.id for m in models.data] == ["tiny"] and text


def test_greedy_completion_equals_qwenkit_generate(client, tiny_chat_model, capsys):
    """The same prompt ids through `qwenkit generate --json` and /v1/completions: the same text."""
    import json

    from qwenkit.cli import main

    ids = [9707, 11, 1879, 13, 576]
    args = ["generate", str(tiny_chat_model), "--prompt-ids", ",".join(map(str, ids)), "--json"]
    assert main([*args, "--temperature", "0", "--max-new-tokens", "12", "--dtype", "float32"]) == 0
    cli = json.loads(capsys.readouterr().out)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == cli["text"]
    assert r.usage.completion_tokens == len(cli["output_token_ids"]) == 12


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_completion_logprobs_equal_non_streamed(client, echo):
    """Streamed legacy logprobs joined over the chunks are the non-streamed arrays: text_offset counts on
    from the text already sent (not from 0 in each chunk), and an echo's prompt tokens come first."""
    kwargs = dict(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=1.0, seed=4, n=2)
    kwargs |= dict(logprobs=1, echo=echo)
    whole = {c.index: c for c in client.completions.create(**kwargs).choices}
    text: dict[int, str] = {0: "", 1: ""}
    arrays: dict[int, dict[str, list]] = {i: {} for i in text}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            text[c.index] += c.text
            for key, values in (c.logprobs.model_dump() if c.logprobs else {}).items():
                arrays[c.index].setdefault(key, []).extend(values)
    for i in (0, 1):
        assert text[i] == whole[i].text
        assert arrays[i] == whole[i].logprobs.model_dump()
        assert len(arrays[i]["tokens"]) == 6 + (5 if echo else 0)
        starts = arrays[i]["text_offset"]
        assert all(text[i][o:].startswith(t) for o, t in zip(starts, arrays[i]["tokens"], strict=True))


def test_include_stop_str_in_output(client):
    """vLLM's include_stop_str_in_output: the text ends with the stop string that ended it, streamed and
    whole, on both routes (it was ignored, and the stop string cut off)."""
    kwargs = dict(model="tiny", max_tokens=24, temperature=1.0, seed=5)
    full = client.chat.completions.create(messages=MESSAGES, **kwargs).choices[0].message.content
    stop = full[6:9]
    expected = full[: full.index(stop) + len(stop)]
    extra = {"include_stop_str_in_output": True}
    kwargs |= dict(stop=[stop, "never-written"], extra_body=extra)
    cut = client.chat.completions.create(messages=MESSAGES, **kwargs).choices[0]
    assert (cut.message.content, cut.finish_reason) == (expected, "stop")
    chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    prompt = "Once upon a time"
    whole = client.completions.create(prompt=prompt, **{**kwargs, "stop": None, "extra_body": None})
    stop = whole.choices[0].text[4:7]
    expected = whole.choices[0].text[: whole.choices[0].text.index(stop) + len(stop)]
    kwargs |= dict(stop=stop)
    assert client.completions.create(prompt=prompt, **kwargs).choices[0].text == expected
    streamed = client.completions.create(prompt=prompt, stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_completion_top_logprobs_include_the_chosen_token(client):
    """OpenAI's legacy logprobs: "the API will always return the logprob of the sampled token, so there
    may be up to logprobs+1 elements"; vLLM adds it too. logprobs 0 gave an empty {} per token, and a
    sampled (or echoed prompt) token outside the top N was missing from its own entry."""
    kwargs = dict(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=1.0, seed=3)
    zero = client.completions.create(**kwargs, logprobs=0).choices[0].logprobs
    assert zero.top_logprobs == [{t: v} for t, v in zip(zero.tokens, zero.token_logprobs, strict=True)]
    two = client.completions.create(**kwargs, logprobs=2, echo=True).choices[0].logprobs
    assert two.top_logprobs[0] is None  # the first prompt token has no logprob, nor alternatives
    entries = list(zip(two.tokens, two.token_logprobs, two.top_logprobs, strict=True))[1:]
    for token, logprob, top in entries:
        assert top[token] == pytest.approx(logprob, abs=1e-6) and len(top) in (2, 3)
        assert list(top.values()) == sorted(top.values(), reverse=True)
    assert any(len(top) == 3 for _, _, top in entries)  # a token outside the top 2, added
