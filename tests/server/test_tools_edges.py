"""Tool calling at its edges, on a hermes template (steered replies): arguments the model wrote as a JSON
string, ``response_format`` beside ``tools``, calls cut off by ``max_tokens`` and malformed blocks, each
read the same whole, streamed and on the Responses route.

Real clients: the openai SDK (chat, whole and streamed) and httpx (the Responses route's items and
events)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import play, steered_server
from tool_requests import TIME, USER, WEATHER, chat_reply, client, post


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    with steered_server(tiny_chat_model) as served:
        yield served


def warnings(caplog) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if "<tool_call> block" in rec.getMessage()]


def responses_tools() -> list[dict]:
    return [{"type": "function", **tool["function"]} for tool in (WEATHER, TIME)]


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


# ---- response_format beside tools ----------------------------------------------------------------

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
COMPACT_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris","unit":"c"}}\n</tool_call>'
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt", [JSON_SCHEMA, {"type": "json_object"}])
def test_auto_tools_with_a_response_format_may_still_call(steered, stream, fmt):
    """tool_choice "auto" with a response format: the model either calls a tool or answers in the
    format, as OpenAI's do (an agent with an output type calls its tools first). The format alone used
    to be enforced, so the call the model chose was masked away and no tool could ever be called."""
    live = steered[0]
    kwargs = dict(model="tiny", max_tokens=100, messages=USER, tools=[WEATHER, TIME], response_format=fmt)
    play(steered, COMPACT_CALL)
    r = chat_reply(client(live), stream, **kwargs, extra_body=NO_THINKING)
    assert (r.pairs, r.finish) == ([("get_weather", '{"city":"Paris","unit":"c"}')], "tool_calls"), r
    assert not r.content
    play(steered, '{"answer":"sunny"}')
    r = chat_reply(client(live), stream, **kwargs, extra_body=NO_THINKING)
    assert (r.content, r.pairs, r.finish) == ('{"answer":"sunny"}', [], "stop")
    play(steered, "It is sunny.")  # neither: the grammar holds the reply to one or the other
    r = chat_reply(client(live), stream, **kwargs, extra_body=NO_THINKING)
    assert not (r.content or "").startswith("It is"), r


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_beside_a_response_format(steered, choice):
    """A forced call is the reply, as OpenAI's: the response format has no text to shape. The format is
    still checked as it is without tools: one no JSON matches is a 400 naming it (it was ignored)."""
    live = steered[0]
    body = {"messages": USER, "tools": [WEATHER, TIME], "tool_choice": choice, "max_tokens": 100}
    play(steered, COMPACT_CALL)
    r = chat_reply(client(live), False, model="tiny", **{**body, "response_format": JSON_SCHEMA})
    assert r.pairs == [("get_weather", '{"city":"Paris","unit":"c"}')] and not r.content
    assert r.finish == ("tool_calls" if choice == "required" else "stop")
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}
    r = post(live.url + "/v1/chat/completions", json={**body, "response_format": bad})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format"
    assert (
        err["message"]
        == "the schema cannot be used for constrained decoding: no JSON value matches the schema"
    )
