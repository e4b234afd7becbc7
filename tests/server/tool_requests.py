"""Requests and readers the tool-calling tests share: the offered tools, the user turn, the calls a steered
model writes, and the openai client's view of a streamed reply."""

from __future__ import annotations

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
