"""``/v1/responses`` through the official openai SDK (``responses.create`` and ``responses.stream``, whose
state machine checks every event's order): the same tokens as the chat route, output items for reasoning,
text and calls, a conversation with calls and their outputs sent back, and 400s naming the field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import play, steered_server

from qwenkit.engine import SamplingParams

INSTRUCTIONS, QUESTION = "Be brief.", "Name three colours."
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
ARGS = '{"city": "Paris", "unit": "c"}'
CALL = f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>'
THINK_CALL = "<think>\nI should call the weather tool.\n</think>\n\nChecking.\n" + CALL


def sdk(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    with steered_server(tiny_chat_model) as served:
        yield served


def test_text_equals_the_chat_route_and_the_library(server, chat_llm):
    c = sdk(server)
    r = c.responses.create(
        model="tiny", instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=12, temperature=0
    )
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
    ids = chat_llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ref = chat_llm.generate([ids], SamplingParams(temperature=0, max_tokens=12))[0]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.output_text == ref.text == chat.choices[0].message.content
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert (r.status, r.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert r.completed_at is None  # "only present when the status is completed"
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (
        len(ids),
        12,
        len(ids) + 12,
    )
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert (r.instructions, r.max_output_tokens, r.temperature, r.store) == (INSTRUCTIONS, 12, 0, False)
    # input as message items (text parts, developer role) renders the same prompt
    items = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": INSTRUCTIONS}]},
        {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]
    again = c.responses.create(model="tiny", input=items, max_output_tokens=12, temperature=0)
    assert again.output_text == r.output_text and again.usage.input_tokens == len(ids)


def test_streamed_events_build_the_same_response(server):
    kwargs = dict(model="tiny", input=QUESTION, max_output_tokens=10, temperature=0.8, extra_body={"seed": 4})
    whole = sdk(server).responses.create(**kwargs)
    with sdk(server).responses.stream(**kwargs) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1].response
    assert "".join(deltas) == events[-4].text == final.output_text == whole.output_text
    assert final.usage.output_tokens == 10 and final.status == "incomplete"
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_calls_and_reasoning_are_output_items(steered, stream):
    live, llm, _ = steered
    play(steered, THINK_CALL)
    kwargs = dict(model="tiny", input="Weather in Paris?", tools=[WEATHER], max_output_tokens=200)
    if stream:
        with sdk(live).responses.stream(**kwargs) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert kinds[-1] == "response.completed" and "response.reasoning_text.delta" in kinds
        assert "response.function_call_arguments.done" in kinds
    else:
        r = sdk(live).responses.create(**kwargs)
    assert r.status == "completed" and [o.type for o in r.output] == ["reasoning", "message", "function_call"]
    assert r.completed_at >= r.created_at
    reasoning, _message, call = r.output
    assert reasoning.content[0].text == "I should call the weather tool." and r.output_text == "Checking."
    assert (call.name, json.loads(call.arguments), call.status) == (
        "get_weather",
        json.loads(ARGS),
        "completed",
    )
    assert call.call_id.startswith("call") and call.id.startswith("fc_")
    # reasoning tokens: the reply's up to and including </think>
    think = llm.tokenizer.encode("<think>\nI should call the weather tool.\n</think>", allow_special=True)
    assert r.usage.output_tokens_details.reasoning_tokens == len(think)


def test_a_conversation_with_call_outputs_renders_as_chat_would(steered):
    """The call and its output sent back as items give the prompt the chat template makes of the same
    conversation as chat messages (the reasoning item goes with the assistant turn, as Qwen3's template
    drops it from earlier turns)."""
    live, llm, _ = steered
    play(steered, CALL)
    first = sdk(live).responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER])
    (call,) = [o for o in first.output if o.type == "function_call"]
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "x"}],
        },
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"},
    ]
    second = sdk(live).responses.create(model="tiny", input=items, tools=[WEATHER], max_output_tokens=3)
    chat = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "x",
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.loads(call.arguments)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "18 C and sunny"},
    ]
    ids = llm.tokenizer.apply_chat_template(chat, tools=[CHAT_WEATHER], add_generation_prompt=True)
    assert second.usage.input_tokens == len(ids)
    # the same conversation on the chat route counts the same prompt
    body = {"model": "tiny", "messages": chat, "tools": [CHAT_WEATHER], "max_tokens": 1}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert r["usage"]["prompt_tokens"] == len(ids)


def test_a_forced_call_and_a_json_schema(server):
    """tool_choice names a function, text.format asks for a schema: the grammar holds the random model
    to them, as on the chat route."""
    c = sdk(server)
    no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}
    r = c.responses.create(
        model="tiny",
        input="Weather?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
        temperature=0,
        extra_body=no_thinking,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
    }
    r = c.responses.create(
        model="tiny",
        input="A number?",
        text={"format": {"type": "json_schema", "name": "num", "schema": schema}},
        max_output_tokens=40,
        temperature=0,
        extra_body=no_thinking,
    )
    assert r.status == "completed" and isinstance(json.loads(r.output_text)["n"], int)


def test_max_tool_calls_is_echoed(server):
    """``max_tool_calls`` caps calls to built-in tools, and only function tools are offered here, so it has
    nothing to cap; the Response echoes it as OpenAI's does, whole and in the stream's events."""
    c = sdk(server)
    kwargs = dict(model="tiny", input="hi", tools=[WEATHER], tool_choice="none", max_output_tokens=2)
    assert c.responses.create(max_tool_calls=3, **kwargs).max_tool_calls == 3
    assert c.responses.create(**kwargs).max_tool_calls is None
    events = list(c.responses.create(max_tool_calls=1, stream=True, **kwargs))
    heads = [e.response for e in events if hasattr(e, "response")]  # created ... incomplete
    assert [e.type for e in events][-1] == "response.incomplete" and len(heads) >= 2
    assert [h.max_tool_calls for h in heads] == [1] * len(heads)


def test_the_sampling_settings_echoed_are_those_the_request_ran_with(server):
    """Unset, ``temperature``, ``top_p`` and ``max_output_tokens`` are the model's generation_config
    defaults the request got (0.7, 0.8, max_new_tokens 64), never null; set, the request's own; and
    ``top_logprobs`` is OpenAI's default 0. The same in every Response of a stream."""
    c = sdk(server)
    defaults = c.responses.create(model="tiny", input="hi", extra_body={"seed": 1})
    got = (defaults.temperature, defaults.top_p, defaults.max_output_tokens, defaults.top_logprobs)
    assert got == (0.7, 0.8, 64, 0)
    kwargs = dict(model="tiny", input="hi", temperature=0.3, top_p=0.5, max_output_tokens=3)
    asked = c.responses.create(**kwargs)
    assert (asked.temperature, asked.top_p, asked.max_output_tokens) == (0.3, 0.5, 3)
    events = list(c.responses.create(model="tiny", input="hi", stream=True, max_output_tokens=2))
    heads = [e.response for e in events if hasattr(e, "response")]  # created ... incomplete
    assert len(heads) == 3
    assert [(h.temperature, h.top_p, h.max_output_tokens) for h in heads] == [(0.7, 0.8, 2)] * 3


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "does not keep"),
        ({"input": "hi", "background": True}, "background", "not supported"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools", "only function tools"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input",
            "input[0].content[0]: only text parts are supported, got 'input_image'",
        ),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input", "'item_reference' items are not"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input", "input[0].role: must be user"),
        ({"input": "hi", "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"input": "hi", "max_output_tokens": 10**6}, "max_output_tokens", "maximum context length"),
        ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format", "text.format.type must be"),
        ({"input": "hi", "tool_choice": {"type": "file_search"}}, "tool_choice", "tool_choice must be"),
        ({"input": []}, "input", "input: is empty"),
        ({"input": "hi", "include": ["message.output_text.logprob"]}, "include.0", "Input should be"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": {"temp": 21}}]},
            "input",
            "input[0].output: must be a string or a list of text parts",
        ),
        (
            {
                "input": [
                    {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}
                ]
            },
            "input",
            "input[0].output[0]: only text parts are supported, got 'input_image'",
        ),
        # the shape to use is the Responses one, not the chat route's {"function": {"name": ...}}
        (
            {"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
            "tool_choice",
            "tool_choice names 'nope', which is not in `tools`. Correct usage: "
            '`{"type": "function", "name": "my_function"}`',
        ),
        (
            {"input": "hi", "tools": [WEATHER], "tool_choice": "any"},
            "tool_choice",
            'Correct usage: `{"type": "function", "name": "my_function"}`',
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{'a': 1}"}]},
            "input",
            "input[0].arguments: must be a JSON object, got \"{'a': 1}\"",
        ),
        (
            {"input": "hi", "text": {"format": {"type": "json_schema", "name": "n", "schema": "{}"}}},
            "text.format",
            "text.format.schema must be a JSON schema object",
        ),
        # fields that would change the answer are refused by name, never ignored
        ({"input": "hi", "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"input": "hi", "prompt": {"id": "pmpt_1"}}, "prompt", "prompt is not supported"),
        (
            {"input": "hi", "guided_json": {"type": "object"}},
            "guided_json",
            "guided_json (a vLLM extension) is not supported; use text.format (json_schema)",
        ),
        ({"input": "hi", "min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
        (  # past the default length: named as the client names it (the model's default here is 64)
            {"input": "hi", "min_tokens": 65},
            "min_tokens",
            "no max_output_tokens, and the default here is 64; send a max_output_tokens of at least 65",
        ),
        # the chat route's structured output field, which would give free text here
        (
            {"input": "hi", "response_format": {"type": "json_object"}},
            "response_format",
            "response_format is the chat route's field; on /v1/responses use text.format",
        ),
        ({"input": "hi", "max_tool_calls": "2"}, "max_tool_calls", "valid integer"),
        ({"input": "hi", "max_tool_calls": -1}, "max_tool_calls", "greater than or equal to 0"),
    ],
)
def test_bad_requests_are_400_naming_the_field(server, body, param, words):
    r = httpx.post(server.url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("field", "param"),
    [
        ('"metadata": {"k": "\\ud800"}', "metadata.k"),
        ('"metadata": {"\\udfff": "v"}', "metadata"),
        ('"user": "a\\ud800"', "user"),
        ('"text": {"format": {"type": "json_schema", "name": "\\ud800", "schema": {}}}', "text.format.name"),
        ('"reasoning": {"effort": "\\udc80"}', "reasoning.effort"),
    ],
)
def test_a_lone_surrogate_in_a_field_the_response_echoes_is_a_400_naming_it(server, field, param, stream):
    """A Response object echoes metadata, user, text and reasoning as sent; a string holding a lone
    surrogate (JSON's "\\ud800") cannot be written as UTF-8, so the whole response was a 500 and a
    stream was cut before its first event (the connection reset). As a prompt holding one, it is a 400
    naming the field."""
    raw = '{"input": "hi", "max_output_tokens": 2, "stream": ' + f"{str(stream).lower()}, {field}}}"
    r = httpx.post(
        server.url + "/v1/responses", content=raw.encode(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "is not valid Unicode: a lone surrogate" in err["message"], err


def test_a_stopped_stream_ends_with_response_failed(make_server, chat_llm):
    """Past --request-timeout a streamed response ends as failed, naming the cause, its open message
    closed first (the SDK's state machine accepts the stream); not streamed it is the 408 chat gives."""
    live = make_server(request_timeout=0.5)
    kwargs = dict(model="tiny", input="Hello", max_output_tokens=5000, extra_body={"ignore_eos": True})
    with sdk(live).responses.stream(**kwargs) as stream:
        events = list(stream)
    assert [e.type for e in events[-2:]] == ["response.output_item.done", "response.failed"]
    failed = events[-1].response
    assert (
        failed.status == "failed"
        and failed.error.code == "timeout"
        and "--request-timeout" in failed.error.message
    )
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (
        streamed and failed.output[0].content[0].text == streamed and failed.output[0].status == "incomplete"
    )
    r = httpx.post(
        live.url + "/v1/responses", json={"input": "Hello", "max_output_tokens": 5000, "ignore_eos": True}
    )
    assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
    assert chat_llm.driver.wait_idle()


def _items(response) -> list[tuple]:
    """Each output item as (type, status, its text or the call's name and arguments)."""
    out = []
    for o in response.output:
        if o.type == "function_call":
            out.append((o.type, o.status, o.name, o.arguments))
        else:
            out.append((o.type, o.status, *(part.text for part in o.content)))
    return out


@pytest.mark.parametrize(
    ("reply", "limit", "expected"),
    [
        # thinking and nothing after it: the reasoning alone (no empty message beside it)
        ("<think>\nhmm\n</think>\n\n", 200, [("reasoning", "completed", "hmm")]),
        # cut off while thinking
        ("<think>\nhmm hmm hmm hmm hmm hmm", 4, [("reasoning", "completed", "hmm")]),
        # text on both sides of a call: the items in the order the model wrote them
        (
            f"Sure.\n{CALL}\nDone.",
            200,
            [
                ("message", "completed", "Sure."),
                ("function_call", "completed", "get_weather", ARGS),
                ("message", "completed", "Done."),
            ],
        ),
    ],
)
def test_whole_and_streamed_replies_have_the_same_items(steered, reply, limit, expected):
    live, _llm, _ = steered
    kwargs = dict(model="tiny", input="Weather in Paris?", tools=[WEATHER], max_output_tokens=limit)
    play(steered, reply)
    whole = sdk(live).responses.create(**kwargs)
    play(steered, reply)
    with sdk(live).responses.stream(**kwargs) as stream:
        streamed = list(stream)[-1].response
    assert _items(whole) == _items(streamed) == expected
    assert whole.status == streamed.status == ("completed" if limit == 200 else "incomplete")


def test_reasoning_with_no_turn_after_it_is_not_moved_to_a_later_turn(steered):
    """A reply cut off while thinking comes back as a reasoning item with no message: sent back, it is
    dropped, never rendered as the thinking of the next assistant turn (the one calling the tool here)."""
    live, llm, _ = steered
    items = [
        {"role": "user", "content": "Hi"},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "x"}],
        },
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": ARGS},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
    ]
    r = sdk(live).responses.create(model="tiny", input=items, tools=[WEATHER], max_output_tokens=1)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.loads(ARGS)},
    }
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    ids = llm.tokenizer.apply_chat_template(chat, tools=[CHAT_WEATHER], add_generation_prompt=True)
    assert r.usage.input_tokens == len(ids)
