"""What the agent tests share: queueing the steered model's replies (the ``steered`` fixture, conftest.py),
a tool call as Qwen writes it, a tool to offer and the settings to sample with."""

from __future__ import annotations

import io

from qwenkit.engine import SamplingParams
from qwenkit.tools.agent import Tool


def queue(steered, *replies: str) -> None:
    llm, pending = steered
    pending.extend(llm.tokenizer.encode(r, allow_special=True) for r in replies)


def call(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


ADD = Tool(
    "add",
    lambda a, b: a + b,
    "Add two integers",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)


PARAMS = SamplingParams(max_tokens=120, temperature=0)


def chatml_without_tools(template: str) -> str:
    """The model's template with its tools branch cut, so the agent takes Qwen v1's ReAct path."""
    return template.replace("tools", "offered")  # undefined in the template: false


class Writes(io.StringIO):
    """Standard output that keeps each write, to see what was shown when."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[str] = []

    def write(self, text: str) -> int:
        self.pieces.append(text)
        return super().write(text)
