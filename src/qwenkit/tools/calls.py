"""A parsed tool call and the events a streaming parser emits; shared by every tool-call format."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from qwenkit.errors import QwenkitError


class ToolSpecError(QwenkitError, ValueError):
    """Tool definitions that are not OpenAI's shape; the message names the first bad one."""


def offered_functions(tools: Any) -> list[dict[str, Any]]:
    """The ``function`` objects of OpenAI tool definitions (``[{"type": "function", "function": {...}}]``),
    checked as the server and the CLI take them."""
    if not isinstance(tools, list) or not tools:
        empty = isinstance(tools, list)
        raise ToolSpecError("`tools` must not be an empty array" if empty else "`tools` must be an array")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise ToolSpecError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolSpecError(f"tools[{i}].function.name must be a non-empty string")
        # two functions of one name: a call to it (or a tool_choice naming it) could mean either
        first = next((j for j, seen in enumerate(functions) if seen["name"] == fn["name"]), None)
        if first is not None:
            raise ToolSpecError(f"tools[{i}].function.name {fn['name']!r} is also tools[{first}]'s")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolSpecError(f"tools[{i}].function.parameters must be a JSON schema object")
        functions.append(fn)
    return functions


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it
    id: str = ""
    # The arguments as the model wrote them where they were not JSON and the tool's own reader read them
    # (Qwen v1's fenced code as the interpreter's ReAct Action Input): the history shows them so again.
    text: str | None = None

    def __post_init__(self) -> None:
        self.id = self.id or new_call_id()

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


EventKind = Literal["content", "reasoning", "call_start", "call_args", "tool_call", "call_broken"]


@dataclass
class Event:
    """One piece of parsed output, in the order a stream sends it.

    ``content`` / ``reasoning``: text. A tool call is ``call_start`` (its id and name), then
    ``call_args`` pieces (``text``: the next characters of its arguments, as the model writes them), then
    ``tool_call`` (complete: the arguments are the pieces joined) or ``call_broken`` (its JSON went bad
    after it started: it is no call, and its raw text follows as content)."""

    kind: EventKind
    text: str = ""
    call: ToolCall | None = None


def call_events(call: ToolCall) -> list[Event]:
    """A call known whole at once, as the events of a streamed one (its arguments in one piece)."""
    return [
        Event("call_start", call=call),
        Event("call_args", call.arguments, call),
        Event("tool_call", call=call),
    ]


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
        [e.call for e in events if e.kind == "tool_call" and e.call is not None],
        list(warnings),
    )


def arguments_json(value: Any) -> str | None:
    """Arguments as a JSON object text: a text holding an object is kept as the model wrote it (its
    spacing, not re-serialized), an object is encoded, and null (a function without parameters, called
    so) is ``{}``, as a history sent back reads it. None if none of these."""
    if value is None:
        return "{}"
    if isinstance(value, str):
        try:
            return value.strip() if isinstance(json.loads(value), dict) else None
        except ValueError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


class JsonExtent:
    """Where the JSON object or array at ``text[start]`` ends, found as the text arrives (strings tracked,
    so brackets inside them don't count): how the streaming parsers send a call's arguments piece by piece
    and tell where its JSON closes."""

    def __init__(self, start: int) -> None:
        self.start = self.scanned = start
        self.end: int | None = None  # just past the closing bracket, once seen
        self.depth, self.in_string, self.escaped = 0, False, False

    def scan(self, text: str, tag: str | None = None, final: bool = True) -> int | None:
        """Advance over ``text``. With ``tag`` (a closing markup tag): returns where it stands outside a
        string before the value closes (the value is then malformed), and stops short of text that could
        still become it unless ``final``; else None."""
        i = self.scanned
        while i < len(text) and self.end is None:
            c = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = i + 1
            elif tag is not None and c == tag[0]:
                if text.startswith(tag, i):
                    self.scanned = i
                    return i
                if not final and tag.startswith(text[i:]):
                    break  # maybe the tag: not taken as the value's until decided
            i += 1
        self.scanned = i
        return None
