"""Hermes-style tool calls (Qwen2.5, Qwen3) and Qwen3's reasoning, parsed from streamed text.

Calls are ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks; reasoning is a
leading ``<think>...</think>`` block, split off first by ``qwenkit.tokenizer.thinking`` (the chat API's
split too).

One streaming state machine serves both modes (``parse_hermes`` feeds the whole text at once), so a
streamed reply and the same reply parsed whole always agree. Markup never reaches ``content``: text that
might be the start of a tag is held back until it is decided. A call starts (``call_start``) once its
block opens with ``{"name": "...", "arguments": {"`` (or ``{}``); its arguments then go out as the model
writes them, character for character (``call_args``), and the call completes when its block closes and
the whole JSON parses. A block that never shows that opening is held and parsed whole at its end. A
block whose JSON is malformed is returned verbatim as content, with a warning; if it had already
started, a ``call_broken`` event comes first (a stream cannot take back what it sent). Whitespace around
the markup (the newlines the templates put between blocks) is not content.
"""

from __future__ import annotations

import json
import re

from qwenkit.tokenizer.thinking import ThinkSplitter, held_back
from qwenkit.tools.calls import (
    Event,
    JsonExtent,
    ParsedMessage,
    ToolCall,
    arguments_json,
    call_events,
    collect,
)

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# The opening that starts a call before its block closes: the name, then an arguments object that
# begins like JSON (a key or ``}``), so a Python-style ``{'a': 1}`` is not started.
CALL_HEADER = re.compile(
    r'\s*\{\s*"name"\s*:\s*(?P<name>"(?:[^"\\\n]|\\.)+")\s*,\s*"(?P<key>arguments|parameters)"\s*:\s*'
    r'(?P<args>\{)(?=\s*["}])'
)


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


class _OpenCall(JsonExtent):
    """A started call: its arguments' extent in the block's text (they start at ``start``), and how far
    they have been sent."""

    def __init__(self, call: ToolCall, key: str, start: int) -> None:
        super().__init__(start)
        self.call, self.key, self.sent = call, key, start

    def piece(self, body: str) -> str:
        """The arguments text scanned since the last piece."""
        upto = self.end if self.end is not None else self.scanned
        text, self.sent = body[self.sent : upto], upto
        return text


class HermesParser:
    """Feed text deltas, get Events. ``tools``: parse ``<tool_call>`` blocks (off: they stay content,
    verbatim). ``reasoning``: split a leading ``<think>`` block off as reasoning; ``in_reasoning``: the
    prompt already opened it (the template ended with ``<think>\\n``); ``continued``: the reply continues a
    prefilled final message (``ThinkSplitter``'s)."""

    def __init__(
        self,
        *,
        tools: bool = True,
        reasoning: bool = False,
        in_reasoning: bool = False,
        continued: bool = False,
    ) -> None:
        self.tools, self.reasoning = tools, reasoning
        # the leading <think> block is split off first; the rest is content and calls
        self.thinking = (
            ThinkSplitter(opened=in_reasoning, continued=continued) if reasoning or in_reasoning else None
        )
        self.mode = "content"
        self.strip_leading = False  # drop whitespace after markup
        self.buf = ""
        self.body = ""  # the open <tool_call> block's text so far
        self.open: _OpenCall | None = None
        self.calls = 0
        self.warnings: list[str] = []

    def feed(self, text: str) -> list[Event]:
        events = self._think(self.thinking.feed(text) if self.thinking else ("", text))
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[Event]:
        events = self._think(self.thinking.finish() if self.thinking else ("", ""))
        while self._step(events, final=True):
            pass
        if self.mode == "call":  # the output ended inside a block: complete if its JSON is whole
            self._close_block(events, self.body, closed=False)
        elif self.buf and not (self.calls and self.buf.isspace()):
            self._emit(events, "content", self.buf)
        self.buf = ""
        return events

    def _think(self, split: tuple[str, str]) -> list[Event]:
        """The splitter's reasoning as an event; its content joins what the calls machine reads."""
        reasoning, content = split
        self.buf += content
        return [Event("reasoning", reasoning)] if reasoning else []

    # ---- the state machine ------------------------------------------------------------------------

    def _step(self, events: list[Event], final: bool) -> bool:
        """Consume what can be decided now; True if the state changed and another pass may help."""
        if self.strip_leading:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return False
            self.strip_leading = False
        if self.mode == "call":
            return self._call_step(events, final)
        return self._content(events, final)

    def _call_step(self, events: list[Event], final: bool) -> bool:
        """Inside a block: start the call once its opening shows, send its arguments as they come, and
        close the block at the first ``</tool_call>`` outside the arguments' strings."""
        self.body, self.buf = self.body + self.buf, ""
        if self.open is None:
            header = CALL_HEADER.match(self.body)
            if header is not None:
                self._start(events, header)
        if self.open is not None:
            end = self.open.scan(self.body, CALL_CLOSE, final)
            piece = self.open.piece(self.body)
            if piece:
                events.append(Event("call_args", piece, self.open.call))
            if end is None and self.open.end is not None:
                end = self.body.find(CALL_CLOSE, self.open.end)
        else:
            end = self.body.find(CALL_CLOSE)
        if end is None or end < 0:
            return False
        self.buf = self.body[end + len(CALL_CLOSE) :]
        self._close_block(events, self.body[:end], closed=True)
        self.mode, self.strip_leading = "content", True
        return True

    def _start(self, events: list[Event], header: re.Match[str]) -> None:
        try:
            name = json.loads(header["name"])
        except ValueError:
            return  # not a JSON string: the block is parsed whole at its end
        self.open = _OpenCall(ToolCall(name, ""), header["key"], header.start("args"))
        events.append(Event("call_start", call=self.open.call))

    def _close_block(self, events: list[Event], body: str, closed: bool) -> None:
        """The block ended (at ``</tool_call>``, or with the output): a call, or its raw text."""
        raw = CALL_OPEN + body + (CALL_CLOSE if closed else "")
        opened, self.open, self.body = self.open, None, ""
        if opened is None:
            call = parse_call_body(body)
            if call is not None:
                self.calls += 1
                events += call_events(call)
            else:
                self._malformed(events, raw, closed)
            return
        if self._complete(opened, body):
            opened.call.arguments = body[opened.start : opened.end]
            self.calls += 1
            events.append(Event("tool_call", call=opened.call))
        else:
            events.append(Event("call_broken", call=opened.call))
            self._malformed(events, raw, closed)

    @staticmethod
    def _complete(opened: _OpenCall, body: str) -> bool:
        """The started call's block is one JSON object naming it, with the streamed arguments."""
        if opened.end is None:
            return False
        try:
            obj, args = json.loads(body), json.loads(body[opened.start : opened.end])
        except ValueError:
            return False
        return (
            isinstance(obj, dict)
            and obj.get("name") == opened.call.name
            and isinstance(args, dict)
            and obj.get(opened.key) == args
        )

    def _content(self, events: list[Event], final: bool) -> bool:
        start = self.buf.find(CALL_OPEN) if self.tools else -1
        if start >= 0:
            self._emit(events, "content", self.buf[:start].rstrip())
            self.buf, self.mode = self.buf[start + len(CALL_OPEN) :], "call"
            return True
        if not final:
            keep = held_back(self.buf, CALL_OPEN if self.tools else None)
            self._emit(events, "content", self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep :]
        return False

    def _emit(self, events: list[Event], kind: str, text: str) -> None:
        if text:
            events.append(Event(kind, text))  # type: ignore[arg-type]

    def _malformed(self, events: list[Event], raw: str, closed: bool) -> None:
        problem = "is not JSON with a name and object arguments" if closed else "was cut off"
        self.warnings.append(f"a <tool_call> block {problem}; returned as text: {raw[:200]!r}")
        self._emit(events, "content", raw)


def parse_hermes(text: str, **options: bool) -> ParsedMessage:
    """Parse a whole reply (the same machine as streaming, fed at once)."""
    parser = HermesParser(**options)
    events = parser.feed(text) + parser.finish()
    return collect(events, parser.warnings)
