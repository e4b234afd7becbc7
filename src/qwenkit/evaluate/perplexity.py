"""Perplexity over a text file with a sliding window and a stride, per token and per byte.

Hugging Face's "perplexity of fixed-length models" method: windows of ``window`` tokens start every
``stride`` tokens (``stride < window``); each window scores only the tokens no earlier window scored,
with the rest of the window as context, so every token after the first is scored exactly once, with at
least one token of context (``stride = window - 1`` is lm-eval's rolling windows; a smaller stride gives
each scored token more context and a lower perplexity). The text's first token is context only. Per
byte figures (``bits_per_byte``, ``byte_perplexity``) divide by the text's UTF-8 bytes instead, which
makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenkit.evaluate.backends import Backend
from qwenkit.evaluate.data import EvalDataError
from qwenkit.paths import not_a_file


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window; every position 1..n-1 is scored exactly once."""
    if window < 2 or not 1 <= stride < window:
        raise EvalDataError(
            f"need window >= 2 and 1 <= stride < window; got window {window}, stride {stride}"
        )
    spans, scored_to = [], 1
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + window, n_tokens)
        if end > scored_to:
            spans.append((begin, end, max(scored_to, begin + 1)))
            scored_to = end
        if end == n_tokens:
            break
    return spans


def perplexity(
    backend: Backend,
    text: str,
    window: int,
    stride: int,
    chunk: int = 16,
    report: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The text's perplexity; its windows are scored ``chunk`` at a time, each chunk's end told to
    ``report(windows scored, windows in all)`` (a long text's progress: it is one item of a run)."""
    ids = backend.encode_prompt(text)  # a BOS first where the model has one, as the transformers guide
    if len(ids) < 2:
        raise EvalDataError("the text is shorter than two tokens: nothing to score")
    spans = windows(len(ids), window, stride)
    limit = backend.max_context()
    if limit is not None and min(window, len(ids)) > limit:
        # the network would run past its context (no engine checks this path) and score untrained positions
        raise EvalDataError(
            f"--window {window} is past the model's context of {limit} tokens: "
            f"give a window of at most {limit}"
        )
    nll, count = 0.0, 0
    if report is not None:
        report(0, len(spans))  # a bar at 0 while the first chunk is scored
    for at in range(0, len(spans), chunk):
        part = spans[at : at + chunk]
        # each window scores from its first new token: its context gets no output head
        for scored in backend.sequence_logprobs([ids[b:e] for b, e, _ in part], [f - b for b, _, f in part]):
            nll -= sum(scored)
            count += len(scored)
        if report is not None:
            report(at + len(part), len(spans))
    n_bytes = len(text.encode("utf-8"))
    return {
        "tokens_scored": count,
        "bytes": n_bytes,
        "nll_sum": nll,
        "token_perplexity": math.exp(nll / count),
        "byte_perplexity": math.exp(nll / n_bytes),
        "bits_per_byte": nll / n_bytes / math.log(2),
        "window": window,
        "stride": stride,
        "windows": len(spans),
        "bos": (
            "the tokenizer's BOS leads, as context only: every token of the text is scored"
            if len(ids) > len(backend.encode(text))  # encode_prompt added it
            else "none (the text's first token is context only)"
        ),
    }


def read_text(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        raise EvalDataError(f"perplexity needs a text file: {p} is a directory")
    if (why := not_a_file(p)) is not None:
        raise EvalDataError(f"perplexity needs a text file: {p} {why}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EvalDataError(f"{p} is not UTF-8 text") from None
