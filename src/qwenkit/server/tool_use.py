"""The chat route's ``tools`` / ``tool_choice`` / ``response_format``: validation, the grammar that
enforces them, and the parser that turns each choice's text into ``content``, ``reasoning_content`` and
``tool_calls``.

A request without ``tools`` (or with ``tool_choice: "none"``) gets no tool parsing: ``<tool_call>`` text
comes back verbatim in ``content`` (Qwen-Agent writes its own function-calling prompt and parses it).
``"required"`` and a named function are enforced by constrained decoding (hermes blocks, Llama 3's JSON
calls, or for Qwen v1 a ReAct ``Action`` / ``Action Input``), as are ``json_object`` and ``json_schema``
response formats; beside ``tools`` the model may call (``"auto"``), a format lets the reply be calls
(hermes blocks, or one Llama 3 JSON or ReAct call) or its JSON, as OpenAI's models answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwenkit.generate import LLM
from qwenkit.server.errors import APIError
from qwenkit.server.schemas import ChatCompletionRequest
from qwenkit.tokenizer.thinking import (
    continuation_opens_thinking,
    prompt_closes_thinking,
    prompt_opens_thinking,
)
from qwenkit.tools.calls import Event, ParsedMessage, ToolSpecError, call_events, collect, offered_functions
from qwenkit.tools.grammar import (
    GrammarError,
    after_thinking,
    calls_or_json_grammar,
    enable_grammars,
    json_schema_grammar,
    llama3_call_grammar,
    react_call_grammar,
    tool_call_grammar,
)
from qwenkit.tools.hermes import HermesParser
from qwenkit.tools.llama3_json import Llama3JsonParser
from qwenkit.tools.react import STOP_WORDS, parse_react
from qwenkit.tools.template_style import tool_style

NAMED_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


@dataclass
class ToolPlan:
    """What one chat request asks of tool use, checked."""

    functions: list[dict[str, Any]] = field(default_factory=list)
    choice: str = "none"  # none | auto | required | named
    named: str | None = None
    parallel: bool = True
    grammar: str | None = None
    reasoning: bool = False  # the template thinks (<think>): split reasoning_content off
    react: bool = False  # Qwen v1 (no template renders tools): ReAct prompt, Observation: stop word
    llama3_json: bool = False  # Llama 3.1/3.2: the reply's calls are bare JSON, not <tool_call> blocks
    in_reasoning: bool = False  # the prompt itself opened <think>
    may_think: bool = False  # the reply may open <think> itself (the prompt neither opened nor closed it)
    continued: bool = False  # the reply continues the prompt's final message (continue_final_message)

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    @property
    def parses(self) -> bool:
        return self.parses_calls or self.reasoning

    @property
    def stop(self) -> tuple[str, ...]:
        return STOP_WORDS if self.react else ()

    def parser(self) -> ToolParser:
        return ToolParser(self)


def _functions(tools: list[Any]) -> list[dict[str, Any]]:
    try:
        return offered_functions(tools)
    except ToolSpecError as e:
        raise APIError(400, str(e), "tools") from None


def _choice(value: Any, functions: list[dict[str, Any]]) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if functions else "none"), None
    if value in ("none", "auto", "required"):
        if value != "none" and not functions:
            raise APIError(400, f'tool_choice "{value}" needs `tools`', "tool_choice")
        return value, None
    name = None
    if isinstance(value, dict) and value.get("type", "function") == "function":
        name = (value.get("function") or {}).get("name")
    if not isinstance(name, str):
        raise APIError(
            400, f"tool_choice must be none, auto, required or a named function. {NAMED_USAGE}", "tool_choice"
        )
    if name not in {fn["name"] for fn in functions}:
        raise APIError(
            400, f"tool_choice names {name!r}, which is not in `tools`. {NAMED_USAGE}", "tool_choice"
        )
    return "named", name


def _response_schema(response_format: Any) -> tuple[bool, dict[str, Any] | None]:
    """(constrained?, schema) for a response_format; schema None means any JSON object."""
    if response_format is None:
        return False, None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(
                400, "response_format.json_schema must be an object with a `schema` object", "response_format"
            )
        return True, spec.get("schema") or {"type": "object"}
    raise APIError(400, "response_format.type must be text, json_object or json_schema", "response_format")


def uses_react(llm: LLM, body: ChatCompletionRequest) -> bool:
    """Tools for a model whose chat template cannot render them (Qwen v1): the ReAct flow."""
    react = tool_style(llm.tokenizer, body.tools).react
    return bool(body.tools) and body.tool_choice != "none" and react


def react_functions(llm: LLM, body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The functions a ReAct prompt offers (checked; a 400 naming ``tools``), or none."""
    return _functions(body.tools) if uses_react(llm, body) else []


def plan_tools(
    llm: LLM, body: ChatCompletionRequest, prompt_ids: list[int], continued: str | None = None
) -> ToolPlan:
    """Check the request's tool fields and build what enforces and parses them (may compile a grammar).
    ``continued``: the text of the final message the prompt continues (continue_final_message), if any."""
    functions = _functions(body.tools) if body.tools is not None else []
    choice, named = _choice(body.tool_choice, functions)
    parallel = body.parallel_tool_calls is not False
    style = tool_style(llm.tokenizer, body.tools)
    plan = ToolPlan(functions, choice, named, parallel, reasoning=style.reasoning)
    plan.react = uses_react(llm, body)
    plan.llama3_json = style.calls == "llama3_json"
    plan.continued = continued is not None
    if plan.reasoning and continued is not None:  # the reply opens no block: it may be inside one
        tokenizer = llm.tokenizer
        plan.in_reasoning = continuation_opens_thinking(
            tokenizer.encode, tokenizer.decode, prompt_ids, continued
        )
    elif plan.reasoning:
        plan.in_reasoning = prompt_opens_thinking(llm.tokenizer.decode, prompt_ids)
        plan.may_think = not plan.in_reasoning and not prompt_closes_thinking(
            llm.tokenizer.decode, prompt_ids
        )
    constrained, schema = _response_schema(body.response_format)
    forced = choice in ("required", "named")
    # beside tools the model may call: its calls (in the template's format) or the format's JSON
    either = constrained and choice == "auto"
    if constrained and (forced or either):
        # the format checked alone, so that its problem names response_format; under a forced call it
        # takes no part in the reply, but is refused as it would be without tools
        _check(llm, lambda: json_schema_grammar(schema), "response_format")
    if forced or constrained:
        param = "tools" if forced or either else "response_format"
        plan.grammar = _check(llm, lambda: _grammar(plan, schema, either), param)
    return plan


def _grammar(plan: ToolPlan, schema: dict[str, Any] | None, either: bool) -> str:
    """The grammar enforcing the plan's forced call, or its response format (``either``: or calls)."""
    if plan.choice in ("required", "named"):
        chosen = [fn for fn in plan.functions if plan.choice == "required" or fn["name"] == plan.named]
        if plan.react:  # ReAct parses one Action per turn
            grammar = react_call_grammar(chosen)
        elif plan.llama3_json:  # one call: Meta's template renders no more in a turn
            grammar = llama3_call_grammar(chosen)
        else:
            grammar = tool_call_grammar(chosen, parallel=plan.parallel and plan.choice == "required")
    elif either:
        style = "react" if plan.react else "llama3_json" if plan.llama3_json else "hermes"
        grammar = calls_or_json_grammar(plan.functions, schema, parallel=plan.parallel, style=style)
    else:
        grammar = json_schema_grammar(schema)
    if plan.in_reasoning or plan.may_think:  # thinking, then the answer
        grammar = after_thinking(grammar, opened=plan.in_reasoning)
    return grammar


def _check(llm: LLM, build: Callable[[], str], param: str) -> str:
    """The grammar ``build`` makes, compiled once to check it: a 400 naming ``param`` if it cannot be."""
    try:
        grammar = build()
        enable_grammars(llm).check(grammar)
    except (GrammarError, ValueError) as e:
        raise APIError(400, str(e), param) from None
    return grammar


class ToolParser:
    """One choice's parser: text deltas in, Events out; the finish reason mapped at the end."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.inner: HermesParser | Llama3JsonParser = (
            Llama3JsonParser()
            if plan.llama3_json and plan.parses_calls
            else HermesParser(
                tools=plan.parses_calls,
                reasoning=plan.reasoning,
                in_reasoning=plan.in_reasoning,
                continued=plan.continued,
            )
        )
        self.events: list[Event] = []
        self.calls = 0  # complete calls kept
        self.started = 0  # calls started (their first delta sent)
        self.broken = 0  # started calls whose JSON then went bad (a stream cannot take them back)
        self.dropped: set[str] = set()  # ids of calls past the first when parallel_tool_calls is false
        self.react_text: list[str] = []
        self.react_warnings: list[str] = []

    def feed(self, text: str) -> list[Event]:
        if self.plan.react:  # a ReAct reply is decided by its last lines: parsed whole at the end
            self.react_text.append(text)
            return []
        return self._keep(self.inner.feed(text) if text else [])

    def finish(self) -> list[Event]:
        if self.plan.react:
            m = parse_react("".join(self.react_text))
            self.react_warnings = m.warnings
            events = [Event("content", m.content)] if m.content else []
            return self._keep(events + [e for c in m.tool_calls for e in call_events(c)])
        return self._keep(self.inner.finish())

    def _keep(self, events: list[Event]) -> list[Event]:
        kept = []
        for e in events:
            if e.call is not None:
                if e.kind == "call_start" and self.started and not self.plan.parallel:
                    self.dropped.add(e.call.id)  # parallel_tool_calls: false keeps the first call only
                if e.call.id in self.dropped:
                    continue
                self.started += e.kind == "call_start"
                self.calls += e.kind == "tool_call"
                self.broken += e.kind == "call_broken"
            kept.append(e)
        self.events += kept
        return kept

    @property
    def warnings(self) -> list[str]:
        return self.inner.warnings + self.react_warnings

    def finish_reason(self, reason: str) -> str:
        """A reply that ended by itself with calls finishes "tool_calls", except a call to a named function
        (``tool_choice: {"type": "function", ...}``), which OpenAI ends with "stop", as vLLM does, and a
        reply with a call that broke after it started: a stream has sent that call and cannot take it
        back, so "stop" tells a client that runs the calls on "tool_calls" not to run it (vLLM says
        "tool_calls"). The events are the same whole or streamed, so both finish alike."""
        calls = self.calls and not self.broken and self.plan.choice != "named"
        return "tool_calls" if calls and reason == "stop" else reason

    def message(self) -> ParsedMessage:
        return collect(self.events, self.warnings)
