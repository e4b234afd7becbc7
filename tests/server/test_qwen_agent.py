"""Qwen-Agent (a client this project did not write) against the live server, in its three
function-calling modes. The model is steered to the reply a trained Qwen would give (tests/tools/scripted.py);
everything else is Qwen-Agent's own prompt building, request, stream handling and parsing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import play, steered_server

pytest.importorskip("qwen_agent")  # the `test` extra installs it (with soundfile, which it imports)

from qwen_agent.llm import get_chat_model

FUNCTIONS = [
    {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    with steered_server(tiny_chat_model) as served:
        yield served


def agent_llm(live, **cfg):
    return get_chat_model(
        {
            "model": "tiny",
            "model_server": live.url + "/v1",
            "api_key": "EMPTY",
            "generate_cfg": {"max_tokens": 200, "max_retries": 0, **cfg},
        }
    )


def last_turn(llm, messages):
    responses = list(llm.chat(messages=messages, functions=FUNCTIONS, stream=True))
    return responses[-1]


def run_turns(steered, llm, call_reply: str, final_reply: str) -> None:
    play(steered, call_reply)
    out = last_turn(llm, QUESTION)
    calls = [m for m in out if m.get("function_call")]  # qwen-agent answers dicts with dicts
    assert len(calls) == 1, out
    assert calls[0]["function_call"]["name"] == "get_weather"
    assert json.loads(calls[0]["function_call"]["arguments"]) == {"city": "Paris"}
    result = {"role": "function", "name": "get_weather", "content": "sunny, 21C"}
    if (calls[0].get("extra") or {}).get("function_id"):
        result["extra"] = {"function_id": calls[0]["extra"]["function_id"]}
    play(steered, final_reply)
    final = last_turn(llm, [*QUESTION, *out, result])
    assert final[-1]["content"] == final_reply and not final[-1].get("function_call")


def test_nous_mode_parses_verbatim_tool_call_text(steered):
    """Default (nous) mode sends no `tools`: the server must return the <tool_call> text untouched."""
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    run_turns(steered, agent_llm(steered[0]), reply, "It is sunny in Paris.")


def test_qwen_mode_stop_words(steered):
    """`qwen` mode sends stop words ✿RESULT✿/✿RETURN✿; the server must cut the reply there."""
    reply = '✿FUNCTION✿: get_weather\n✿ARGS✿: {"city": "Paris"}\n✿RESULT✿: made up by the model'
    run_turns(steered, agent_llm(steered[0], fncall_prompt_type="qwen"), reply, "It is sunny in Paris.")


def test_raw_api_mode_tool_calls_merged_by_id(steered):
    """Raw-API mode sends `tools`, merges streamed calls by id, and answers with a tool message
    carrying `id` (not `tool_call_id`)."""
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    run_turns(steered, agent_llm(steered[0], use_raw_api=True), reply, "It is sunny in Paris.")
