"""An agent loop over an LLM: ask the model, run the Python functions it calls, feed the results back,
stop on a plain answer (or after ``max_rounds``). Uses the same formats and parsers as the server: the
model's hermes ``<tool_call>`` blocks when its template renders tools, Qwen v1's ReAct otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any

from qwenkit.chat import assistant_message
from qwenkit.engine import SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.generate import LLM, Completion
from qwenkit.tools.calls import Event, ParsedMessage, ToolCall, collect
from qwenkit.tools.react import partial_answer as react_partial_answer
from qwenkit.tools.template_style import tool_style

log = logging.getLogger(__name__)


class ToolError(QwenkitError, ValueError):
    """A tool or agent definition is unusable."""


@dataclass
class Tool:
    """A Python function the model may call, with the JSON schema of its keyword arguments."""

    name: str
    fn: Callable[..., Any]
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    # Arguments the model wrote as plain text instead of a JSON object, read as this tool's own runner
    # reads them (Qwen-Agent's code interpreter takes a fenced block or bare code); None: refused as text.
    text_arguments: Callable[[str], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        # each of these was offered to the model and failed only mid-run: a name of None inside the
        # prompt's rendering, a fn of None (or a schema the keyword arguments cannot match) on every call
        if not isinstance(self.name, str) or not self.name:
            raise ToolError(f"a tool's name must be a non-empty string, got {self.name!r:.60}")
        where = f"tool {self.name!r}"
        if not callable(self.fn):
            raise ToolError(f"{where}: fn must be callable, got {self.fn!r:.60}")
        if not isinstance(self.description, str):
            raise ToolError(f"{where}: description must be a string, got {self.description!r:.60}")
        if not isinstance(self.parameters, dict):
            raise ToolError(f"{where}: parameters must be a JSON schema object, got {self.parameters!r:.60}")
        if self.parameters.get("type", "object") != "object":
            raise ToolError(
                f'{where}: parameters must be a schema of "type": "object" (the function\'s keyword '
                f"arguments), got {self.parameters['type']!r:.60}"
            )
        if self.text_arguments is not None and not callable(self.text_arguments):
            raise ToolError(
                f"{where}: text_arguments must be callable or None, got {self.text_arguments!r:.60}"
            )

    def spec(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def run(self, arguments: str) -> str:
        """Call with the model's JSON arguments; any failure is reported to the model as text."""
        try:
            args = json.loads(arguments) if arguments.strip() else {}
            if not isinstance(args, dict):
                return f"error: arguments must be a JSON object, got {arguments!r}"
            result = self.fn(**args)
        except Exception as e:  # the model should see what went wrong and may retry
            return f"error: {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


@dataclass
class AgentResult:
    messages: list[dict[str, Any]]  # the whole conversation, tool calls and results included
    answer: str | None  # the final plain answer, None if max_rounds ran out first
    rounds: int
    completion: Completion | None = None  # the last reply's: its finish reason and token count


@dataclass
class PartialReply:
    """A reply as far as it came: the text the model wrote, the content shown of it, and its thinking."""

    written: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)

    def message(self, react: bool) -> dict[str, Any]:
        """The reply stopped here, as the history keeps it: the answer shown so far and its thinking, as a
        chat keeps an answer it stopped (a ReAct reply, shown only when whole: its answer written so far)."""
        answer = react_partial_answer("".join(self.written)) if react else "".join(self.shown)
        return assistant_message(answer, "".join(self.reasoning))


class Agent:
    def __init__(
        self,
        llm: LLM,
        tools: list[Tool],
        *,
        max_rounds: int = 5,
        params: SamplingParams | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """``template_kwargs``: passed to the chat template for every reply (``{"enable_thinking": False}``
        for Qwen3)."""
        if not isinstance(llm, LLM):
            raise ToolError(f"llm must be an LLM (LLM.load(path)), got {llm!r:.60}")
        if not isinstance(tools, list | tuple):
            hint = "a Tool (put it in a list: [tool])" if isinstance(tools, Tool) else f"{tools!r:.60}"
            raise ToolError(f"tools must be a list of Tool objects, got {hint}")
        for t in tools:
            if not isinstance(t, Tool):  # a bare callable would fail later, on an attribute, mid-run
                hint = " (use CodeInterpreter().tool())" if type(t).__name__ == "CodeInterpreter" else ""
                raise ToolError(f"tools must be Tool objects, got {type(t).__name__}{hint}")
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ToolError(f"tool names must be unique, got {names}")
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
            raise ToolError(f"max_rounds must be an integer >= 1, got {max_rounds!r:.60}")
        if template_kwargs is not None and not isinstance(template_kwargs, dict):
            raise ToolError(f"template_kwargs must be a dict, got {template_kwargs!r:.60}")
        self.llm, self.tools, self.max_rounds = llm, {t.name: t for t in tools}, max_rounds
        self.template_kwargs = dict(template_kwargs or {})
        self.params = llm.params_or_default(params)
        specs = [t.spec() for t in tools]
        self.style = tool_style(llm.tokenizer, specs, self.template_kwargs.get("chat_template"))

    def _reply(
        self, messages: list[dict[str, Any]], partial: PartialReply
    ) -> Generator[str, None, tuple[ParsedMessage, Completion]]:
        """One reply: yields its content as it comes (text that may open a ``<tool_call>`` is held back
        until decided, by the parser the server streams with; a ReAct reply is decided by its last lines,
        so its content comes whole at its end), kept in ``partial`` as it comes (with the text the model
        wrote and its thinking); returns it parsed, with its Completion. Closed early, its request is
        aborted at once (its KV memory freed)."""
        tokenizer = self.llm.tokenizer
        ids = self.prompt(messages)
        params = replace(self.params, stop=(*self.params.stop, *self.style.stop))
        parser = self.style.reply_parser(tokenizer.decode, ids)
        events: list[Event] = []
        completion = None
        deltas = self.llm.stream(ids, params)
        try:
            for delta in deltas:
                completion = delta.completion or completion
                partial.written.append(delta.text)
                for event in parser.feed(delta.text) if parser is not None else ():
                    events.append(event)
                    if event.kind == "reasoning":
                        partial.reasoning.append(event.text)
                    if event.kind == "content":
                        partial.shown.append(event.text)
                        yield event.text
        finally:  # not left to the stream's garbage collection
            deltas.close()
        assert completion is not None  # the last Delta carries it
        if parser is None:
            parsed = self.style.parse_reply(tokenizer.decode, ids, completion.text, self._text_arguments)
            if parsed.content:
                partial.shown.append(parsed.content)
                yield parsed.content
            return parsed, completion
        for event in parser.finish():
            events.append(event)
            if event.kind == "content":
                partial.shown.append(event.text)
                yield event.text
        return collect(events, parser.warnings), completion

    def prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt ids of a reply to ``messages``, offering the tools."""
        specs = [t.spec() for t in self.tools.values()]
        return self.style.tool_prompt(self.llm.tokenizer, messages, specs, **self.template_kwargs)

    def _text_arguments(self, name: str, text: str) -> str | None:
        tool = self.tools.get(name)
        if tool is None or tool.text_arguments is None:
            return None
        try:
            return json.dumps(tool.text_arguments(text), ensure_ascii=False)
        except Exception as e:  # a reader that fails leaves the reply as text, as with no reader
            log.warning("tool %s could not read its arguments from text: %s", name, e)
            return None

    def run(self, messages: list[dict[str, Any]] | str) -> AgentResult:
        """Run to the final answer (or ``max_rounds``)."""
        stream = self.stream(messages)
        while True:
            try:
                next(stream)
            except StopIteration as done:
                return done.value

    def stream(
        self, messages: list[dict[str, Any]] | str, *, conversation: list[dict[str, Any]] | None = None
    ) -> Generator[str, None, AgentResult]:
        """``run``, yielding the visible text of every reply as the model writes it (never tool-call
        markup); the tools run between replies. Returns the AgentResult.

        ``conversation``: an empty list that receives the conversation as it grows (the result's
        ``messages`` are this list), so that a caller whose stream stops early (``close()``, Ctrl-C, an
        error) knows what happened, as a chat keeps an interrupted answer: it holds the messages, each
        round's calls with their results as they ran (a round stopped inside a tool keeps the calls that
        ran before it; one stopped before any keeps its reply as an answer), and the reply in progress
        once it began, as an assistant message of the text shown so far and its thinking (a ReAct reply,
        shown only once whole, keeps the part of its ``Final Answer`` written so far)."""
        if not isinstance(messages, str | list | tuple):  # None or 5 failed in list() with a TypeError
            raise ToolError(f"messages must be a string or a list of chat messages, got {messages!r:.60}")
        if conversation is not None and (not isinstance(conversation, list) or conversation):
            raise ToolError(f"conversation must be an empty list, got {conversation!r:.60}")
        history = [] if conversation is None else conversation
        history += [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        completion = None
        for round_ in range(1, self.max_rounds + 1):
            partial = PartialReply()
            try:
                parsed, completion = yield from self._reply(history, partial)
            except BaseException:  # the reply stopped (closed, Ctrl-C, an error): what it wrote stays
                if partial.written:
                    history.append(partial.message(self.style.react))
                raise
            # the reasoning stays with its turn: Qwen3's template shows it again for the calls of the
            # turn in progress, as the model wrote them
            thought = {"reasoning_content": parsed.reasoning} if parsed.reasoning else {}
            if not parsed.tool_calls:
                history.append({"role": "assistant", "content": parsed.content, **thought})
                return AgentResult(history, parsed.content, round_, completion)
            self._round(parsed, thought, history)
        return AgentResult(history, None, self.max_rounds, completion)

    def _round(self, parsed: ParsedMessage, thought: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Run a reply's calls and add them to ``history`` with their results, as it keeps them; stopped
        inside a tool (Ctrl-C, an error), the calls that ran before it, or the reply alone as an answer
        where none ran (the interrupted call's result never came)."""
        ran: list[tuple[ToolCall, str]] = []
        try:
            for call in parsed.tool_calls:
                ran.append((call, self._run(call)))
        finally:
            history += self._round_messages(parsed, thought, ran)

    def _round_messages(
        self, parsed: ParsedMessage, thought: dict[str, Any], ran: list[tuple[ToolCall, str]]
    ) -> list[dict[str, Any]]:
        """The messages of a reply whose calls ``ran`` (each with its result), in the order written."""
        if not ran:
            return [assistant_message(parsed.content, parsed.reasoning)]
        messages: list[dict[str, Any]] = []
        # one turn each where the template takes no more (Llama 3)
        turns = [[r] for r in ran] if self.style.one_call_per_turn else [ran]
        for k, calls in enumerate(turns):
            said = {"content": parsed.content, **thought} if k == 0 else {"content": ""}
            messages.append(
                {"role": "assistant", **said, "tool_calls": [self._as_history(c) for c, _ in calls]}
            )
            for call, result in calls:
                messages.append(
                    {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result}
                )
        return messages

    @staticmethod
    def _as_history(call: ToolCall) -> dict[str, Any]:
        # arguments as an object: every Qwen template renders that form correctly. Text a tool's reader
        # took (ReAct only) stays the model's own, as Qwen-Agent keeps it: the next prompt then shows the
        # turn as written, not re-worded as JSON the model never wrote.
        arguments = call.text if call.text is not None else json.loads(call.arguments)
        return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}

    def _run(self, call: ToolCall) -> str:
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: there is no tool named {call.name!r}; available: {', '.join(self.tools)}"
        log.info("tool %s(%s)", call.name, call.arguments)
        return tool.run(call.arguments)


def load_tool_specs(path: str) -> list[dict[str, Any]]:
    """Function definitions from a JSON file: an OpenAI ``tools`` array or a list of functions."""
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ToolError(f"cannot read tools file {path}: {e.strerror}") from None
    except ValueError as e:
        raise ToolError(f"tools file {path} is not JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise ToolError(f"tools file {path} must hold a non-empty JSON array of tools")
    specs = []
    for i, item in enumerate(data):
        fn = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"tools file {path}: entry {i} has no function name")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ToolError(f"tools file {path}: {fn['name']}.parameters must be a JSON schema object")
        specs.append(fn)
    return specs


def typed_tools(specs: list[dict[str, Any]], ask: Callable[[str, str], str]) -> list[Tool]:
    """Tools whose results a person supplies: ``ask(name, arguments_json)`` returns the result text."""

    def make(name: str) -> Callable[..., str]:
        return lambda **kwargs: ask(name, json.dumps(kwargs, ensure_ascii=False))

    return [
        Tool(
            s["name"], make(s["name"]), s.get("description") or "", s.get("parameters") or {"type": "object"}
        )
        for s in specs
    ]
