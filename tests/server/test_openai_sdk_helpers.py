"""The openai SDK's helpers beyond ``create``, against a live server: ``chat.completions.parse`` and
``.stream()`` with pydantic models (a strict ``json_schema`` and ``pydantic_function_tool``, held to
by the grammar, so even the random model's reply parses), and ``responses.parse`` / ``responses.stream``
with a ``text_format``."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, Field

MESSAGES = [{"role": "user", "content": "Pick a city and a number."}]
# The random model would open <think> (allowed before the JSON on Qwen3's hybrid template) and wander
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


class Pick(BaseModel):  # bounded, so every sampled reply ends inside max_tokens
    city: str = Field(max_length=8)
    count: int = Field(ge=0, le=99)
    sunny: bool


def sdk(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(server):
    return sdk(server)


def test_parse_fills_parsed_from_a_pydantic_response_format(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=60, temperature=1.0, extra_body=NO_THINKING)
    for seed in (1, 2):
        r = client.chat.completions.parse(**kwargs, response_format=Pick, seed=seed)
        (choice,) = r.choices
        assert choice.finish_reason == "stop" and choice.message.parsed is not None
        assert choice.message.parsed == Pick.model_validate_json(choice.message.content)
        assert json.loads(choice.message.content).keys() == {"city", "count", "sunny"}
    with client.chat.completions.stream(**kwargs, response_format=Pick, seed=2) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    deltas = [e.delta for e in events if e.type == "content.delta"]
    (done,) = [e for e in events if e.type == "content.done"]
    assert "".join(deltas) == done.content == final.choices[0].message.content == choice.message.content
    assert done.parsed == final.choices[0].message.parsed == choice.message.parsed


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_pydantic_tool_fills_parsed_arguments(client, stream):
    tool = openai.pydantic_function_tool(Pick, name="pick")
    assert tool["function"]["strict"] is True  # as the SDK sends it
    kwargs = dict(model="tiny", messages=MESSAGES, tools=[tool], max_tokens=80, temperature=1.0, seed=4)
    kwargs |= dict(tool_choice={"type": "function", "function": {"name": "pick"}}, extra_body=NO_THINKING)
    whole = client.chat.completions.parse(**kwargs)
    (call,) = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "stop"  # OpenAI's (and vLLM's) for a named function
    assert call.function.name == "pick" and call.id.startswith("call_")
    assert call.function.parsed_arguments == Pick.model_validate_json(call.function.arguments)
    if not stream:
        return
    with client.chat.completions.stream(**kwargs, stream_options={"include_usage": True}) as s:
        events = list(s)
        final = s.get_final_completion()
    deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    (done,) = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert len(deltas) > 1 and "".join(e.arguments_delta for e in deltas) == call.function.arguments
    assert (done.name, done.index, done.arguments) == ("pick", 0, call.function.arguments)
    assert done.parsed_arguments == call.function.parsed_arguments
    (streamed,) = final.choices[0].message.tool_calls
    assert streamed.function.parsed_arguments == call.function.parsed_arguments
    assert final.usage.model_dump() == whole.usage.model_dump()
    assert [e.type for e in events].count("chunk") == len(deltas) + 2  # + the finish, + the usage


def test_responses_parse_and_stream_with_a_text_format(client):
    kwargs = dict(model="tiny", input="Pick.", max_output_tokens=60, temperature=1.0)
    kwargs |= dict(text_format=Pick, extra_body={**NO_THINKING, "seed": 3})
    r = client.responses.parse(**kwargs)
    assert r.status == "completed" and r.output_parsed == Pick.model_validate_json(r.output_text)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert done.text == final.output_text == r.output_text
    assert final.output_parsed == r.output_parsed and final.usage.model_dump() == r.usage.model_dump()
    assert [e.type for e in events][-1] == "response.completed"


def test_the_stream_helper_takes_a_later_choice_that_is_ready_first(make_server):
    """A choice answered from the response cache is whole before the others start. Its chunks came
    first, and the SDK's .stream() helper, which appends a choice it has not seen and then finds it by
    index, failed with an IndexError: each choice's first chunk now goes out in index order."""
    c = sdk(make_server())  # the response cache on, as by default
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, extra_body=NO_THINKING)
    c.chat.completions.create(**kwargs, seed=8)  # the second choice of seed 7, cached
    order = [
        ch.index
        for chunk in c.chat.completions.create(**kwargs, seed=7, n=2, stream=True)
        for ch in chunk.choices
    ]
    assert list(dict.fromkeys(order)) == [0, 1] and order.count(1) == 2  # choice 1: its text, its finish
    second = c.chat.completions.create(**kwargs, seed=11).choices[0].message.content  # seed 10's second
    with c.chat.completions.stream(**kwargs, seed=10, n=2) as stream:
        for _ in stream:
            pass
        with pytest.raises(openai.LengthFinishReasonError) as e:  # the helper's, for max_tokens
            stream.get_final_completion()
    whole = c.chat.completions.create(**kwargs, seed=10, n=2).choices
    got = [(ch.index, ch.message.content) for ch in e.value.completion.choices]
    assert got == [(ch.index, ch.message.content) for ch in whole] and whole[1].message.content == second


def test_a_completions_stream_opens_its_choices_in_index_order(make_server):
    """/v1/completions as chat above: a later choice answered from the response cache (the second of
    n=2, or the second prompt of two) sent all its chunks before choice 0 began; the choices now first
    appear in index order, and each choice's text is the whole answer's."""
    c = sdk(make_server())  # the response cache on, as by default
    kwargs = dict(model="tiny", max_tokens=6, temperature=1.0)
    c.completions.create(**kwargs, prompt="Once upon", seed=8)  # the second choice of seed 7, cached
    c.completions.create(**kwargs, prompt="A second", seed=7)  # the second prompt's, cached
    for asked in (dict(prompt="Once upon", n=2), dict(prompt=["A first", "A second"])):
        chunks = list(c.completions.create(**kwargs, **asked, seed=7, stream=True))
        order = [ch.index for chunk in chunks for ch in chunk.choices]
        assert list(dict.fromkeys(order)) == [0, 1] and order.count(1) == 2  # choice 1: its text, its finish
        streamed = [
            "".join(ch.text for chunk in chunks for ch in chunk.choices if ch.index == i) for i in (0, 1)
        ]
        whole = c.completions.create(**kwargs, **asked, seed=7).choices
        assert streamed == [ch.text for ch in whole] and all(streamed)


def test_the_stored_response_routes_say_nothing_is_stored(client):
    """retrieve, delete, input_items and cancel of a response id the server just sent: each a 404 saying
    responses are not kept (it was a bare "Not Found", as for a route that does not exist)."""
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=2, store=True)
    assert r.store is False  # what it said when it answered
    words = (
        f"response {r.id!r} was not stored: this server keeps no responses (each is sent with store false)"
    )
    for call in (
        client.responses.retrieve,
        client.responses.delete,
        client.responses.cancel,
        client.responses.input_items.list,
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call(r.id)
        assert e.value.status_code == 404 and e.value.body["message"] == words
        assert (e.value.param, e.value.code) == ("response_id", "not_found")


def test_a_busy_servers_429_is_retried_by_the_sdk_after_its_retry_after(make_server):
    """--max-queue 0 and every row taken: the SDK's RateLimitError, after max_retries more tries, each
    waiting the server's Retry-After (1 s), and the server's words in it."""
    import itertools
    import time

    import httpx

    live = make_server(max_queue=0)
    tries: list[float] = []
    http = httpx.Client(event_hooks={"request": [lambda request: tries.append(time.monotonic())]})
    c = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=2, http_client=http)
    busy = dict(model="tiny", messages=MESSAGES, max_tokens=4000, n=8, stream=True)
    with sdk(live).chat.completions.create(**busy, extra_body={"ignore_eos": True}) as running:
        next(iter(running))  # every row is running
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    assert len(tries) == 3 and all(b - a >= 0.9 for a, b in itertools.pairwise(tries))
    assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
    assert e.value.code == "queue_full" and "more than 0 requests are waiting" in e.value.message


def test_async_streams_at_once_equal_their_whole_replies(server, client):
    """Six AsyncOpenAI .stream() helpers at once (one batch): each one's deltas, final completion and
    usage are the reply a lone request gets; with_raw_response and with_streaming_response read the same."""
    import asyncio

    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, extra_body=NO_THINKING)

    async def one(c: openai.AsyncOpenAI, seed: int) -> tuple[str, str, int]:
        async with c.chat.completions.stream(
            **kwargs, seed=seed, stream_options={"include_usage": True}
        ) as s:
            text = "".join([e.delta async for e in s if e.type == "content.delta"])
            try:
                final = await s.get_final_completion()
            except openai.LengthFinishReasonError as e:  # the helper's, for max_tokens
                final = e.completion
        return text, final.choices[0].message.content, final.usage.completion_tokens

    async def all_at_once() -> list[tuple[str, str, int]]:
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(c, seed) for seed in range(6)))

    streamed = asyncio.run(all_at_once())
    alone = [client.chat.completions.create(**kwargs, seed=seed) for seed in range(6)]
    for (deltas, final, tokens), whole in zip(streamed, alone, strict=True):
        assert deltas == final == whole.choices[0].message.content and tokens == 8
    assert len({final for _, final, _ in streamed}) > 1
    raw = client.chat.completions.with_raw_response.create(**kwargs, seed=0)
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    assert raw.parse().choices[0].message.content == streamed[0][1]
    with client.chat.completions.with_streaming_response.create(**kwargs, seed=0, stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in lines[:-1]]
    assert "".join(deltas) == streamed[0][1]


def test_responses_parse_fills_a_forced_pydantic_tools_parsed_arguments(client):
    tool = openai.pydantic_function_tool(Pick, name="pick")
    kwargs = dict(model="tiny", input="Pick.", tools=[tool], max_output_tokens=60, temperature=1.0)
    kwargs |= dict(tool_choice={"type": "function", "name": "pick"}, extra_body={**NO_THINKING, "seed": 1})
    r = client.responses.parse(**kwargs)
    (call,) = r.output
    assert r.status == "completed" and (call.type, call.name) == ("function_call", "pick")
    assert call.parsed_arguments == Pick.model_validate_json(call.arguments)
    with client.responses.stream(**kwargs) as stream:
        done = [e for e in stream if e.type == "response.function_call_arguments.done"]
        final = stream.get_final_response()
    assert [e.arguments for e in done] == [call.arguments]
    assert [o.parsed_arguments for o in final.output] == [call.parsed_arguments]
