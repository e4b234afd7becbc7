"""Llama 3.1/3.2 Instruct's JSON tool calls, parsed from streamed text (what vLLM's ``llama3_json`` reads).

Meta's templates put the tools in the prompt and ask for a reply that is the call itself, bare JSON:
``{"name": "get_weather", "parameters": {"city": "Paris"}}`` (``arguments`` is taken too), several
separated by ``;``, possibly after ``<|python_tag|>`` (usually a special token the detokenizer drops).

A reply is read as calls only when it is such JSON from its start (after whitespace); any other reply
is content, verbatim. vLLM's streaming parser decides the same way, from the reply's first character;
its whole-reply parser instead finds the first JSON object anywhere and drops the text around it, so
there the two disagree, and here a reply parsed whole and the same reply streamed always agree (one
state machine, fed at once by ``parse_llama3_json``).

A call starts (``call_start``) once its object opens with ``{"name": "...", "parameters": {"`` (or
``{}``); its arguments then go out as the model writes them (``call_args``), and the call completes when
its object closes and is followed by ``;`` or the end of the reply. An object that never shows that
opening is parsed whole at its end. An object that is not a call, or one followed by other text, ends
the calls: it and everything after it is content (after a ``call_broken`` event for a started call; a
warning where it began like a call). Whitespace around the calls is not content.
"""

from __future__ import annotations

import json
import re

from qwenkit.tools.calls import (
    Event,
    JsonExtent,
    ParsedMessage,
    ToolCall,
    arguments_json,
    call_events,
    collect,
)
from qwenkit.tools.hermes import CALL_HEADER

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = ";"
_LOOKS_LIKE_CALL = re.compile(r'\s*\{\s*"name"\s*:')


def read_call(text: str) -> ToolCall | None:
    """One call's JSON -> a ToolCall, or None if it is not ``{"name": str, "parameters" or "arguments":
    {...}}`` (the arguments key is required: a JSON answer that happens to have a ``name`` is no call)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = "arguments" if "arguments" in obj else "parameters"
    arguments = arguments_json(obj[key]) if key in obj else None
    return None if arguments is None else ToolCall(obj["name"], arguments)


class Llama3JsonParser:
    """Feed text deltas, get Events (the interface of ``HermesParser``, without reasoning)."""

    def __init__(self) -> None:
        self.mode = "start"  # start (nothing decided) | call (inside an object) | content (the rest)
        self.buf = ""  # text not yet decided: before the first object, or after a separator
        self.lead = ""  # what "start" skipped (whitespace, <|python_tag|>): content if no call follows
        self.body = ""  # the current object's text so far, from its "{"
        self.obj: JsonExtent | None = None
        self.args: JsonExtent | None = None  # a started call's arguments
        self.call: ToolCall | None = None  # the started call
        self.sent = 0  # how much of the arguments has gone out
        self.calls = 0
        self.warnings: list[str] = []

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self.mode == "content":
            self._emit(events, text)
            return events
        self.buf += text
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        while self._step(events, final=True):
            pass
        if self.mode == "call":
            self._close(events, final=True)
        elif self.mode == "start" and not (self.calls and (self.lead + self.buf).isspace()):
            self._emit(events, self.lead + self.buf)
        self.buf = self.lead = ""
        return events

    def _step(self, events: list[Event], final: bool) -> bool:
        if self.mode == "start":
            return self._start(events, final)
        if self.mode == "call":
            return self._call_step(events, final)
        return False

    def _start(self, events: list[Event], final: bool) -> bool:
        """Before an object: skip whitespace (and, first, the python tag); ``{`` opens a call, anything
        else makes the rest content."""
        text = self.buf.lstrip()
        self.lead += self.buf[: len(self.buf) - len(text)]
        self.buf = text
        if not text:
            return False
        if not self.calls and text.startswith(PYTHON_TAG) and PYTHON_TAG not in self.lead:
            self.lead, self.buf = self.lead + PYTHON_TAG, text[len(PYTHON_TAG) :]
            return True
        if not self.calls and PYTHON_TAG.startswith(text) and not final:
            return False  # could still be the tag
        if text.startswith("{"):
            self.mode, self.body, self.buf = "call", text, ""
            self.obj = JsonExtent(0)
            return True
        self.mode = "content"
        self._emit(events, (self.lead if not self.calls else "") + text)
        self.buf = self.lead = ""
        return False

    def _call_step(self, events: list[Event], final: bool) -> bool:
        """Inside an object: start the call once its opening shows, send its arguments as they come, and
        close it once the object has ended and a separator or the end of the reply follows."""
        self.body, self.buf = self.body + self.buf, ""
        if self.call is None and self.args is None:
            header = CALL_HEADER.match(self.body)
            if header is not None:
                try:
                    name = json.loads(header["name"])
                except ValueError:
                    name = None
                if name:
                    self.call, self.args = ToolCall(name, ""), JsonExtent(header.start("args"))
                    self.sent = header.start("args")
                    events.append(Event("call_start", call=self.call))
        if self.args is not None and self.call is not None:
            self.args.scan(self.body)
            upto = self.args.end if self.args.end is not None else self.args.scanned
            if upto > self.sent:
                events.append(Event("call_args", self.body[self.sent : upto], self.call))
                self.sent = upto
        assert self.obj is not None
        self.obj.scan(self.body)
        if self.obj.end is None:
            return False
        rest = self.body[self.obj.end :].lstrip()
        if not rest and not final:
            return False  # a separator may still come
        if rest and not rest.startswith(SEPARATOR):
            self._broken(events, "is followed by other text")  # not a call reply
            return False
        return self._close(events, final, after=rest[len(SEPARATOR) :])

    def _close(self, events: list[Event], final: bool, after: str = "") -> bool:
        """The object ended (or the reply did, inside it): a call, and on to what follows the separator;
        or, not a call, content from here on."""
        assert self.obj is not None
        if self.obj.end is None:
            self._broken(events, "was cut off")
            return False
        text = self.body[: self.obj.end]
        call = read_call(text)
        if call is None or (self.call is not None and not self._agrees(call, text)):
            self._broken(events, "is not JSON with a name and object parameters")
            return False
        if self.call is not None and self.args is not None and self.args.end is not None:
            self.call.arguments = self.body[self.args.start : self.args.end]  # as the model wrote them
            events.append(Event("tool_call", call=self.call))
        else:
            events += call_events(call)
        self.calls += 1
        self.mode, self.buf, self.lead, self.body = "start", after, "", ""
        self.obj = self.args = None
        self.call = None
        return not final or bool(after)

    def _agrees(self, call: ToolCall, text: str) -> bool:
        """The started call's object names it, with the arguments that were streamed."""
        if self.call is None or self.args is None or self.args.end is None or call.name != self.call.name:
            return False
        try:
            streamed = json.loads(self.body[self.args.start : self.args.end])
        except ValueError:
            return False
        return streamed == json.loads(call.arguments)

    def _broken(self, events: list[Event], problem: str) -> None:
        """Not a call: its text (and whatever the reply writes after it) is content; a warning naming the
        ``problem`` where it began like a call."""
        if self.call is not None:
            events.append(Event("call_broken", call=self.call))
        if self.call is not None or _LOOKS_LIKE_CALL.match(self.body):
            seen = self.body[: self.obj.end] if self.obj is not None and self.obj.end else self.body
            self.warnings.append(f"a JSON tool call {problem}; returned as text: {seen[:200]!r}")
        self._emit(events, (self.lead if not self.calls else "") + self.body)
        self.mode, self.body, self.lead = "content", "", ""
        self.obj = self.args = None
        self.call = None

    @staticmethod
    def _emit(events: list[Event], text: str) -> None:
        if text:
            events.append(Event("content", text))


def parse_llama3_json(text: str) -> ParsedMessage:
    """Parse a whole reply (the same machine as streaming, fed at once)."""
    parser = Llama3JsonParser()
    events = parser.feed(text) + parser.finish()
    return collect(events, parser.warnings)
