"""What a model's chat template does with tools and reasoning, read once for every caller.

The server, the agent and the evaluator must agree on three facts about a model, or the same model
answers differently through each: how its template asks for tool calls, as hermes ``<tool_call>``
blocks (Qwen2.5/Qwen3), as bare ``{"name", "parameters"}`` JSON (Llama 3.1/3.2 Instruct), or not at all
(Qwen v1), when the ReAct prompt is written for it, with ReAct's stop words; whether it has a
``<think>`` reasoning block; and whether a rendered prompt already opened that block (thinking templates
that end the generation prompt with ``<think>``), so the reply starts inside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from qwenkit.tokenizer import Tokenizer
from qwenkit.tokenizer.chat_template import join_text_parts
from qwenkit.tokenizer.thinking import prompt_opens_thinking, template_thinks
from qwenkit.tools.calls import ParsedMessage, ToolSpecError, collect
from qwenkit.tools.hermes import CALL_OPEN, HermesParser
from qwenkit.tools.llama3_json import PYTHON_TAG, Llama3JsonParser
from qwenkit.tools.react import STOP_WORDS, continues_turn, parse_react, react_messages

CallFormat = Literal["hermes", "llama3_json", "react"]


@dataclass(frozen=True)
class TemplateStyle:
    # hermes: the template renders tools and asks for <tool_call> blocks; llama3_json: it renders them and
    # asks for bare JSON calls; react: it cannot render tools, so the ReAct prompt is written for it
    calls: CallFormat
    reasoning: bool  # the template knows a <think> block

    @property
    def react(self) -> bool:
        """Tools go in a ReAct prompt, with ReAct's stop words."""
        return self.calls == "react"

    @property
    def one_call_per_turn(self) -> bool:
        """The template renders one call per assistant turn (Meta's Llama 3 raises on more), so several
        calls of one reply go back as turns of one call and its result each."""
        return self.calls == "llama3_json"

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop words a tool-using request needs on top of the caller's."""
        return STOP_WORDS if self.react else ()

    def tool_prompt(
        self,
        tokenizer: Tokenizer,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        **template_kwargs: Any,
    ) -> list[int]:
        """The prompt ids of a request offering ``tools`` (OpenAI tool objects), as the server renders it."""
        functions = [t["function"] for t in tools]
        return self.prompt_ids(tokenizer, messages, functions, tools, **template_kwargs)

    def prompt_ids(
        self,
        tokenizer: Tokenizer,
        messages: list[dict[str, Any]],
        functions: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool = True,
        check_texts: Callable[[Sequence[str]], None] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """The prompt ids of ``messages`` offering ``tools`` (OpenAI tool objects; ``functions``: their
        checked ``function`` objects): through the template's own tools, or the ReAct prompt written into
        the messages, where a final tool result leaves the ReAct turn open for the model to continue.
        ``check_texts``: as `Tokenizer.apply_chat_template`'s, for the whole prompt."""
        head, tools, gen, tail = self._layout(messages, functions, tools, add_generation_prompt)
        checked = check_texts
        if check_texts is not None and tail:
            checked = lambda texts: check_texts([*texts, tail])  # noqa: E731
        ids = tokenizer.apply_chat_template(
            head, tools=tools, add_generation_prompt=gen, check_texts=checked, **template_kwargs
        )
        return ids + tokenizer.encode_plain(tail) if tail else ids

    def prompt_text(
        self,
        tokenizer: Tokenizer,
        messages: list[dict[str, Any]],
        functions: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """``prompt_ids`` as text."""
        head, tools, gen, tail = self._layout(messages, functions, tools, add_generation_prompt)
        return (
            tokenizer.render_chat_template(head, tools=tools, add_generation_prompt=gen, **template_kwargs)
            + tail
        )

    def _layout(
        self,
        messages: list[dict[str, Any]],
        functions: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool, str]:
        """(messages for the template, the tools it renders, its generation prompt, the text of an open
        ReAct turn that follows the generation prompt)."""
        rendered = self.prompt_messages(messages, functions)
        if not (functions and self.react):
            return rendered, tools or None, add_generation_prompt, ""
        if add_generation_prompt and continues_turn(messages, rendered):
            return rendered[:-1], None, True, rendered[-1]["content"]
        return rendered, None, add_generation_prompt, ""

    def parse_reply(
        self,
        decode: Callable[[Sequence[int]], str],
        prompt_ids: Sequence[int],
        text: str,
        read_arguments: Callable[[str, str], str | None] | None = None,
    ) -> ParsedMessage:
        """A whole reply to ``tool_prompt``'s prompt: ReAct's action, Llama 3's JSON calls, or hermes
        ``<tool_call>`` blocks and a leading ``<think>`` (opened by the prompt itself where the template
        does so). ``read_arguments``: see ``parse_react`` (a JSON call holds its arguments)."""
        parser = self.reply_parser(decode, prompt_ids)
        if parser is None:
            return parse_react(text, read_arguments)
        return collect(parser.feed(text) + parser.finish(), parser.warnings)

    def reply_parser(
        self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]
    ) -> HermesParser | Llama3JsonParser | None:
        """The streaming parser of a reply to ``tool_prompt``'s prompt (``parse_reply`` feeds it whole);
        None for ReAct, whose reply is decided by its last lines and parsed whole."""
        if self.react:
            return None
        if self.calls == "llama3_json":
            return Llama3JsonParser()
        opened = self.reasoning and prompt_opens_thinking(decode, prompt_ids)
        return HermesParser(reasoning=self.reasoning, in_reasoning=opened)

    def prompt_messages(
        self, messages: list[dict[str, Any]], functions: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The messages the template renders for a request offering ``functions`` (OpenAI ``function``
        objects; none: no tools): the ReAct prompt written into them where the template cannot render
        tools (then render them without ``tools``), else as sent, call arguments as objects. Text-part
        contents are joined first: the ReAct prompt writes each content into its own text."""
        messages = join_text_parts(messages)
        if functions and self.react:
            check_calls(messages, json_arguments=False)
            return react_messages(messages, functions)
        return template_messages(messages)


def tool_style(tokenizer: Tokenizer, tools: Any, chat_template: str | None = None) -> TemplateStyle:
    """The style of the template a prompt offering ``tools`` renders (a model's "tool_use" template
    where it has one, or the one ``chat_template`` names: `Tokenizer.chat_template_for`); no tools, or an
    empty list, are none, as `TemplateStyle.prompt_ids` renders them. The server, the agent, the evaluator
    and ``qwenkit template`` read it here, so they parse replies in the format of the template the prompt
    was rendered with."""
    return template_style(tokenizer.chat_template_for(tools or None, chat_template))


def template_style(chat_template: str | None) -> TemplateStyle:
    template = chat_template or ""
    return TemplateStyle(calls=call_format(template), reasoning=template_thinks(template))


def call_format(template: str) -> CallFormat:
    """How a chat template asks for tool calls, read from its text: hermes ``<tool_call>`` blocks; Meta's
    Llama 3.1/3.2 JSON (its instruction to "respond with (a) JSON for a function call" in the format
    ``{"name": function name, "parameters": ...}``, or ``<|python_tag|>`` calls); otherwise the template
    renders no tools a reply could be parsed for, and the ReAct prompt is written for it."""
    if "tools" not in template:
        return "react"
    if CALL_OPEN in template:
        return "hermes"
    asks_json = "JSON for a function call" in template or PYTHON_TAG in template
    return "llama3_json" if asks_json and '"parameters"' in template else "react"


def arguments_object(arguments: str) -> dict[str, Any] | None:
    """A call's arguments sent back as a JSON string, as the object they encode (blank: ``{}``); None when
    they are not a JSON object."""
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return None
    return args if isinstance(args, dict) else None


def check_calls(messages: list[dict[str, Any]], *, json_arguments: bool = True) -> None:
    """Each assistant call sent back names its function (a string) and, with ``json_arguments``, has
    arguments that are a JSON object, a string encoding one, or none at all: a ``ToolSpecError`` naming
    the call otherwise, rather than a call rendered nameless, with arguments the model never wrote, or
    the template's own words. (ReAct renders text arguments as written: a tool's reader took them.)"""
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None  # not an object: the template says so
        for j, call in enumerate(calls if isinstance(calls, list) else []):
            where = f"messages[{i}].tool_calls[{j}].function"
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ToolSpecError(f"{where} must be an object with the function's name, got {fn!r:.100}")
            args = fn.get("arguments")
            if json_arguments and not (
                args is None
                or isinstance(args, dict)
                or (isinstance(args, str) and arguments_object(args) is not None)
            ):
                shown = args[:100] if isinstance(args, str) else args
                raise ToolSpecError(f"{where}.arguments must be a JSON object, got {shown!r:.100}")


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool-call arguments sent back as JSON strings become objects before the template
    renders them (Qwen2.5's template pipes them through ``tojson``, which would encode them twice); none
    (left out or null) are ``{}``. ``check_calls`` first: a call that cannot be rendered is an error."""
    check_calls(messages)
    out = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if calls:
            fixed = []
            for call in calls:
                fn = call["function"]
                args = fn.get("arguments")
                args = arguments_object(args) if isinstance(args, str) else {} if args is None else args
                fixed.append({**call, "function": {**fn, "arguments": args}})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out
