"""What a model's chat template does with tools and reasoning, read once for every caller.

The server, the agent and the evaluator must agree on three facts about a model, or the same model
answers differently through each: whether its template renders tools itself (Qwen2.5/Qwen3: hermes
``<tool_call>`` blocks) or cannot (Qwen v1: the ReAct prompt is written for it, with ReAct's stop words),
whether it has a ``<think>`` reasoning block, and whether a rendered prompt already opened that block
(thinking templates that end the generation prompt with ``<think>``), so the reply starts inside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qwenkit.tokenizer import Tokenizer
from qwenkit.tools.calls import ParsedMessage, ToolSpecError
from qwenkit.tools.hermes import THINK_CLOSE, THINK_OPEN, parse_hermes
from qwenkit.tools.react import STOP_WORDS, parse_react, react_messages


@dataclass(frozen=True)
class TemplateStyle:
    react: bool  # the template cannot render tools: prompt with ReAct and stop at its observation words
    reasoning: bool  # the template knows a <think> block

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop words a tool-using request needs on top of the caller's."""
        return STOP_WORDS if self.react else ()

    def tool_prompt(
        self, tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> list[int]:
        """The prompt ids of a request offering ``tools`` (OpenAI tool objects), as the server renders it:
        through the template's own tools, or the ReAct prompt written into the messages."""
        rendered = self.prompt_messages(messages, [t["function"] for t in tools])
        return tokenizer.apply_chat_template(rendered, tools=None if self.react or not tools else tools)

    def parse_reply(
        self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int], text: str
    ) -> ParsedMessage:
        """A whole reply to ``tool_prompt``'s prompt: ReAct's action, or hermes ``<tool_call>`` blocks and a
        leading ``<think>`` (opened by the prompt itself where the template does so)."""
        if self.react:
            return parse_react(text)
        opened = self.reasoning and prompt_opens_thinking(decode, prompt_ids)
        return parse_hermes(text, reasoning=self.reasoning, in_reasoning=opened)

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
    return TemplateStyle(react="tools" not in template, reasoning=THINK_OPEN in template)


def prompt_opens_thinking(decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]) -> bool:
    """Whether the rendered prompt ends inside an opened ``<think>`` (its last few tokens decoded)."""
    return decode(list(prompt_ids[-4:])).rstrip().endswith(THINK_OPEN)


def prompt_closes_thinking(decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]) -> bool:
    """Whether the rendered prompt ends with a closed ``</think>`` (Qwen3 with ``enable_thinking`` off
    writes an empty block), so the reply does not think."""
    return decode(list(prompt_ids[-4:])).rstrip().endswith(THINK_CLOSE)


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
                    try:
                        args = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
                    except ValueError:
                        args = None
                    if not isinstance(args, dict):  # rendering {} instead would show the model another call
                        raise ToolSpecError(
                            f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object, "
                            f"got {fn['arguments'][:100]!r}"
                        )
                    call = {**call, "function": {**fn, "arguments": args}}
                fixed.append(call)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out
