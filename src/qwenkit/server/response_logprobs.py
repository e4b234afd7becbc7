"""``/v1/responses`` log-probabilities (``include: ["message.output_text.logprobs"]``): each
``output_text`` part carries the entries of exactly the tokens that wrote its text, never those of the
reasoning before ``</think>``, the whitespace the parser drops after it, or the end-of-turn token.

The parser hands out text, not tokens, so the tokens are placed by where their text falls: every token
the engine chose (less the hidden end tokens) is detokenized again, as the engine's text was, and so
spans a range of the reply's characters; a piece of output text that ends at character ``end`` takes
every token not yet given out that starts before ``end``. A token whose bytes end inside a character
(half a Chinese character) spans nothing and goes with the one that completes it. This holds while the
reply's text is the tokens' text unchanged and message text is one stretch at its end: tool-call markup
and stop strings (which cut the text inside a token) break it, so those requests are refused.
"""

from __future__ import annotations

from typing import Any

from qwenkit.engine.request import TokenLogprob
from qwenkit.generate import LLM
from qwenkit.server.errors import APIError
from qwenkit.server.logprobs import chat_logprobs
from qwenkit.server.schemas import ChatCompletionRequest
from qwenkit.tokenizer import StreamingDetokenizer
from qwenkit.tools.calls import Event

INCLUDE = "message.output_text.logprobs"


def refuse_unaligned(chat: ChatCompletionRequest) -> None:
    """What would leave tokens and output text out of step: refused by name before anything runs."""
    if chat.tools and chat.tool_choice != "none":
        raise APIError(
            400,
            f'include {INCLUDE} is not supported with tools (tool_choice other than "none"): call markup '
            "splits the text from its tokens",
            "include",
            "unsupported",
        )
    if chat.stop:
        raise APIError(
            400,
            f"stop strings are not supported with include {INCLUDE}: the text may end inside a token",
            "stop",
            "unsupported",
        )


class TextLogprobs:
    """One reply's token entries, given out with the output text they wrote (see the module's note)."""

    def __init__(self, llm: LLM, hidden: frozenset[int]) -> None:
        self.llm, self.hidden = llm, hidden
        self.detok = StreamingDetokenizer(llm.tokenizer, skip_special=True)  # as the engine's text
        self.spans: list[list[Any]] = []  # per token: [start, end) in the reply's text, its TokenLogprob
        self.given = 0  # tokens placed so far (given out, or passed over as not message text)

    def add(self, logprobs: list[TokenLogprob], final: bool) -> None:
        """The next tokens' entries; ``final`` with the reply's last (a cut-off character is flushed)."""
        made = self.spans[-1][1] if self.spans else 0
        for lp in logprobs:
            if lp.token_id not in self.hidden:
                start, made = made, made + len(self.detok.add(lp.token_id))
                self.spans.append([start, made, lp])
        tail = self.detok.finalize() if final else ""
        if tail and self.spans:
            self.spans[-1][1] += len(tail)

    def take(self, start: int, end: int) -> list[dict[str, Any]]:
        """Entries of the tokens that wrote the reply's characters ``[start, end)``; tokens wholly before
        ``start`` (reasoning, dropped whitespace) are passed over. A token that runs from dropped
        whitespace into the message (`` Hello`` right after ``</think>``) wrote some of it: it is kept."""
        chosen = []
        while self.given < len(self.spans):
            first, last, lp = self.spans[self.given]
            if first >= end:
                break
            if first >= start or last > start:
                chosen.append(lp)
            self.given += 1
        return chat_logprobs(self.llm, chosen, frozenset())["content"]

    def for_events(self, events: list[Event], end: int) -> list[list[dict[str, Any]]]:
        """Per event, the entries of its text when it is message text (else none). ``end``: characters
        of the reply seen so far; the message text among ``events`` ends there (nothing is held back
        without tool parsing)."""
        at = end - sum(len(e.text) for e in events if e.kind == "content")
        out = []
        for e in events:
            if e.kind == "content":
                out.append(self.take(at, at + len(e.text)))
                at += len(e.text)
            else:
                out.append([])
        return out
