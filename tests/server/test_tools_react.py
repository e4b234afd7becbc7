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
        whole = chat_reply(c, False, **kwargs)
        ((name, arguments),) = whole.pairs
        assert whole.finish == "tool_calls" and whole.content is None
        assert name == "get_weather" if choice is named else name in schemas
        jsonschema.validate(json.loads(arguments), schemas[name])
        streamed = chat_reply(c, True, **kwargs)
        assert (streamed.content, streamed.finish) == ("", "tool_calls")
        assert streamed.pairs == whole.pairs
        picked.append(name)
    assert set(picked[1:]) == {"get_time", "get_weather"}  # "required" lets the model choose (seeds 0..7)
