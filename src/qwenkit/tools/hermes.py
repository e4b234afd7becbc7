"""Hermes-style tool calls (Qwen2.5, Qwen3) and Qwen3's reasoning, parsed from streamed text.

Calls are ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks; reasoning is a
leading ``<think>...</think>`` block.

One streaming state machine serves both modes (``parse_hermes`` feeds the whole text at once), so a
streamed reply and the same reply parsed whole always agree. Markup never reaches ``content``: text that
might be the start of a tag is held back until it is decided. A call is emitted once its block closes
(or the output ends with a complete JSON body) and its JSON parsed; a block whose JSON is malformed is
returned verbatim as content, with a warning, exactly as in the whole-text parse. Whitespace around the
markup (the newlines the templates put between blocks) is not content.
"""

from __future__ import annotations

import json
import logging

from qwenkit.tools.calls import Event, ParsedMessage, ToolCall, arguments_json, collect

log = logging.getLogger(__name__)

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _held(text: str, tag: str | None) -> int:
    """How much of the end of ``text`` to hold: a partial tag and the whitespace before it (the
    whitespace around markup is dropped). With no tag to watch for, nothing is held."""
    if tag is None:
        return 0
    k = len(text) - _partial_suffix(text, tag)
    while k > 0 and text[k - 1].isspace():
        k -= 1
    return len(text) - k


def parse_call_body(body: str) -> ToolCall | None:
    """The JSON between the tags -> a ToolCall, or None if it is not ``{"name": str, "arguments": {...}}``."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = arguments_json(obj.get("arguments", obj.get("parameters", {})))
    return None if arguments is None else ToolCall(obj["name"], arguments)


class HermesParser:
    """Feed text deltas, get Events. ``tools``: parse ``<tool_call>`` blocks (off: they stay content,
    verbatim). ``reasoning``: split a leading ``<think>`` block off as reasoning; ``in_reasoning``: the
    prompt already opened it (the template ended with ``<think>\\n``)."""

    def __init__(self, *, tools: bool = True, reasoning: bool = False, in_reasoning: bool = False) -> None:
        self.tools, self.reasoning = tools, reasoning
        self.mode = "reasoning" if in_reasoning else "content"
        self.at_start = True  # nothing decided yet: a <think> may still open
        self.strip_leading = in_reasoning  # drop whitespace after markup
        self.buf = ""
        self.calls = 0
        self.warnings: list[str] = []

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        events: list[Event] = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        while self._step(events, final=True):
            pass
        buf, self.buf = self.buf, ""
        if self.mode == "call":
            call = parse_call_body(buf)
            if call is not None:
                self._call(events, call)
            else:
                self._malformed(events, CALL_OPEN + buf)
        elif self.mode == "reasoning":
            self._emit(events, "reasoning", buf.rstrip())
        elif buf and not (self.calls and buf.isspace()):
            self._emit(events, "content", buf)
        return events

    # ---- the state machine ------------------------------------------------------------------------

    def _step(self, events: list[Event], final: bool) -> bool:
        """Consume what can be decided now; True if the state changed and another pass may help."""
        if self.strip_leading:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return False
            self.strip_leading = False
        if self.mode == "reasoning":
            return self._reasoning(events, final)
        if self.mode == "call":
            end = self.buf.find(CALL_CLOSE)
            if end < 0:
                return False
            body, self.buf = self.buf[:end], self.buf[end + len(CALL_CLOSE) :]
            call = parse_call_body(body)
            if call is not None:
                self._call(events, call)
            else:
                self._malformed(events, CALL_OPEN + body + CALL_CLOSE)
            self.mode, self.strip_leading = "content", True
            return True
        return self._content(events, final)

    def _reasoning(self, events: list[Event], final: bool) -> bool:
        end = self.buf.find(THINK_CLOSE)
        if end >= 0:
            self._emit(events, "reasoning", self.buf[:end].rstrip())
            self.buf = self.buf[end + len(THINK_CLOSE) :]
            self.mode, self.strip_leading = "content", True
            return True
        if not final:
            keep = _held(self.buf, THINK_CLOSE)
            self._emit(events, "reasoning", self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep :]
        return False

    def _content(self, events: list[Event], final: bool) -> bool:
        if self.at_start and self.reasoning:
            if self.buf.startswith(THINK_OPEN):
                self.buf, self.at_start = self.buf[len(THINK_OPEN) :], False
                self.mode, self.strip_leading = "reasoning", True
                return True
            if THINK_OPEN.startswith(self.buf) and not final:
                return False  # could still become <think>
        self.at_start = False
        start = self.buf.find(CALL_OPEN) if self.tools else -1
        if start >= 0:
            self._emit(events, "content", self.buf[:start].rstrip())
            self.buf, self.mode = self.buf[start + len(CALL_OPEN) :], "call"
            return True
        if not final:
            keep = _held(self.buf, CALL_OPEN if self.tools else None)
            self._emit(events, "content", self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep :]
        return False

    def _emit(self, events: list[Event], kind: str, text: str) -> None:
        if text:
            events.append(Event(kind, text))  # type: ignore[arg-type]

    def _call(self, events: list[Event], call: ToolCall) -> None:
        self.calls += 1
        events.append(Event("tool_call", call=call))

    def _malformed(self, events: list[Event], raw: str) -> None:
        warning = (
            "a <tool_call> block is not JSON with a name and object arguments; "
            f"returned as text: {raw[:200]!r}"
        )
        log.warning(warning)
        self.warnings.append(warning)
        self._emit(events, "content", raw)


def parse_hermes(text: str, **options: bool) -> ParsedMessage:
    """Parse a whole reply (the same machine as streaming, fed at once)."""
    parser = HermesParser(**options)
    events = parser.feed(text) + parser.finish()
    return collect(events, parser.warnings)
