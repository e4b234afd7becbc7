"""Chat on top of the generation API: messages in, a streamed reply out, history kept.

The prompt is built by the tokenizer's chat template (control tokens from the template only, user text
always plain); when a conversation outgrows the context window, the oldest whole turns are dropped
(the system message stays), as Qwen's own ``make_context`` does.

A model whose template thinks (Qwen3's ``<think>`` block) gets its reply split as the server splits it
(``qwenkit.tokenizer.thinking``): the answer is the reply's text and the thinking its ``reasoning``, and
the history keeps them as the template expects them back (``content`` and ``reasoning_content``), so a
reply cut off while thinking goes back as an empty answer, never as an open ``<think>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from qwenkit.delta_stream import DeltaStream, Stage
from qwenkit.engine import SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.generate import LLM, Completion, Delta
from qwenkit.tokenizer.thinking import (
    ThinkSplitter,
    continuation_opens_thinking,
    prompt_opens_thinking,
    template_thinks,
)

Message = dict[str, Any]


class ContextOverflowError(QwenkitError, ValueError):
    """Even the newest message alone does not fit in the context window."""


class ChatError(QwenkitError, ValueError):
    """A chat session's argument of the wrong type (it failed inside the chat template, naming nothing)."""


SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


def check_template_kwargs(template_kwargs: dict[str, Any]) -> None:
    """Refuse a sampling setting among the chat template's arguments (``chat(llm, messages,
    max_tokens=5)``): the template would silently ignore it, and the reply run with other settings."""
    for key in template_kwargs:
        if key in SAMPLING_FIELDS:
            raise ChatError(
                f"{key} is a sampling setting, not a chat template argument: "
                f"pass params=SamplingParams({key}=...)"
            )


def build_prompt(
    llm: LLM,
    messages: Sequence[Message],
    params: SamplingParams,
    tools: list[dict] | None = None,
    **template_kwargs: Any,
) -> list[int]:
    """Prompt ids for ``messages``, dropping the oldest turns until prompt + reply fit the window.
    ``continue_final_message=True`` (transformers' argument) continues the final message instead of opening
    a new turn: no generation prompt unless one is asked for (which the tokenizer refuses beside it)."""
    check_template_kwargs(template_kwargs)
    kwargs = dict(template_kwargs)
    gen = kwargs.pop("add_generation_prompt", not continues(kwargs))

    def render(msgs: list[Message]) -> list[int]:
        return llm.tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, **kwargs)

    return fit_messages(llm, messages, params, render)[1]


def continues(template_kwargs: Mapping[str, Any]) -> bool:
    """Whether the template kwargs continue the final message (``continue_final_message``)."""
    return template_kwargs.get("continue_final_message") not in (None, False)


def continued_text(messages: Sequence[Message], template_kwargs: Mapping[str, Any]) -> str | None:
    """The text of the final message's field that a prompt rendered with ``template_kwargs`` continues
    (``continue_final_message``: True for the content, or the field's name), or None: a new turn, or a
    field that holds no text."""
    if not continues(template_kwargs) or not messages:
        return None
    field = template_kwargs["continue_final_message"]
    value = messages[-1].get("content" if field is True else field)
    return value if isinstance(value, str) else None


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
) -> DeltaStream[Delta]:
    """Stream the assistant's reply to ``messages``, read with ``for`` (or ``async for`` inside a running
    event loop): each Delta's ``text`` is the answer's, its ``reasoning`` the thinking's (for a model whose
    template thinks; empty otherwise). The prompt is built, and the request started, at the first read."""

    def make() -> DeltaStream[Delta]:
        sampling = llm.params_or_default(params)
        prompt = build_prompt(llm, messages, sampling, **template_kwargs)
        deltas = llm.stream(prompt, sampling)
        tokenizer = llm.tokenizer
        chosen = tokenizer.chat_template_for(
            template_kwargs.get("tools"), template_kwargs.get("chat_template")
        )
        if not template_thinks(chosen):
            return deltas
        if continues(template_kwargs):  # the reply opens no block: it may go on inside the final message's
            continued = continued_text(messages, template_kwargs) or ""
            opened = continuation_opens_thinking(tokenizer.encode, tokenizer.decode, prompt, continued)
            split = ThinkSplitter(opened=opened, continued=True)
        else:
            split = ThinkSplitter(opened=prompt_opens_thinking(tokenizer.decode, prompt))

        def feed(delta: Delta) -> tuple[Delta]:
            reasoning, text = split.feed(delta.text)
            if delta.finish_reason is not None:
                rest = split.finish()
                reasoning, text = reasoning + rest[0], text + rest[1]
            return (replace(delta, text=text, reasoning=reasoning),)

        return deltas.then(lambda: Stage(feed))

    return DeltaStream.deferred(make)


def chat_message(
    llm: LLM, messages: Sequence[Message], params: SamplingParams | None = None, **template_kwargs: Any
) -> Message:
    """The assistant's whole reply to ``messages`` as the message to send back on the next turn: the
    answer as ``content``, with the thinking as ``reasoning_content`` when there is any (OpenAI's and
    vLLM's shape; Qwen3's template reads it)."""
    answer, reasoning = [], []
    for delta in chat_stream(llm, messages, params, **template_kwargs):
        answer.append(delta.text)
        reasoning.append(delta.reasoning)
    return assistant_message("".join(answer), "".join(reasoning))


def assistant_message(answer: str, reasoning: str) -> Message:
    """A reply as the history keeps it: the thinking apart, where the template looks for it."""
    thought = {"reasoning_content": reasoning} if reasoning else {}
    return {"role": "assistant", "content": answer.strip(), **thought}


def chat(
    llm: LLM, messages: Sequence[Message], params: SamplingParams | None = None, **template_kwargs: Any
) -> str:
    """The assistant's whole answer to ``messages`` (without its thinking: ``chat_message`` has both)."""
    return chat_message(llm, messages, params, **template_kwargs)["content"]


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
        check_template_kwargs(self.template_kwargs)

    def messages(self, user_text: str) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user_text}]

    def stream(self, user_text: str) -> DeltaStream[Delta]:
        """Stream the reply as ``chat_stream`` does (the answer in ``text``, the thinking in ``reasoning``;
        ``for`` or ``async for``). The turn joins the history when the reply ends or is interrupted after
        it began (a prompt that does not fit, or a failure before any text, leaves the history as it
        was)."""

        def make() -> DeltaStream[Delta]:
            if not isinstance(user_text, str):
                raise ChatError(f"the user's text must be a string, got {user_text!r:.60}")
            self.completion = None
            deltas = chat_stream(self.llm, self.messages(user_text), self.params, **self.template_kwargs)
            return deltas.then(lambda: self._turn(user_text))

        return DeltaStream.deferred(make)

    def _turn(self, user_text: str) -> Stage[Delta, Delta]:
        """The stage that keeps the reply's text and joins the turn to the history when it ends."""
        answer: list[str] = []
        reasoning: list[str] = []

        def feed(delta: Delta) -> tuple[Delta]:
            answer.append(delta.text)
            reasoning.append(delta.reasoning)
            self.completion = delta.completion
            return (delta,)

        def end() -> None:
            if answer:  # it began
                self.history += [
                    {"role": "user", "content": user_text},
                    assistant_message("".join(answer), "".join(reasoning)),
                ]

        return Stage(feed, end)

    def ask(self, user_text: str) -> DeltaStream[str]:
        """Stream the answer's text (``stream`` has the thinking too; ``for`` or ``async for``); the turn
        joins the history as ``stream``'s does."""
        return self.stream(user_text).then(lambda: Stage(lambda delta: (delta.text,) if delta.text else ()))
