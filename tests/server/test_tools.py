"""Tool calling on the chat route: parsing (steered model), constrained decoding (random model), validation.

Real clients: the openai SDK (create, streaming accumulation, the ``.stream()`` helper)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import play, steered_server

from qwenkit.server.completions import chat_prompt
from qwenkit.server.schemas import ChatCompletionRequest
from qwenkit.tokenizer.chat_template import chatml_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
USER = [{"role": "user", "content": "What's the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
TWO_CALLS = CALL + "\n" + TIME_CALL
THINK_CALL = "<think>\nI should call the weather tool.\n</think>\n\nChecking.\n" + CALL


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    with steered_server(tiny_chat_model) as served:
        yield served


def post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url, timeout=120, **kwargs)


def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)


def stream_parts(c, **kwargs):
    content, reasoning, calls, finish, roles = "", "", {}, None, 0
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        d = chunk.choices[0].delta
        roles += d.role is not None
        content += d.content or ""
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        for tc in d.tool_calls or []:
            assert tc.function is not None  # the .stream() helper asserts this on every delta
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert entry["id"] is None, "id sent twice"
                entry["id"] = tc.id
            if tc.function.name:
                assert entry["name"] == "", "name sent twice"
                entry["name"] = tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert roles == 1
    return content, reasoning, [calls[i] for i in sorted(calls)], finish


# ---- parsing (steered replies) -------------------------------------------------------------------


def test_without_tools_tool_call_text_is_verbatim(steered):
    live = steered[0]
    play(steered, TWO_CALLS)
    r = client(live).chat.completions.create(model="tiny", max_tokens=200, messages=USER)
    assert r.choices[0].message.content == TWO_CALLS and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    play(steered, TWO_CALLS)
    content, _, calls, finish = stream_parts(client(live), model="tiny", max_tokens=200, messages=USER)
    assert (content, calls, finish) == (TWO_CALLS, [], "stop")


def test_parallel_calls_stream_and_whole_agree(steered):
    live = steered[0]
    c = client(live)
    play(steered, TWO_CALLS, tools=[WEATHER, TIME])
    r = c.chat.completions.create(model="tiny", max_tokens=200, messages=USER, tools=[WEATHER, TIME])
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content is None
    assert [(t.type, t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls] == [
        ("function", "get_weather", {"city": "Paris", "unit": "c"}),
        ("function", "get_time", {}),
    ]
    play(steered, TWO_CALLS, tools=[WEATHER, TIME])
    content, _, calls, finish = stream_parts(
        c, model="tiny", max_tokens=200, messages=USER, tools=[WEATHER, TIME]
    )
    assert content == "" and finish == "tool_calls"
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == [
        (t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls
    ]
    assert all(x["id"].startswith("call_") for x in calls) and len({x["id"] for x in calls}) == 2


def test_text_that_looks_like_a_tag_start_is_content(steered):
    """``<tool`` and ``<tool_cal`` are held back while they might open a block, then sent as content."""
    live = steered[0]
    text = "Use <tool and <tool_cal here; x < y."
    play(steered, text)
    content, _, calls, finish = stream_parts(
        client(live), model="tiny", max_tokens=100, messages=USER, tools=[WEATHER]
    )
    assert (content, calls, finish) == (text, [], "stop")


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
    play(steered, THINK_CALL, tools=[WEATHER])
    r = post(
        live.url + "/v1/chat/completions", json={"messages": USER, "tools": [WEATHER], "max_tokens": 200}
    ).json()
    m = r["choices"][0]["message"]
    assert m["reasoning_content"] == "I should call the weather tool." and m["content"] == "Checking."
    assert json.loads(m["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    play(steered, THINK_CALL, tools=[WEATHER])
    content, reasoning, calls, finish = stream_parts(
        client(live), model="tiny", max_tokens=200, messages=USER, tools=[WEATHER]
    )
    assert (content, reasoning, finish) == ("Checking.", "I should call the weather tool.", "tool_calls")
    assert calls[0]["arguments"] == m["tool_calls"][0]["function"]["arguments"]


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
        assert line.startswith(r.json()["id"] + " choice 0: a <tool_call> block is not JSON")
        caplog.clear()
        play(steered, bad, tools=[WEATHER])
        content, _, calls, finish = stream_parts(
            client(live), model="tiny", max_tokens=200, messages=USER, tools=[WEATHER]
        )
        assert (content, finish) == (expected, "stop")
        assert [(x["name"], x["arguments"]) for x in calls] == started
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
    whole = c.chat.completions.create(model="tiny", max_tokens=400, messages=USER, tools=tools)
    m = whole.choices[0].message
    assert m.content == "Saving it." and whole.choices[0].finish_reason == "tool_calls"
    assert [t.function.name for t in m.tool_calls] == ["save_note", "get_time"]
    assert m.tool_calls[0].function.arguments == args  # the model's text, not re-serialized

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
        assert "".join(pieces) == m.tool_calls[index].function.arguments  # byte for byte
        assert head.id == heads[index][1].id
    long_pieces = [tc.function.arguments for _, tc in call_deltas if tc.index == 0 and tc.id is None]
    assert len(long_pieces) > 10  # as the model wrote them, not one blob
    assert heads[1][0] > max(i for i, tc in call_deltas if tc.index == 0)  # the first call ended first

    play(steered, reply)  # the SDK's own accumulation agrees
    with c.chat.completions.stream(model="tiny", max_tokens=400, messages=USER, tools=tools) as s:
        arg_deltas = [e for e in s if e.type == "tool_calls.function.arguments.delta"]
        final = s.get_final_completion()
    got = [(t.function.name, t.function.arguments) for t in final.choices[0].message.tool_calls]
    assert got == [(t.function.name, t.function.arguments) for t in m.tool_calls]
    assert len([e for e in arg_deltas if e.index == 0]) > 10


def test_parallel_tool_calls_false_keeps_one(steered):
    live = steered[0]
    play(steered, TWO_CALLS, tools=[WEATHER, TIME])
    r = client(live).chat.completions.create(
        model="tiny", max_tokens=200, messages=USER, tools=[WEATHER, TIME], parallel_tool_calls=False
    )
    assert [t.function.name for t in r.choices[0].message.tool_calls] == ["get_weather"]


def test_tool_choice_none_returns_text(steered):
    live = steered[0]
    play(steered, CALL, tools=[WEATHER])
    r = client(live).chat.completions.create(
        model="tiny", max_tokens=200, messages=USER, tools=[WEATHER], tool_choice="none"
    )
    assert r.choices[0].message.tool_calls is None and CALL in r.choices[0].message.content


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
        r = client(live).chat.completions.create(
            model="tiny", max_tokens=200, messages=messages, tools=[WEATHER]
        )
        assert r.choices[0].message.content == "It is sunny, 21C." and r.choices[0].finish_reason == "stop"


# ---- Qwen v1 (ReAct) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def steered_v1(tiny_chat_model):
    """The same weights behind v1's ChatML template, which cannot render tools: the ReAct flow."""
    with steered_server(tiny_chat_model, chatml_template()) as served:
        yield served


def test_react_flow_for_models_without_tool_templates(steered_v1):
    live, llm = steered_v1[0], steered_v1[1]
    ids = chat_prompt(llm, ChatCompletionRequest(messages=USER, tools=[WEATHER]))
    text = llm.tokenizer.decode(ids)
    assert "You have access to the following APIs:\n\nget_weather: Call this tool" in text
    assert text.endswith(
        "Begin!\n\nQuestion: What's the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    )
    reply = (
        "Thought: I need the weather.\nAction: get_weather\n"
        'Action Input: {"city": "Paris", "unit": "c"}\nObservation: invented'
    )
    for stream in (False, True):
        play(steered_v1, reply)
        if stream:
            content, _, calls, finish = stream_parts(
                client(live), model="tiny", max_tokens=200, messages=USER, tools=[WEATHER]
            )
            calls = [(x["name"], json.loads(x["arguments"])) for x in calls]
        else:
            r = client(live).chat.completions.create(
                model="tiny", max_tokens=200, messages=USER, tools=[WEATHER]
            )
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
            calls = [
                (t.function.name, json.loads(t.function.arguments)) for t in r.choices[0].message.tool_calls
            ]
        assert (content, calls, finish) == (
            "I need the weather.",
            [("get_weather", {"city": "Paris", "unit": "c"})],
            "tool_calls",
        )
    play(steered_v1, "Thought: I now know the final answer\nFinal Answer: Sunny.")
    r = client(live).chat.completions.create(model="tiny", max_tokens=200, messages=USER, tools=[WEATHER])
    assert r.choices[0].message.content == "Sunny." and r.choices[0].message.tool_calls is None


def test_react_follow_up_continues_the_turn_with_the_observation(steered_v1):
    """A tool result sent back to a v1 model: the prompt is the one ReAct turn, left open after the
    observation as Qwen's openai_api.py leaves it (``...Observation: sunny\\nThought:``, no <|im_end|> and
    no second assistant turn), and the model's continuation parses into the final answer."""
    live, llm = steered_v1[0], steered_v1[1]
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": "I need the weather.",
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
    text = llm.tokenizer.decode(chat_prompt(llm, ChatCompletionRequest(messages=messages, tools=[WEATHER])))
    assert text.endswith(
        "Question: What's the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        "Thought: I need the weather.\nAction: get_weather\n"
        'Action Input: {"city": "Paris", "unit": "c"}\nObservation: sunny, 21C\nThought:'
    )
    for stream in (False, True):
        play(steered_v1, " I now know the final answer\nFinal Answer: Sunny, 21C.")
        kwargs = dict(model="tiny", max_tokens=200, messages=messages, tools=[WEATHER])
        if stream:
            content, _, calls, finish = stream_parts(client(live), **kwargs)
        else:
            r = client(live).chat.completions.create(**kwargs)
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
            calls = r.choices[0].message.tool_calls or []
        assert (content, calls, finish) == ("Sunny, 21C.", [], "stop")


def test_react_malformed_action_input_is_content(steered_v1, caplog):
    live = steered_v1[0]
    reply = "Thought: I need the weather.\nAction: get_weather\nAction Input: Paris, in celsius"
    for stream in (False, True):
        caplog.clear()
        play(steered_v1, reply + "\nObservation:")
        kwargs = dict(model="tiny", max_tokens=200, messages=USER, tools=[WEATHER])
        if stream:
            content, _, calls, finish = stream_parts(client(live), **kwargs)
        else:
            r = client(live).chat.completions.create(**kwargs)
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
            calls = r.choices[0].message.tool_calls or []
        assert (content, calls, finish) == (reply + "\n", [], "stop")  # verbatim, up to the stop word
        (line,) = [rec.getMessage() for rec in caplog.records if "Action Input" in rec.getMessage()]
        assert line.startswith("chatcmpl-") and "'get_weather' is not a JSON object" in line


def test_react_forced_calls(steered_v1):
    """tool_choice "required" and a named function on a v1 model: the grammar forces ReAct's
    ``Action: <name>\\nAction Input: <JSON>``, so the (random) model always calls a listed (the named)
    tool with arguments that validate; streamed and whole agree."""
    c = client(steered_v1[0])
    schemas = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    named = {"type": "function", "function": {"name": "get_weather"}}
    picked = []
    runs = [(named, 1)] + [("required", seed) for seed in range(8)]
    for choice, seed in runs:
        if choice == "required" and {"get_time", "get_weather"} <= set(picked[1:]):
            break
        kwargs = dict(
            model="tiny",
            messages=USER,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            temperature=1.0,
            seed=seed,
            max_tokens=60,
        )
        r = c.chat.completions.create(**kwargs)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        assert call.function.name == "get_weather" if choice is named else call.function.name in schemas
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        content, _, calls, finish = stream_parts(c, **kwargs)
        assert (content, finish) == ("", "tool_calls")
        assert [(x["name"], x["arguments"]) for x in calls] == [(call.function.name, call.function.arguments)]
        picked.append(call.function.name)
    assert set(picked[1:]) == {"get_time", "get_weather"}  # "required" lets the model choose (seeds 0..7)


# ---- Llama 3.1/3.2 (a template that renders tools its own way) --------------------------------------


@pytest.fixture(scope="module")
def steered_llama32(tmp_path_factory):
    """Meta's Llama 3.2 template renders tools, but asks for bare ``{"name", "parameters"}`` JSON replies,
    not hermes ``<tool_call>`` blocks: qwenkit parses no such reply, so the ReAct flow is used."""
    from llama_tokenizers import write_llama32_chat_model

    path = write_llama32_chat_model(tmp_path_factory.mktemp("llama32") / "m")
    with steered_server(path, end_token="<|eot_id|>") as served:
        yield served


def test_llama32_tools_use_the_react_flow(steered_llama32):
    """Before, the tools went into Llama's own JSON instructions while the reply was read for hermes
    blocks: a call came back as plain ``content`` with finish_reason "stop", the client never saw it."""
    live, llm = steered_llama32[0], steered_llama32[1]
    ids = chat_prompt(llm, ChatCompletionRequest(messages=USER, tools=[WEATHER]))
    text = llm.tokenizer.decode(ids)
    assert ids[0] == 128000 and ids.count(128000) == 1  # the template's BOS, once
    assert "You have access to the following APIs:\n\nget_weather: Call this tool" in text
    assert "Given the following functions" not in text
    assert text.endswith(
        "Begin!\n\nQuestion: What's the weather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    reply = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris", "unit": "c"}'
    for stream in (False, True):
        play(steered_llama32, reply)
        kwargs = dict(model="tiny", max_tokens=200, messages=USER, tools=[WEATHER])
        if stream:
            content, _, calls, finish = stream_parts(client(live), **kwargs)
            calls = [(x["name"], json.loads(x["arguments"])) for x in calls]
        else:
            r = client(live).chat.completions.create(**kwargs)
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
            calls = [
                (t.function.name, json.loads(t.function.arguments)) for t in r.choices[0].message.tool_calls
            ]
            assert r.usage.prompt_tokens == len(ids)
        assert (content, calls, finish) == (
            "I need the weather.",
            [("get_weather", {"city": "Paris", "unit": "c"})],
            "tool_calls",
        )
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": "I need the weather.",
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
    text = llm.tokenizer.decode(chat_prompt(llm, ChatCompletionRequest(messages=messages, tools=[WEATHER])))
    assert text.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\nThought: I need the weather.\nAction: get_weather\n"
        'Action Input: {"city": "Paris", "unit": "c"}\nObservation: sunny, 21C\nThought:'
    )
    play(steered_llama32, " I now know the final answer\nFinal Answer: Sunny, 21C.")
    r = client(live).chat.completions.create(model="tiny", max_tokens=200, messages=messages, tools=[WEATHER])
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls, r.choices[0].finish_reason) == (
        "Sunny, 21C.",
        None,
        "stop",
    )


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
    r = c.chat.completions.create(**kwargs)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    content, _, calls, finish = stream_parts(c, **kwargs)
    assert finish == "tool_calls" and content == ""
    assert [(x["name"], x["arguments"]) for x in calls] == [(call.function.name, call.function.arguments)]


def test_required_picks_a_listed_tool(server):
    r = client(server).chat.completions.create(
        model="tiny",
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    (call,) = r.choices[0].message.tool_calls
    fn = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
    assert r.choices[0].finish_reason == "tool_calls"


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
    r = client(server).chat.completions.create(
        model="tiny",
        messages=USER,
        temperature=1.0,
        seed=11,
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}},
        extra_body=NO_THINKING,
    )
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", text
    assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)), text  # compact: no free whitespace
    jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_response_format_json_object(server):
    r = post(
        server.url + "/v1/chat/completions",
        json={
            "messages": USER,
            "temperature": 0,
            "max_tokens": 40,
            "response_format": {"type": "json_object"},
            **NO_THINKING,
        },
    ).json()
    text = r["choices"][0]["message"]["content"]
    assert text.startswith("{") and (
        r["choices"][0]["finish_reason"] == "length" or isinstance(json.loads(text), dict)
    )


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
        body = {"model": "tiny", "messages": USER, "max_tokens": 100, **fields}
        if stream:
            content, reasoning, calls, finish = stream_parts(client(live), **body)
            calls = [(x["name"], x["arguments"]) for x in calls]
        else:
            r = post(live.url + "/v1/chat/completions", json=body).json()["choices"][0]
            content, reasoning = r["message"]["content"], r["message"]["reasoning_content"]
            finish = r["finish_reason"]
            calls = [
                (t["function"]["name"], t["function"]["arguments"]) for t in r["message"]["tool_calls"] or []
            ]
        if "tools" in fields:
            assert (reasoning, calls, finish) == ("Paris, then.", [("get_weather", args)], "tool_calls")
            assert not content
        else:
            assert (reasoning, content, calls, finish) == ("A city.", '{"city":"Paris"}', [], "stop")


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
        body = {"model": "tiny", "messages": USER, "max_tokens": 100, "tools": [WEATHER]}
        body["tool_choice"] = "required"
        if stream:
            content, reasoning, calls, finish = stream_parts(client(live), **body, extra_body=fields)
            calls, reasoning = [(x["name"], x["arguments"]) for x in calls], reasoning or None
        else:
            r = post(live.url + "/v1/chat/completions", json=body | fields).json()["choices"][0]
            content, reasoning = r["message"]["content"], r["message"]["reasoning_content"]
            finish = r["finish_reason"]
            calls = [(t["function"]["name"], t["function"]["arguments"]) for t in r["message"]["tool_calls"]]
        assert (reasoning, calls, finish) == (want_reasoning, [("get_weather", args)], "tool_calls"), content
        assert not content
