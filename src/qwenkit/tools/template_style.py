"""What a model's chat template does with tools and reasoning, read once for every caller.

The server, the agent and the evaluator must agree on three facts about a model, or the same model
answers differently through each: whether its template renders tools itself as hermes ``<tool_call>``
blocks (Qwen2.5/Qwen3) or not (Qwen v1 cannot; Llama 3.1/3.2 asks for bare JSON calls, which are not
parsed), when the ReAct prompt is written for it, with ReAct's stop words; whether it has a ``<think>``
reasoning block; and whether a rendered prompt already opened that block (thinking templates that end
the generation prompt with ``<think>``), so the reply starts inside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qwenkit.tokenizer import Tokenizer
from qwenkit.tools.calls import ParsedMessage, ToolSpecError, collect
from qwenkit.tools.hermes import CALL_OPEN, THINK_CLOSE, THINK_OPEN, HermesParser
from qwenkit.tools.react import STOP_WORDS, continues_turn, parse_react, react_messages


@dataclass(frozen=True)
class TemplateStyle:
    react: bool  # no hermes tools in the template: prompt with ReAct and stop at its observation words
    reasoning: bool  # the template knows a <think> block

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop words a tool-using request needs on top of the caller's."""
        return STOP_WORDS if self.react else ()

    def tool_prompt(
        self, tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> list[int]:
        """The prompt ids of a request offering ``tools`` (OpenAI tool objects), as the server renders it."""
        return self.prompt_ids(tokenizer, messages, [t["function"] for t in tools], tools)

    def prompt_ids(
        self,
        tokenizer: Tokenizer,
        messages: list[dict[str, Any]],
        functions: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """The prompt ids of ``messages`` offering ``tools`` (OpenAI tool objects; ``functions``: their
        checked ``function`` objects): through the template's own tools, or the ReAct prompt written into
        the messages, where a final tool result leaves the ReAct turn open for the model to continue."""
        head, tools, gen, tail = self._layout(messages, functions, tools, add_generation_prompt)
        ids = tokenizer.apply_chat_template(head, tools=tools, add_generation_prompt=gen, **template_kwargs)
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
        """A whole reply to ``tool_prompt``'s prompt: ReAct's action, or hermes ``<tool_call>`` blocks and a
        leading ``<think>`` (opened by the prompt itself where the template does so). ``read_arguments``:
        see ``parse_react`` (a hermes call is one JSON object, its arguments inside it)."""
        parser = self.reply_parser(decode, prompt_ids)
        if parser is None:
            return parse_react(text, read_arguments)
        return collect(parser.feed(text) + parser.finish(), parser.warnings)

    def reply_parser(
        self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]
    ) -> HermesParser | None:
        """The streaming parser of a reply to ``tool_prompt``'s prompt (``parse_reply`` feeds it whole);
        None for ReAct, whose reply is decided by its last lines and parsed whole."""
        if self.react:
            return None
        opened = self.reasoning and prompt_opens_thinking(decode, prompt_ids)
        return HermesParser(reasoning=self.reasoning, in_reasoning=opened)

    def prompt_messages(
        self, messages: list[dict[str, Any]], functions: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The messages the template renders for a request offering ``functions`` (OpenAI ``function``
        objects; none: no tools): the ReAct prompt written into them where the template cannot render
        tools (then render them without ``tools``), else as sent, call arguments as objects."""
        if functions and self.react:
            return react_messages(messages, functions)
        return template_messages(messages)


def template_style(chat_template: str | None) -> TemplateStyle:
    template = chat_template or ""
    # Only hermes blocks are parsed from a reply: a template that renders tools but asks for calls its
    # own way (Llama 3.1/3.2's bare ``{"name", "parameters"}`` JSON) gets the ReAct prompt too, or its
    # calls would come back as plain content.
    hermes = "tools" in template and CALL_OPEN in template
    return TemplateStyle(react=not hermes, reasoning=THINK_OPEN in template)


def prompt_opens_thinking(decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]) -> bool:
    """Whether the rendered prompt ends inside an opened ``<think>`` (its last few tokens decoded)."""
    return decode(list(prompt_ids[-4:])).rstrip().endswith(THINK_OPEN)


def prompt_closes_thinking(decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]) -> bool:
    """Whether the rendered prompt ends with a closed ``</think>`` (Qwen3 with ``enable_thinking`` off
    writes an empty block), so the reply does not think."""
    return decode(list(prompt_ids[-4:])).rstrip().endswith(THINK_CLOSE)


def arguments_object(arguments: str) -> dict[str, Any] | None:
    """A call's arguments sent back as a JSON string, as the object they encode (blank: ``{}``); None when
    they are not a JSON object."""
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return None
    return args if isinstance(args, dict) else None


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool-call arguments sent back as JSON strings become objects before the template
    renders them (Qwen2.5's template pipes them through ``tojson``, which would encode them twice)."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None  # not an object: the template says so
        if calls:
            fixed = []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    args = arguments_object(fn["arguments"])
                    if args is None:  # rendering {} instead would show the model another call
                        raise ToolSpecError(
                            f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object, "
                            f"got {fn['arguments'][:100]!r}"
                        )
                    call = {**call, "function": {**fn, "arguments": args}}
                fixed.append(call)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out
