"""Chat on top of the generation API: messages in, a streamed reply out, history kept.

The prompt is built by the tokenizer's chat template (control tokens from the template only, user text
always plain); when a conversation outgrows the context window, the oldest whole turns are dropped
(the system message stays), as Qwen's own ``make_context`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwenkit.engine import SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.generate import LLM, Completion, Delta

Message = dict[str, Any]


class ContextOverflowError(QwenkitError, ValueError):
    """Even the newest message alone does not fit in the context window."""


class ChatError(QwenkitError, ValueError):
    """A chat session's argument of the wrong type (it failed inside the chat template, naming nothing)."""


def build_prompt(
    llm: LLM,
    messages: Sequence[Message],
    params: SamplingParams,
    tools: list[dict] | None = None,
    **template_kwargs: Any,
) -> list[int]:
    """Prompt ids for ``messages``, dropping the oldest turns until prompt + reply fit the window."""

    def render(msgs: list[Message]) -> list[int]:
        return llm.tokenizer.apply_chat_template(
            msgs, tools=tools, add_generation_prompt=True, **template_kwargs
        )

    return fit_messages(llm, messages, params, render)[1]


def fit_messages(
    llm: LLM,
    messages: Sequence[Message],
    params: SamplingParams,
    render: Callable[[list[Message]], list[int]],
) -> tuple[list[Message], list[int]]:
    """``messages`` less their oldest whole turns (the system message stays) until ``render``'s prompt ids
    for them leave room for the reply in the window; returns those messages and their prompt ids."""
    params = llm.params_or_default(params)  # a dict failed below on a missing attribute
    window = llm.engine.max_seq_len
    # the template's own check names anything else (list(None) raised TypeError, list("hi") made letters)
    msgs = list(messages) if isinstance(messages, list | tuple) else messages
    while True:
        ids = render(msgs)
        if len(ids) + min(params.max_tokens, window // 2) <= window:
            return msgs, ids
        first = 1 if msgs and msgs[0].get("role") == "system" else 0
        if len(msgs) - first <= 1:
            raise ContextOverflowError(
                f"the message needs {len(ids)} tokens; with room to reply it does not fit "
                f"the {window}-token window"
            )
        # Drop the oldest turn: everything up to the next user message.
        nxt = next((i for i in range(first + 1, len(msgs)) if msgs[i].get("role") == "user"), len(msgs) - 1)
        del msgs[first:nxt]


def chat_stream(
    llm: LLM, messages: Sequence[Message], params: SamplingParams | None = None, **template_kwargs: Any
) -> Iterator[Delta]:
    """Stream the assistant's reply to ``messages``."""
    params = llm.params_or_default(params)
    yield from llm.stream(build_prompt(llm, messages, params, **template_kwargs), params)


def chat(
    llm: LLM, messages: Sequence[Message], params: SamplingParams | None = None, **template_kwargs: Any
) -> str:
    """The assistant's whole reply to ``messages``."""
    return "".join(d.text for d in chat_stream(llm, messages, params, **template_kwargs)).strip()


@dataclass
class ChatSession:
    """A conversation: system prompt, history and sampling settings that persist between turns."""

    llm: LLM
    params: SamplingParams | None  # None: the model's defaults (``LLM.default_params``)
    system: str | None = None
    history: list[Message] = field(default_factory=list)
    # passed to the chat template on every turn, e.g. {"enable_thinking": False} for Qwen3
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    # the last reply that ran to its end: its finish reason and token count (None before, or when it was
    # interrupted or failed)
    completion: Completion | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.llm, LLM):
            raise ChatError(f"llm must be an LLM (LLM.load(path)), got {self.llm!r:.60}")
        self.params = self.llm.params_or_default(self.params)
        if self.system is not None and not isinstance(self.system, str):
            raise ChatError(f"system must be a string or None, got {self.system!r:.60}")
        if not isinstance(self.history, list):
            raise ChatError(f"history must be a list of chat messages, got {self.history!r:.60}")
        if not isinstance(self.template_kwargs, dict):
            raise ChatError(f"template_kwargs must be a dict, got {self.template_kwargs!r:.60}")

    def messages(self, user_text: str) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user_text}]

    def ask(self, user_text: str) -> Iterator[str]:
        """Stream the reply. The turn joins the history when the reply ends or is interrupted after it
        began (a prompt that does not fit, or a failure before any text, leaves the history as it was)."""
        if not isinstance(user_text, str):
            raise ChatError(f"the user's text must be a string, got {user_text!r:.60}")
        reply: list[str] = []
        started = False
        self.completion = None
        try:
            for delta in chat_stream(self.llm, self.messages(user_text), self.params, **self.template_kwargs):
                started = True
                reply.append(delta.text)
                self.completion = delta.completion
                yield delta.text
        finally:
            if started:
                self.history += [
                    {"role": "user", "content": user_text},
                    {"role": "assistant", "content": "".join(reply).strip()},
                ]
