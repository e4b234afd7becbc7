"""Log-probabilities in the OpenAI shapes: the chat route's per-token entries, and ``/v1/completions``'
legacy parallel arrays, whose ``text_offset`` points into the choice's text (an echoed prompt's too)."""

from __future__ import annotations

from dataclasses import dataclass

from qwenkit.engine.request import TokenLogprob
from qwenkit.generate import LLM
from qwenkit.tokenizer import StreamingDetokenizer


@dataclass(frozen=True)
class PromptEcho:
    """What ``echo`` shows of a prompt. A text prompt comes back as the client wrote it, as vLLM echoes it:
    the sequence tokens its tokenizer put around it (Llama's BOS) are in the logprobs, at no width in the
    text. Token ids come back decoded."""

    text: str
    hidden_before: int = 0
    hidden_after: int = 0

    @classmethod
    def of(cls, llm: LLM, prompt: str | list[int], prompt_ids: list[int]) -> PromptEcho:
        if isinstance(prompt, str):
            before, after = llm.tokenizer.sequence_special_ids
            return cls(prompt, len(before), len(after))
        return cls(decoded(llm, prompt_ids))

    def shown(self, n_tokens: int) -> list[bool]:
        """Per prompt token: does it take room in ``text``."""
        inner = n_tokens - self.hidden_before - self.hidden_after
        return [False] * self.hidden_before + [True] * inner + [False] * self.hidden_after


def token_bytes(llm: LLM, token_id: int) -> bytes:
    """A token's bytes; none for an embedding-padding id (the model's vocabulary can be larger than the
    tokenizer's, and a sampled or top-k id may land there)."""
    if not 0 <= token_id < llm.tokenizer.vocab_size:
        return b""
    return llm.tokenizer.token_bytes(token_id)


def decoded(llm: LLM, token_ids: list[int]) -> str:
    """The text of ids (an echoed prompt, /detokenize's): embedding-padding ids have none, as in a
    completion's text and transformers' decode."""
    known = llm.tokenizer.vocab_size
    return llm.tokenizer.decode([t for t in token_ids if t < known])


def token_text(llm: LLM, token_id: int) -> str:
    return token_bytes(llm, token_id).decode("utf-8", errors="replace")


def chat_logprobs(llm: LLM, logprobs: list[TokenLogprob], hidden: frozenset[int]) -> dict:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""

    def entry(token_id: int, lp: float) -> dict:
        raw = token_bytes(llm, token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in logprobs
            if lp.token_id not in hidden
        ]
    }


class LegacyLogprobs:
    """One choice's /v1/completions logprobs: parallel arrays over (token id, logprob) pairs, each token's
    ``text_offset`` a character offset into the choice's text. Streamed, each chunk's pairs go through the
    same object, so offsets count on from the chunks before."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.detok = StreamingDetokenizer(llm.tokenizer, skip_special=False)
        self.offset = 0

    def add(self, items: list[tuple[int, TokenLogprob | None]]) -> dict:
        """The answer's pairs: a special token (<|im_end|> under ignore_eos) has no text in the answer,
        which skips them, so it takes no width (its 10 characters put the offsets after it past the
        text)."""
        special = self.llm.tokenizer.special_token_ids
        return self._arrays(items, [0 if t in special else len(self.detok.add(t)) for t, _ in items])

    def add_echoed(
        self, echo: PromptEcho, prompt: list[tuple[int, TokenLogprob | None]], items: list
    ) -> dict:
        """The echoed prompt's pairs, then ``items``. Prompt offsets point into ``echo.text``: hidden
        tokens (the BOS) take no width, and neither does the first "▁" space a SentencePiece decoder
        strips from the text but the stream keeps."""
        shown = echo.shown(len(prompt))
        widths = [len(self.detok.add(t)) if seen else 0 for (t, _), seen in zip(prompt, shown, strict=True)]
        excess = sum(widths) - len(echo.text)
        for i, width in enumerate(widths):
            if excess <= 0:
                break
            cut = min(width, excess)
            widths[i], excess = width - cut, excess - cut
        arrays = self._arrays(prompt, widths)
        self.offset = len(echo.text)  # where a normalizing tokenizer changed the text, the answer starts here
        for key, values in self.add(items).items():
            arrays[key] += values
        return arrays

    def _top(self, lp: TokenLogprob) -> dict[str, float]:
        """A token's alternatives, most likely first, and the token itself where it is not among them:
        "up to logprobs+1 elements", as OpenAI documents and vLLM returns (so logprobs 0 gives the token's
        own entry, not {})."""
        top = {token_text(self.llm, t): v for t, v in lp.top}
        if all(t != lp.token_id for t, _ in lp.top):
            top.setdefault(token_text(self.llm, lp.token_id), lp.logprob)
        return top

    def _arrays(self, items: list[tuple[int, TokenLogprob | None]], widths: list[int]) -> dict:
        llm = self.llm
        tokens, token_lps, tops, offsets = [], [], [], []
        for (token_id, lp), width in zip(items, widths, strict=True):
            tokens.append(token_text(llm, token_id))
            offsets.append(self.offset)
            self.offset += width
            token_lps.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else self._top(lp))
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
