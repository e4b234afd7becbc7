"""A request's text as it is generated: incremental detokenizing, stop strings and stop tokens, and what the
caller gets back (``Completion``, one streamed ``Delta``). Shared by every front end through ``generate.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from qwenkit.engine import FinishReason, SamplingParamsError, StepOutput, TokenLogprob
from qwenkit.tokenizer import StreamingDetokenizer, Tokenizer
from qwenkit.tokenizer.thinking import partial_suffix


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    # what stopped it, as vLLM's stop_reason: the stop string, or the stop_token_ids id (None: eos, length)
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when finish_reason is "error"
    prefill_seconds: float = 0.0  # from submission to the first token
    queue_seconds: float | None = None  # from submission to its first step (None: it never had one)
    decode_seconds: float = 0.0  # from the first token to the last


@dataclass
class Delta:
    """One streamed increment: new token ids and the text they completed. The last one carries the
    finish reason and the whole Completion (token ids, text, logprobs, timings)."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    completion: Completion | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, on the first Delta, when asked for
    reasoning: str = ""  # a chat reply's new thinking (Qwen3's <think>); its ``text`` is the answer's


class TextState:
    """Per-request text bookkeeping: incremental detokenizing and stop-string search.

    Stop tokens (EOS, the end-of-turn token, ``stop_token_ids``) end the request but never show in the
    text, as in the OpenAI API.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        completion: Completion,
        stop: Sequence[str],
        hidden_ids: frozenset[int] = frozenset(),
        include_stop: bool = False,
        ending_ids: frozenset[int] | None = None,
        stop_token_ids: frozenset[int] = frozenset(),
        min_tokens: int = 0,
    ) -> None:
        self.detok = StreamingDetokenizer(tokenizer, skip_special=True)  # no <|im_end|> in replies
        self.completion = completion
        self.stop = tuple(stop)
        # a stop string that spells a special token ("<|im_start|>") never appears in the text, which
        # skips that token: the token itself is the stop (as koboldcpp matches one; vLLM never stops).
        # One that holds a special token's text and more could never be found (vLLM runs on): refused.
        specials = (
            [t for t, i in tokenizer.added_tokens.items() if i in tokenizer.special_token_ids and t]
            if self.stop
            else []
        )  # most requests have no stop string: no walk of the added tokens for them
        for s, special in ((s, t) for s in self.stop for t in specials if t in s and t != s):
            raise SamplingParamsError(
                f"stop string {s!r} holds the special token {special} and other text, but special tokens "
                f"never show in the text, so it could never be found: stop on {special!r} alone"
            )
        # Tokens the engine ends on (``ending_ids``: eos unless ignore_eos, stop_token_ids; by default the
        # hidden ones) keep their own meaning: the reply ends on them without their text.
        ending_ids = hidden_ids if ending_ids is None else ending_ids
        self.stop_tokens = {
            token: s
            for s in self.stop
            if (token := tokenizer.added_tokens.get(s)) in tokenizer.special_token_ids
            and token not in ending_ids
        }
        self.hidden_ids, self.stop_token_ids = hidden_ids, stop_token_ids
        self.include_stop = include_stop  # keep the stop string found at the end of the text
        self.held = ""  # text withheld because it might be the start of a stop string
        # min_tokens (vLLM's): a stop string must end past the text of the first min_tokens tokens, which
        # ends at this offset into the reply's text (held text included)
        self.min_tokens, self.floor_end = min_tokens, 0
        self.start = time.perf_counter()
        self.first_token_at: float | None = None

    def feed(self, token_ids: list[int], finish: FinishReason | None) -> str:
        """Add tokens; return the text safe to emit now. A stop string found sets finish_reason "stop"."""
        now = time.perf_counter()
        if self.first_token_at is None and token_ids:
            self.first_token_at = now
        c = self.completion
        floor = max(self.min_tokens - len(c.token_ids), 0)  # these first new tokens may not stop it
        c.token_ids += token_ids
        at = next(
            (k for k, t in enumerate(token_ids) if t in self.stop_tokens and k >= floor), len(token_ids)
        )
        pieces = [self.detok.add(t) if t not in self.hidden_ids else "" for t in token_ids[:at]]
        if finish is not None or at < len(token_ids):
            pieces.append(self.detok.finalize())
        text = self.held + "".join(pieces)
        if floor:
            self.floor_end = len(c.text) + len(self.held) + sum(map(len, pieces[:floor]))
        self.held = ""
        stopped = False
        if self.stop:
            # the earliest stop string found (of two at one place, the longer), ending past min_tokens' text
            after = self.floor_end - len(c.text)
            found = min(
                ((i, -len(s), s) for s in self.stop if (i := text.find(s, max(after - len(s) + 1, 0))) >= 0),
                default=None,
            )
            if found is not None:
                cut, length, c.stop_reason = found
                text, stopped = text[: cut - length if self.include_stop else cut], True
            elif at < len(token_ids):  # a stop token, after all of the text before it
                stopped, c.stop_reason = True, self.stop_tokens[token_ids[at]]
                if self.include_stop:
                    text += c.stop_reason
            elif finish is None:
                keep = _partial_stop_suffix(text, self.stop)
                text, self.held = text[: len(text) - keep], text[len(text) - keep :]
        c.text += text
        if finish == "stop" and not stopped and token_ids and token_ids[-1] in self.stop_token_ids:
            c.stop_reason = token_ids[-1]
        if finish is not None or stopped:
            c.finish_reason = "stop" if stopped else finish
            c.prefill_seconds = (self.first_token_at or now) - self.start
            c.decode_seconds = now - (self.first_token_at or now)
        return text

    def on_output(self, out: StepOutput) -> Delta:
        """Turn one engine output into a Delta (the last one carries the whole Completion)."""
        c = self.completion
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        c.num_cached_tokens = max(c.num_cached_tokens, out.num_cached_tokens)
        if out.scheduled_at is not None and c.queue_seconds is None:
            c.queue_seconds = max(out.scheduled_at - self.start, 0.0)
        c.logprobs += out.logprobs
        if out.error:
            c.error = out.error
        text = self.feed(out.new_token_ids, out.finish_reason)
        done = c if c.finish_reason else None
        return Delta(out.new_token_ids, text, c.finish_reason, done, out.logprobs, out.prompt_logprobs)


def _partial_stop_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of some stop string."""
    return max((partial_suffix(text, s) for s in stops), default=0)
