"""Reasoning a client sends back in an assistant message reaches the chat template, under whichever name
the client uses: ``reasoning_content`` (DeepSeek's and older vLLM's), ``reasoning`` (vLLM's since it
deprecated ``reasoning_content``) or ``thinking`` (transformers' own). Qwen3's template shows it again for
the assistant turns of the agent turn in progress, so dropping it changed the prompt the model sees."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

from factories import qwen3_tokenizer_dir

from qwenkit.server.schemas import ChatCompletionRequest
from qwenkit.tokenizer import load_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def agent_turn(field: str) -> list[dict]:
    """A user question, the assistant's reasoning and call (content null), and the call's result."""
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, field: "I should call the tool.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer(qwen3_tokenizer_dir())


@pytest.mark.parametrize("field", ["reasoning", "thinking"])
def test_reasoning_under_any_name_renders_as_reasoning_content(qwen3, field):
    def prompt(name: str) -> list[int]:
        request = ChatCompletionRequest(messages=agent_turn(name), tools=[WEATHER])
        messages = [m.as_template_message() for m in request.messages]
        return qwen3.apply_chat_template(messages, tools=[WEATHER], add_generation_prompt=True)

    expected = prompt("reasoning_content")
    assert "<think>\nI should call the tool.\n</think>\n\n<tool_call>" in qwen3.decode(expected)
    assert prompt(field) == expected


def test_reasoning_content_wins_over_the_other_names():
    message = {"role": "assistant", "content": "ok", "reasoning_content": "kept", "reasoning": "other"}
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "q"}, message])
    assert request.messages[1].as_template_message()["reasoning_content"] == "kept"
