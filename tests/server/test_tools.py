"""Tool calling on the chat route for hermes templates (Qwen2.5/Qwen3): parsing (steered model), constrained
decoding (random model), validation. ReAct templates (Qwen v1): test_tools_react.py; Llama 3.1/3.2's JSON
calls: test_tools_llama3.py.

Real clients: the openai SDK (create, streaming accumulation, the ``.stream()`` helper)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import play, steered_server
from tool_requests import (
    CALL,
    THINK_CALL,
    TIME,
    TIME_CALL,
    TWO_CALLS,
    USER,
    WEATHER,
    chat_reply,
    client,
    post,
)

from qwenkit.server.completions import chat_prompt
from qwenkit.server.schemas import ChatCompletionRequest


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    with steered_server(tiny_chat_model) as served:
        yield served


# ---- parsing (steered replies) -------------------------------------------------------------------


def test_without_tools_tool_call_text_is_verbatim(steered):
    live = steered[0]
    for stream in (False, True):
        play(steered, TWO_CALLS)
        r = chat_reply(client(live), stream, model="tiny", max_tokens=200, messages=USER)
        assert (r.content, r.calls, r.finish) == (TWO_CALLS, [], "stop")


def test_parallel_calls_stream_and_whole_agree(steered):
    live = steered[0]
    c = client(live)
    kwargs = dict(model="tiny", max_tokens=200, messages=USER, tools=[WEATHER, TIME])
    play(steered, TWO_CALLS, tools=[WEATHER, TIME])
    whole = chat_reply(c, False, **kwargs)  # each call's type "function": chat_reply checks it
    assert whole.finish == "tool_calls" and whole.content is None
    assert whole.parsed == [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {})]
    play(steered, TWO_CALLS, tools=[WEATHER, TIME])
    streamed = chat_reply(c, True, **kwargs)
    assert streamed.content == "" and streamed.finish == "tool_calls"
    assert streamed.parsed == whole.parsed
    ids = [x["id"] for x in streamed.calls]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2


def test_text_that_looks_like_a_tag_start_is_content(steered):
    """``<tool`` and ``<tool_cal`` are held back while they might open a block, then sent as content."""
    live = steered[0]
    text = "Use <tool and <tool_cal here; x < y."
    play(steered, text)
    r = chat_reply(client(live), True, model="tiny", max_tokens=100, messages=USER, tools=[WEATHER])
    assert (r.content, r.calls, r.finish) == (text, [], "stop")


def test_stream_helper_accumulates_calls(steered):
    live = steered[0]
    play(steered, TWO_CALLS, tools=[WEATHER, TIME])
    with client(live).chat.completions.stream(
        model="tiny", max_tokens=200, messages=USER, tools=[WEATHER, TIME]
    ) as s:
        kinds = [e.type for e in s]
        final = s.get_final_completion()
    assert "tool_calls.function.arguments.done" in kinds
    calls = final.choices[0].message.tool_calls
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}),
        ("get_time", {}),
    ]


def test_thinking_goes_to_reasoning_content(steered):
    live = steered[0]
    replies = []
    for stream in (False, True):
        play(steered, THINK_CALL, tools=[WEATHER])
        r = chat_reply(client(live), stream, model="tiny", max_tokens=200, messages=USER, tools=[WEATHER])
        assert (r.content, r.reasoning, r.finish) == (
            "Checking.",
            "I should call the weather tool.",
            "tool_calls",
        )
        assert r.parsed == [("get_weather", {"city": "Paris", "unit": "c"})]
        replies.append(r)
    assert replies[1].pairs == replies[0].pairs


def test_reasoning_is_also_sent_as_vllms_reasoning(steered):
    """vLLM deprecated ``reasoning_content`` for ``reasoning`` and sends both, equal (its issue #27755):
    clients written for either name read the reasoning, whole and streamed."""
    live = steered[0]
    play(steered, "<think>\nWeigh it.\n</think>\n\nSunny.")
    body = {"model": "tiny", "max_tokens": 50, "messages": USER}
    message = post(live.url + "/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"], message["reasoning"]) == (
        "Sunny.",
        "Weigh it.",
        "Weigh it.",
    )
    play(steered, "<think>\nWeigh it.\n</think>\n\nSunny.")
    text = post(live.url + "/v1/chat/completions", json={**body, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    thought = [d for d in deltas if "reasoning_content" in d or "reasoning" in d]
    assert thought and all(d["reasoning"] == d["reasoning_content"] for d in thought)
    assert "".join(d["reasoning"] for d in thought) == "Weigh it."


def test_a_reply_cut_off_while_thinking_has_no_content(steered):
    """Reasoning and nothing after it: content null (as a stream sends none), as vLLM's; not ""."""
    live = steered[0]
    replies = []
    for stream in (False, True):
        play(steered, "<think>\nStill weighing it.\n</think>\n\n")
        replies.append(chat_reply(client(live), stream, model="tiny", max_tokens=200, messages=USER))
    assert [(r.reasoning, r.finish) for r in replies] == [("Still weighing it.", "stop")] * 2
    assert replies[0].content is None and replies[1].content == ""


def test_malformed_call_is_content_not_500(steered, caplog):
    """A block that never opens as a call (Python-style arguments) streams no call at all; one that
    breaks after its arguments started streaming leaves that started call (a stream cannot take it
    back) but ends with finish_reason "stop" and the same content. Both: the raw text, every
    character of the markup, as content; a warning with the request id in the server log."""
    live = steered[0]
    pythonic = (
        'Let me see.\n<tool_call>\n{"name": "get_weather", "arguments": {\'city\': \'Paris\'}}\n</tool_call>'
    )
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>'
    for bad, started in ((pythonic, []), (broken, [("get_weather", '{"city": "Paris"\n')])):
        expected = bad.replace("\n<tool_call>", "<tool_call>")  # whitespace before markup is not content
        caplog.clear()
        play(steered, bad, tools=[WEATHER])
        r = post(
            live.url + "/v1/chat/completions",
            json={"messages": USER, "tools": [WEATHER], "max_tokens": 200},
        )
        assert r.status_code == 200
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == expected and choice["message"]["tool_calls"] is None
        assert choice["finish_reason"] == "stop"
        (line,) = [rec.getMessage() for rec in caplog.records if "<tool_call> block" in rec.getMessage()]
        named = f"{r.headers['x-request-id']} {r.json()['id']}"  # the request's id, the completion's
        assert line.startswith(named + " choice 0: a <tool_call> block is not JSON")
        caplog.clear()
        play(steered, bad, tools=[WEATHER])
        r = chat_reply(client(live), True, model="tiny", max_tokens=200, messages=USER, tools=[WEATHER])
        assert (r.content, r.finish, r.pairs) == (expected, "stop", started)
        assert sum("<tool_call> block" in rec.getMessage() for rec in caplog.records) == 1
        play(steered, bad, tools=[WEATHER])  # the SDK's stream helper takes it without raising
        with client(live).chat.completions.stream(
            model="tiny", max_tokens=200, messages=USER, tools=[WEATHER]
        ) as s:
            final = s.get_final_completion().choices[0]
        assert (final.message.content, final.finish_reason) == (expected, "stop")


def test_streamed_arguments_arrive_in_pieces_as_the_sdk_accumulates(steered):
    """Raw chunks from the openai SDK: per call one delta with index, id, type, name and arguments "",
    then argument pieces (many for a long call, each while the model was still writing), indexes 0 and
    1 for parallel calls; the accumulated arguments equal the non-streamed ones byte for byte."""
    live = steered[0]
    note = {
        "type": "function",
        "function": {
            "name": "save_note",
            "parameters": {
                "type": "object",
                "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
                "required": ["title", "body"],
            },
        },
    }
    body = " ".join(f"step {i}," for i in range(12))
    args = f'{{"title": "plan", "body": "{body}"}}'
    reply = (
        f'Saving it.\n<tool_call>\n{{"name": "save_note", "arguments": {args}}}\n</tool_call>\n{TIME_CALL}'
    )
    tools = [note, TIME]
    c = client(live)
    play(steered, reply)
    whole = chat_reply(c, False, model="tiny", max_tokens=400, messages=USER, tools=tools)
    assert whole.content == "Saving it." and whole.finish == "tool_calls"
    assert [name for name, _ in whole.pairs] == ["save_note", "get_time"]
    assert whole.pairs[0][1] == args  # the model's text, not re-serialized

    play(steered, reply)
    deltas = []
    for chunk in c.chat.completions.create(
        model="tiny", max_tokens=400, messages=USER, tools=tools, stream=True
    ):
        if chunk.choices:
            deltas.append(chunk.choices[0].delta)
    content = "".join(d.content or "" for d in deltas)
    assert content == "Saving it."  # no markup, not even a partial tag
    call_deltas = [(i, tc) for i, d in enumerate(deltas) for tc in d.tool_calls or []]
    heads = [(i, tc) for i, tc in call_deltas if tc.id is not None]
    assert [(tc.index, tc.type, tc.function.name, tc.function.arguments) for _, tc in heads] == [
        (0, "function", "save_note", ""),
        (1, "function", "get_time", ""),
    ]
    for index, (start, head) in enumerate(heads):
        pieces = [tc.function.arguments for i, tc in call_deltas if tc.index == index and tc.id is None]
        assert all(tc.function.name is None for i, tc in call_deltas if tc.index == index and tc.id is None)
        assert all(i > start for i, tc in call_deltas if tc.index == index and tc.id is None)
        assert "".join(pieces) == whole.pairs[index][1]  # byte for byte
        assert head.id == heads[index][1].id
    long_pieces = [tc.function.arguments for _, tc in call_deltas if tc.index == 0 and tc.id is None]
    assert len(long_pieces) > 10  # as the model wrote them, not one blob
    assert heads[1][0] > max(i for i, tc in call_deltas if tc.index == 0)  # the first call ended first

    play(steered, reply)  # the SDK's own accumulation agrees
    with c.chat.completions.stream(model="tiny", max_tokens=400, messages=USER, tools=tools) as s:
        arg_deltas = [e for e in s if e.type == "tool_calls.function.arguments.delta"]
        final = s.get_final_completion()
    got = [(t.function.name, t.function.arguments) for t in final.choices[0].message.tool_calls]
    assert got == whole.pairs
    assert len([e for e in arg_deltas if e.index == 0]) > 10


def test_parallel_tool_calls_false_keeps_one(steered):
    live = steered[0]
    play(steered, TWO_CALLS, tools=[WEATHER, TIME])
    r = chat_reply(
        client(live),
        False,
        model="tiny",
        max_tokens=200,
        messages=USER,
        tools=[WEATHER, TIME],
        parallel_tool_calls=False,
    )
    assert [name for name, _ in r.pairs] == ["get_weather"]


def test_tool_choice_none_returns_text(steered):
    live = steered[0]
    play(steered, CALL, tools=[WEATHER])
    r = chat_reply(
        client(live), False, model="tiny", max_tokens=200, messages=USER, tools=[WEATHER], tool_choice="none"
    )
    assert r.calls == [] and CALL in r.content  # no tool_calls list at all: chat_reply checks it


def test_follow_up_turn_with_tool_results(steered):
    """The assistant's call comes back with string arguments; results come as tool messages, with
    ``tool_call_id`` (OpenAI) or ``id`` plus ``extra`` (qwen-agent raw mode); the prompt shows them."""
    live = steered[0]
    history = [
        *USER,
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    qwen_agent = [
        *history[:2],
        {"role": "tool", "content": "sunny, 21C", "id": "call_1", "extra": {"function_id": "call_1"}},
    ]
    for messages in (history, qwen_agent):
        ids = chat_prompt(steered[1], ChatCompletionRequest(messages=messages, tools=[WEATHER]))
        text = steered[1].tokenizer.decode(ids)
        assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}' in text
        assert "<tool_response>\nsunny, 21C\n</tool_response>" in text
        play(steered, "It is sunny, 21C.", messages=messages, tools=[WEATHER])
        r = chat_reply(client(live), False, model="tiny", max_tokens=200, messages=messages, tools=[WEATHER])
        assert (r.content, r.calls, r.finish) == ("It is sunny, 21C.", [], "stop")


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tools": []}, "tools", "empty"),
        ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not in `tools`",
        ),
        ({"tools": [{"type": "function"}]}, "tools", "tools[0]"),
        (
            {
                "messages": [
                    *USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{x"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "22 C"},
                ]
            },
            "messages",
            # not rendered as a call with no arguments, which the client never sent
            "messages[1].tool_calls[0].function.arguments must be a JSON object, got '{x'",
        ),
        (
            {"tools": [WEATHER, TIME, WEATHER]},
            "tools",
            "tools[2].function.name 'get_weather' is also tools[0]'s",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format", "json_schema"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}},
                }
            },
            "response_format",
            "schema",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"properties": {"a": {"type": "nonsense"}}}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
            # llguidance's problem alone, not our generated grammar quoted after it
            "the schema cannot be used for constrained decoding: failed to compile JSON schema: "
            "Invalid type: nonsense",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "string", "pattern": "(("}},
                }
            },
            "response_format",
            # regex-syntax's cause is on a later line than its "regex parse error:"
            "the schema cannot be used for constrained decoding: regex parse error: unclosed group",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "integer", "minimum": 10**40}},
                }
            },
            "response_format",
            # llguidance's own words came alone, not saying it was the schema it could not read
            "the schema cannot be used for constrained decoding: Value is not JSON serializable: "
            + "1"
            + "0" * 40,
        ),
    ],
)
def test_bad_tool_fields_are_400(server, extra, param, words):
    r = post(server.url + "/v1/chat/completions", json={"messages": USER, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and "\n" not in err["message"]


# ---- constrained decoding (random model) ---------------------------------------------------------


def test_named_tool_choice_validates_against_schema(server):
    c = client(server)
    kwargs = dict(
        model="tiny",
        messages=USER,
        tools=[WEATHER, TIME],
        temperature=1.0,
        seed=3,
        max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    whole = chat_reply(c, False, **kwargs)
    ((name, arguments),) = whole.pairs
    assert name == "get_weather" and whole.finish == "stop"  # OpenAI's (and vLLM's) for a named function
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    streamed = chat_reply(c, True, **kwargs)
    assert streamed.finish == "stop" and streamed.content == ""
    assert streamed.pairs == whole.pairs


def test_required_picks_a_listed_tool(server):
    r = chat_reply(
        client(server),
        False,
        model="tiny",
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    ((name, arguments),) = r.pairs
    fn = {"get_weather": WEATHER, "get_time": TIME}[name]["function"]
    jsonschema.validate(json.loads(arguments), fn["parameters"])
    assert r.finish == "tool_calls"


SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            }
        },
        "required": ["person"],
        "additionalProperties": False,
    },
    "array_enum": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 4,
            }
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "count": {"type": "integer", "minimum": 1, "maximum": 9},
            "ok": {"type": "boolean"},
        },
        "required": ["score", "count", "ok"],
        "additionalProperties": False,
    },
}


# The random model would open <think> (allowed before the JSON on Qwen3's hybrid template) and wander
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_response_format_json_schema_validates(server, name):
    r = chat_reply(
        client(server),
        False,
        model="tiny",
        messages=USER,
        temperature=1.0,
        seed=11,
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}},
        extra_body=NO_THINKING,
    )
    text = r.content
    assert r.finish == "stop", text
    assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)), text  # compact: no free whitespace
    jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_response_format_json_object(server):
    r = chat_reply(
        client(server),
        False,
        model="tiny",
        messages=USER,
        temperature=0,
        max_tokens=40,
        response_format={"type": "json_object"},
        extra_body=NO_THINKING,
    )
    assert r.content.startswith("{") and (r.finish == "length" or isinstance(json.loads(r.content), dict))


# ---- a prompt that opens <think> (Qwen3-*-Thinking-2507, QwQ) --------------------------------------


@pytest.fixture(scope="module")
def steered_thinking(tiny_chat_model):
    """Qwen3's template as the thinking-only models end it: the generation prompt opens ``<think>``, so
    the reply starts inside its reasoning."""
    template = json.loads((Path(tiny_chat_model) / "tokenizer_config.json").read_text())["chat_template"]
    turn = "{{- '<|im_start|>assistant\\n' }}"
    assert turn in template
    with steered_server(tiny_chat_model, template.replace(turn, turn[:-4] + "<think>\\n' }}")) as served:
        yield served


@pytest.mark.parametrize("stream", [False, True])
def test_an_enforced_answer_comes_after_the_thinking_the_prompt_opened(steered_thinking, stream):
    """The grammar of tool_choice "required" or a json_schema response_format lets the model end the
    thinking its prompt opened and holds it to the call or the JSON after ``</think>`` (vLLM's reasoning
    parser does the same): the call and the JSON come back as tool_calls and content, not reasoning."""
    live = steered_thinking[0]
    args = '{"city":"Paris","unit":"c"}'
    call = f'<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>'
    person = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    schema_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": person}}
    cases = [
        ({"tools": [WEATHER], "tool_choice": "required"}, "Paris, then.\n</think>\n\n" + call),
        ({"response_format": schema_format}, 'A city.\n</think>\n\n{"city":"Paris"}'),
    ]
    for fields, reply in cases:
        play(steered_thinking, reply)
        r = chat_reply(client(live), stream, model="tiny", messages=USER, max_tokens=100, **fields)
        if "tools" in fields:
            assert (r.reasoning, r.pairs, r.finish) == ("Paris, then.", [("get_weather", args)], "tool_calls")
            assert not r.content
        else:
            assert (r.reasoning, r.content, r.pairs, r.finish) == ("A city.", '{"city":"Paris"}', [], "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_a_hybrid_model_may_think_before_a_forced_call(steered, stream):
    """Qwen3's hybrid models open ``<think>`` themselves: under tool_choice "required" the grammar lets the
    reply think first, then holds it to the call (it used to force the call from the first token, so the
    thinking a trained model writes was masked away). A reply that calls at once passes too, and with
    ``enable_thinking`` off (the prompt closes an empty block) the call is held from the first token."""
    live = steered[0]
    args = '{"city":"Paris","unit":"c"}'
    call = f'<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>'
    cases = [
        ("<think>\nParis, then.\n</think>\n\n" + call, {}, "Paris, then."),
        (call, {}, None),
        (call, {"chat_template_kwargs": {"enable_thinking": False}}, None),
    ]
    for reply, fields, want_reasoning in cases:
        play(steered, reply)
        r = chat_reply(
            client(live),
            stream,
            model="tiny",
            messages=USER,
            max_tokens=100,
            tools=[WEATHER],
            tool_choice="required",
            extra_body=fields,
        )
        assert (r.reasoning, r.pairs, r.finish) == (want_reasoning, [("get_weather", args)], "tool_calls"), r
        assert not r.content
