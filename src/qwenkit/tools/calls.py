"""A parsed tool call and the events a streaming parser emits; shared by every tool-call format."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or new_call_id()

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class Event:
    """One piece of parsed output: text for ``content`` or ``reasoning_content``, or a whole tool call."""

    kind: Literal["content", "reasoning", "tool_call"]
    text: str = ""
    call: ToolCall | None = None


@dataclass
class ParsedMessage:
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    warnings: list[str]


def collect(events: list[Event], warnings: list[str]) -> ParsedMessage:
    return ParsedMessage(
        "".join(e.text for e in events if e.kind == "content"),
        "".join(e.text for e in events if e.kind == "reasoning"),
        [e.call for e in events if e.call is not None],
        list(warnings),
    )


def arguments_json(value: Any) -> str | None:
    """Arguments as a JSON object text; a JSON string holding an object is unwrapped. None if neither."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None
