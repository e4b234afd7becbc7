"""Requests and readers the tool-calling tests share: the offered tools, the user turn, the calls a steered
model writes, and the openai client's view of a reply, whole or streamed."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import openai

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

# the weather call sent back with its result: the follow-up turn every template's test renders
WEATHER_FOLLOW_UP = [
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


def post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url, timeout=120, **kwargs)


def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)


@dataclass
class Reply:
    """One chat choice as a client reads it, whole or streamed: ``content`` is None only in a whole reply
    with no text, ``reasoning`` None when there was none, ``calls`` ``{"id", "name", "arguments"}`` each,
    in order."""

    id: str
    content: str | None
    reasoning: str | None
    calls: list[dict]
    finish: str | None
    usage: openai.types.CompletionUsage | None

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(name, arguments as sent) per call."""
        return [(x["name"], x["arguments"]) for x in self.calls]

    @property
    def parsed(self) -> list[tuple[str, dict]]:
        """(name, arguments parsed) per call."""
        return [(x["name"], json.loads(x["arguments"])) for x in self.calls]


def chat_reply(c: openai.OpenAI, stream: bool, **kwargs) -> Reply:
    """Ask the chat route through the openai SDK and read the first choice, whole or streamed; checks what
    either form promises (one role delta, each call's id and name once, type "function", no empty list)."""
    if not stream:
        r = c.chat.completions.create(**kwargs)
        m = r.choices[0].message
        assert m.tool_calls is None or m.tool_calls, "an empty tool_calls list"
        assert all(t.type == "function" for t in m.tool_calls or [])
        calls = [
            {"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
            for t in m.tool_calls or []
        ]
        reasoning = (m.model_extra or {}).get("reasoning_content")
        return Reply(r.id, m.content, reasoning, calls, r.choices[0].finish_reason, r.usage)
    content, reasoning, calls, finish, roles, usage, ids = "", "", {}, None, 0, None, set()
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        ids.add(chunk.id)
        usage = chunk.usage or usage
        if not chunk.choices:  # the usage chunk
            continue
        d = chunk.choices[0].delta
        roles += d.role is not None
        content += d.content or ""
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        for tc in d.tool_calls or []:
            assert tc.function is not None  # the .stream() helper asserts this on every delta
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert entry["id"] is None, "id sent twice"
                assert tc.type == "function"
                entry["id"] = tc.id
            if tc.function.name:
                assert entry["name"] == "", "name sent twice"
                entry["name"] = tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert roles == 1 and len(ids) == 1
    return Reply(ids.pop(), content, reasoning or None, [calls[i] for i in sorted(calls)], finish, usage)
