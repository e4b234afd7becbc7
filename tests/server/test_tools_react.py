"""Tool calling on the chat route for templates that cannot render tools, through Qwen v1's ReAct flow: Qwen
v1's ChatML template. Llama 3.1/3.2's JSON calls: test_tools_llama3.py.

Real clients: the openai SDK."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import play, steered_server
from tool_requests import (
    TIME,
    USER,
    WEATHER,
    WEATHER_FOLLOW_UP,
    chat_reply,
    client,
    post,
)

from qwenkit.server.completions import chat_prompt
from qwenkit.server.schemas import ChatCompletionRequest
from qwenkit.tokenizer.chat_template import chatml_template

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
    kwargs = dict(model="tiny", max_tokens=200, messages=USER, tools=[WEATHER])
    for stream in (False, True):
        play(steered_v1, reply)
        r = chat_reply(client(live), stream, **kwargs)
        assert (r.content, r.parsed, r.finish) == (
            "I need the weather.",
            [("get_weather", {"city": "Paris", "unit": "c"})],
            "tool_calls",
        )
    play(steered_v1, "Thought: I now know the final answer\nFinal Answer: Sunny.")
    r = chat_reply(client(live), False, **kwargs)
    assert (r.content, r.calls) == ("Sunny.", [])


def test_react_follow_up_continues_the_turn_with_the_observation(steered_v1):
    """A tool result sent back to a v1 model: the prompt is the one ReAct turn, left open after the
    observation as Qwen's openai_api.py leaves it (``...Observation: sunny\\nThought:``, no <|im_end|> and
    no second assistant turn), and the model's continuation parses into the final answer."""
    live, llm = steered_v1[0], steered_v1[1]
    messages = [*USER, *WEATHER_FOLLOW_UP]
    text = llm.tokenizer.decode(chat_prompt(llm, ChatCompletionRequest(messages=messages, tools=[WEATHER])))
    assert text.endswith(
        "Question: What's the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        "Thought: I need the weather.\nAction: get_weather\n"
        'Action Input: {"city": "Paris", "unit": "c"}\nObservation: sunny, 21C\nThought:'
    )
    for stream in (False, True):
        play(steered_v1, " I now know the final answer\nFinal Answer: Sunny, 21C.")
        r = chat_reply(client(live), stream, model="tiny", max_tokens=200, messages=messages, tools=[WEATHER])
        assert (r.content, r.calls, r.finish) == ("Sunny, 21C.", [], "stop")


def test_react_malformed_action_input_is_content(steered_v1, caplog):
    live = steered_v1[0]
    reply = "Thought: I need the weather.\nAction: get_weather\nAction Input: Paris, in celsius"
    for stream in (False, True):
        caplog.clear()
        play(steered_v1, reply + "\nObservation:")
        r = chat_reply(client(live), stream, model="tiny", max_tokens=200, messages=USER, tools=[WEATHER])
        assert (r.content, r.calls, r.finish) == (reply + "\n", [], "stop")  # verbatim, up to the stop word
        (line,) = [rec.getMessage() for rec in caplog.records if "Action Input" in rec.getMessage()]
        request_id, completion_id, problem = line.split(" ", 2)  # the log names the request both ways
        assert request_id.startswith("req_") and completion_id == r.id
        assert problem.startswith("choice 0: the Action Input of 'get_weather' is not a JSON object")


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
        whole = chat_reply(c, False, **kwargs)
        ((name, arguments),) = whole.pairs
        finish = "stop" if choice is named else "tool_calls"  # OpenAI's for a named function
        assert whole.finish == finish and whole.content is None
        assert name == "get_weather" if choice is named else name in schemas
        jsonschema.validate(json.loads(arguments), schemas[name])
        streamed = chat_reply(c, True, **kwargs)
        assert (streamed.content, streamed.finish) == ("", finish)
        assert streamed.pairs == whole.pairs
        picked.append(name)
    assert set(picked[1:]) == {"get_time", "get_weather"}  # "required" lets the model choose (seeds 0..7)


# ---- calls sent back, on either template style ---------------------------------------------------


def _sent_back(call: dict) -> list[dict]:
    turn = {"role": "assistant", "content": None, "tool_calls": [call]}
    return [*USER, turn, {"role": "tool", "tool_call_id": "c1", "content": "22 C"}]


NAMELESS = "messages[1].tool_calls[0].function must be an object with the function's name"


@pytest.mark.parametrize(
    ("template", "function", "words"),
    [
        *[(t, None, NAMELESS) for t in ("v1", "qwen3")],
        *[(t, {"arguments": "{}"}, NAMELESS) for t in ("v1", "qwen3")],
        *[(t, {"name": 5, "arguments": "{}"}, NAMELESS) for t in ("v1", "qwen3")],
        # ReAct renders text arguments as written (a tool's reader took them): only JSON templates refuse
        (
            "qwen3",
            {"name": "get_weather", "arguments": 5},
            "messages[1].tool_calls[0].function.arguments must be a JSON object, got 5",
        ),
    ],
)
def test_a_call_sent_back_without_a_name_or_object_arguments_is_a_400(
    steered_v1, server, template, function, words
):
    """A call the client sends back is rendered for the model to read as its own earlier call: one with no
    name was rendered nameless on v1's ReAct prompt (``Action: ``), or failed with the template's
    TypeError or 'NoneType' words, never naming the call; arguments that are a number were rendered as
    they are on Qwen3's template."""
    call = {"id": "c1", "type": "function"} | ({} if function is None else {"function": function})
    if function is None and template == "v1":
        call["function"] = None  # an explicit null: `.get` on it was the error's words
    live = steered_v1[0] if template == "v1" else server
    r = post(live.url + "/v1/chat/completions", json={"messages": _sent_back(call), "tools": [WEATHER]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and err["message"].startswith(words), err


@pytest.mark.parametrize("template", ["v1", "qwen3"])
def test_a_call_sent_back_with_no_arguments_renders_as_empty_ones(steered_v1, chat_llm, template):
    """Arguments left out or null are no arguments, as a blank string is: the call renders with ``{}``
    (Qwen3's template wrote ``null``, or failed on the missing key; v1's ReAct prompt wrote ``null``)."""
    llm = steered_v1[1] if template == "v1" else chat_llm

    def prompt(function: dict) -> list[int]:
        call = {"id": "c1", "type": "function", "function": function}
        return chat_prompt(llm, ChatCompletionRequest(messages=_sent_back(call), tools=[TIME]))

    empty = prompt({"name": "get_time", "arguments": "{}"})
    assert prompt({"name": "get_time"}) == empty
    assert prompt({"name": "get_time", "arguments": None}) == empty


ANSWER = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]},
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tools_with_a_response_format_may_still_call(steered_v1, stream):
    """tool_choice "auto" with a response format: the reply is one ReAct ``Action`` or the format's
    JSON, as on hermes templates (the format alone used to be enforced, so no tool could be called)."""
    live = steered_v1[0]
    kwargs = dict(model="tiny", max_tokens=100, messages=USER, tools=[WEATHER, TIME], response_format=ANSWER)
    play(steered_v1, 'Action: get_weather\nAction Input: {"city":"Paris","unit":"c"}')
    r = chat_reply(client(live), stream, **kwargs)
    assert (r.pairs, r.finish) == ([("get_weather", '{"city":"Paris","unit":"c"}')], "tool_calls"), r
    assert not r.content
    play(steered_v1, '{"answer":"sunny"}')
    r = chat_reply(client(live), stream, **kwargs)
    assert (r.content, r.pairs, r.finish) == ('{"answer":"sunny"}', [], "stop")
    play(steered_v1, "It is sunny.")  # neither: the grammar holds the reply to one or the other
    r = chat_reply(client(live), stream, **kwargs)
    assert not (r.content or "").startswith("It is"), r
