"""Records -> token ids + labels, with the model's own chat template (the text chat and serve render).

The whole conversation is rendered once and tokenized once; which tokens carry a label is decided from
character offsets into that text, never by tokenizing turn by turn (a reply starting with a newline
merges with the header's newline into one token when tokenized whole). Qwen v1 is the exception: its
chat is built in code, each text part encoded on its own (`make_context`, finetune.py `preprocess`), and
fine-tuning takes those very ids and their reply segments (`Tokenizer.chat_segments`).

Labelled: each assistant turn's body (content, non-empty reasoning, tool calls) and its ``<|im_end|>``.
Not labelled: ``<|im_start|>``, role headers, system/user/tool turns, the newline after ``<|im_end|>``,
and an empty ``<think>\\n\\n</think>\\n\\n`` block (Qwen3 puts it in the prompt when thinking is off).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from qwenkit.finetune.data import DataError, Record
from qwenkit.tokenizer import Tokenizer, TokenizerError

IGNORE = -100
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ASSISTANT_HEADER = "assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"


@dataclass
class Example:
    """``labels[i]`` is ``ids[i]`` where the model is trained to produce token i, else -100."""

    ids: list[int]
    labels: list[int]
    where: str = ""
    segments: tuple[int, ...] = ()  # lengths of the examples packed into this row (empty: not packed)

    @property
    def n_labelled(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # cut to max_len
    dropped: int = 0  # nothing left to learn after truncation
    tokens: int = 0
    labelled_tokens: int = 0
    packed_rows: int = 0  # rows the examples were packed into (0: not packed)

    def summary(self) -> str:
        packed = f", packed into {self.packed_rows} rows" if self.packed_rows else ""
        return (
            f"{self.examples} examples, {self.tokens} tokens ({self.labelled_tokens} labelled), "
            f"{self.truncated} truncated to --max-len, {self.dropped} dropped (no labelled token left)"
            f"{packed}"
        )


def encode_messages(tokenizer: Tokenizer, messages, tools=None) -> tuple[list[int], list[int]]:
    """(ids, labels) of a whole conversation rendered by the tokenizer's chat template."""
    for token in (IM_START, IM_END):
        if token not in tokenizer.added_tokens:
            raise TokenizerError(f"fine-tuning needs a ChatML chat template; the tokenizer has no {token}")
    segments = tokenizer.chat_segments(messages, tools, add_generation_prompt=False)
    if segments is not None:  # built in code (Qwen v1): the same ids chat prompts with
        ids = [token for part, _ in segments for token in part]
        labels = [token if is_reply else IGNORE for part, is_reply in segments for token in part]
        return ids, labels
    ids: list[int] = []
    spans: list[tuple[int, int]] = []  # char span of each token in `text`
    text = ""
    template_tokens: list[tuple[int, str]] = []  # (char position, token) of the template's own tokens
    any_token = re.compile("|".join(map(re.escape, sorted(tokenizer.control_tokens, key=len, reverse=True))))
    pieces = tokenizer.chat_pieces(messages, tools, add_generation_prompt=False)
    for piece, from_user in pieces:
        if from_user:
            _append_text(tokenizer, piece, ids, spans, len(text))
            text += piece
            continue
        pos = 0
        for m in any_token.finditer(piece):
            _append_text(tokenizer, piece[pos : m.start()], ids, spans, len(text) + pos)
            ids.append(tokenizer.added_tokens[m.group()])
            spans.append((len(text) + m.start(), len(text) + m.end()))
            template_tokens.append((len(text) + m.start(), m.group()))
            pos = m.end()
        _append_text(tokenizer, piece[pos:], ids, spans, len(text) + pos)
        text += piece
    intervals = _assistant_intervals(text, template_tokens)
    n_assistant = sum(1 for m in messages if m.get("role") == "assistant")
    if len(intervals) != n_assistant:
        raise TokenizerError(
            f"the chat template rendered {len(intervals)} assistant turns for {n_assistant} messages"
        )
    labels = _label(ids, spans, intervals)
    return ids, labels


def _append_text(tokenizer: Tokenizer, text: str, ids: list[int], spans: list[tuple[int, int]], at: int):
    """Encode ``text`` (no control tokens) and record each token's char span from its byte length."""
    if not text:
        return
    new = tokenizer.encode_plain(text)
    starts = [0]  # byte offset where each char starts
    for ch in text:
        starts.append(starts[-1] + len(ch.encode("utf-8")))
    byte = 0
    for token_id in new:
        n = len(tokenizer.token_bytes(token_id))
        a = bisect.bisect_right(starts, byte) - 1
        b = bisect.bisect_left(starts, byte + n)
        spans.append((at + a, at + min(b, len(text))))
        byte += n
    ids += new


def _assistant_intervals(text: str, template_tokens: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """[start, end) char spans of assistant bodies + their <|im_end|>, from the template's own tokens."""
    out = []
    open_at = None
    for pos, token in template_tokens:
        if token == IM_START:
            head = pos + len(IM_START)
            open_at = head + len(ASSISTANT_HEADER) if text.startswith(ASSISTANT_HEADER, head) else None
        elif token == IM_END and open_at is not None:
            start = open_at
            if text.startswith(EMPTY_THINK, start):
                start += len(EMPTY_THINK)
            out.append((start, pos + len(IM_END)))
            open_at = None
    return out


def _label(ids: list[int], spans: list[tuple[int, int]], intervals: list[tuple[int, int]]) -> list[int]:
    """A token is labelled when its characters overlap an assistant interval."""
    labels = [IGNORE] * len(ids)
    k = 0
    for i, (a, b) in enumerate(spans):
        while k < len(intervals) and intervals[k][1] <= a:
            k += 1
        if k < len(intervals) and a < intervals[k][1] and b > intervals[k][0]:
            labels[i] = ids[i]
    return labels


def end_of_text_id(tokenizer: Tokenizer) -> int:
    """<|endoftext|> (Qwen's document end and pad); else the tokenizer's eos."""
    if "<|endoftext|>" in tokenizer.added_tokens:
        return tokenizer.added_tokens["<|endoftext|>"]
    if tokenizer.eos_token_ids:
        return min(tokenizer.eos_token_ids)
    raise TokenizerError("the tokenizer has neither <|endoftext|> nor an eos token")


def encode_record(tokenizer: Tokenizer, record: Record) -> Example:
    if record.text is not None:  # a document as the model reads raw text: its BOS first where it has one
        before, _ = tokenizer.sequence_special_ids
        ids = [*before, *tokenizer.encode_plain(record.text), end_of_text_id(tokenizer)]
        return Example(ids, list(ids), record.where)
    try:
        ids, labels = encode_messages(tokenizer, record.messages, record.tools)
    except TokenizerError as e:
        raise DataError(f"{record.where}: {e}") from None
    return Example(ids, labels, record.where)


def encode_all(
    tokenizer: Tokenizer, records: list[Record], max_len: int, stats: EncodeStats | None = None
) -> list[Example]:
    """Encode, truncate to ``max_len`` (counted), drop examples left without a labelled token (counted)."""
    stats = stats if stats is not None else EncodeStats()
    out = []
    for record in records:
        ex = encode_record(tokenizer, record)
        if len(ex.ids) > max_len:
            ex = Example(ex.ids[:max_len], ex.labels[:max_len], ex.where)
            stats.truncated += 1
        if all(label == IGNORE for label in ex.labels[1:]):  # label 0 is never predicted
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.tokens += len(ex.ids)
        stats.labelled_tokens += ex.n_labelled
        out.append(ex)
    return out


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Concatenate consecutive examples into rows of at most ``max_len`` tokens (fewer pad tokens).

    Each row remembers its examples' lengths (``segments``): the trainer restarts positions at 0 for each
    and lets a token attend only within its own example, so a packed row computes exactly what its
    examples would one by one. Each example's first token is unlabelled, as it is unpredicted alone.
    """
    rows: list[Example] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    lengths: list[int] = []
    for ex in examples:
        if cur_ids and len(cur_ids) + len(ex.ids) > max_len:
            rows.append(Example(cur_ids, cur_labels, "packed", tuple(lengths)))
            cur_ids, cur_labels, lengths = [], [], []
        cur_ids.extend(ex.ids)
        cur_labels.extend([IGNORE, *ex.labels[1:]])
        lengths.append(len(ex.ids))
    if cur_ids:
        rows.append(Example(cur_ids, cur_labels, "packed", tuple(lengths)))
    return rows
