"""Incremental detokenization: text appears as soon as its UTF-8 bytes are complete, never half a char."""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from qwenkit.tokenizer.base import Tokenizer


class StreamingDetokenizer:
    """Feed token ids, get the newly printable text.

    A Chinese character or emoji whose bytes span several tokens is held back until its last byte
    arrives, then emitted once, whole. Each token costs O(its bytes): an incremental UTF-8 decoder keeps
    the incomplete tail, so long outputs are never re-decoded. The concatenated output equals
    `tokenizer.decode(all_ids, skip_special=skip_special)`, but where a SentencePiece-style decoder strips
    the first token's "▁" space, which the stream keeps (as vLLM's does after a prompt).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_token_ids if skip_special else frozenset()
        # A model's embedding is often padded past the tokenizer (Qwen: 151,936 rows for ~151,670
        # tokens); a sampled padding id has no text, as in transformers' decode.
        self._known = tokenizer.vocab_size
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self.token_ids: list[int] = []

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append one id or several; return the text that became printable."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        self.token_ids += ids
        data = b"".join(
            self._tokenizer.token_bytes(i) for i in ids if i not in self._skip and 0 <= i < self._known
        )
        new = self._decoder.decode(data)
        if new:
            self._parts.append(new)
        return new

    def finalize(self) -> str:
        """Flush a trailing incomplete character (as U+FFFD) and reset for reuse of the decoder state."""
        new = self._decoder.decode(b"", final=True)
        if new:
            self._parts.append(new)
        self._decoder.reset()
        return new

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""
