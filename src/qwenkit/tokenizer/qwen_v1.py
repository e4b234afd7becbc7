"""Qwen v1 (`qwen.tiktoken`): tiktoken rank-BPE with Qwen's regex and its 208 special tokens.

Reproduces `QWenTokenizer` from the Qwen-7B repository (qwen_facts §6.1-6.4): NFC first, digits split
one at a time, token id == rank. Chat is ChatML built like `make_context` (see chatml.py).
"""

from __future__ import annotations

import base64
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qwenkit.tokenizer.base import Tokenizer
from qwenkit.tokenizer.byte_level import bytes_to_piece, piece_to_bytes
from qwenkit.tokenizer.chat_template import chatml_template
from qwenkit.tokenizer.errors import TokenizerError
from qwenkit.tokenizer.length_bound import LengthBound, ranks_longest_token

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_START_ID = 151643
SPECIAL_TOKENS: dict[str, int] = {
    tok: SPECIAL_START_ID + i
    for i, tok in enumerate((ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{n}|>" for n in range(205))))
}


def load_tiktoken_bpe(path: str | Path) -> dict[bytes, int]:
    """Read `base64(token) rank` lines (blank lines skipped) into {token bytes: rank}."""
    try:
        data = Path(path).read_bytes()
        lines = (line.split() for line in data.splitlines() if line)
        ranks = {base64.b64decode(tok, validate=True): int(rank) for tok, rank in lines}
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise TokenizerError(f"{path} is not a tiktoken file (expected 'base64 rank' lines)") from None
    if not ranks:
        raise TokenizerError(f"{path} is empty")
    return ranks


class QwenV1Tokenizer(Tokenizer):
    """Qwen v1's tokenizer on `tiktoken`; chat is ChatML with make_context's ids (no tool support)."""

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> None:
        import tiktoken  # only for a Qwen v1 tokenizer: every other start leaves it unimported

        self._ranks = dict(mergeable_ranks)
        self._enc = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=self._ranks, special_tokens=SPECIAL_TOKENS
        )
        config = dict(tokenizer_config or {})
        # v1 repos carry no chat_template; its chat is ChatML (qwen_facts §7.1).
        self._builtin_template = not config.get("chat_template")
        template = config.get("chat_template") or chatml_template()
        super().__init__(
            added_tokens=SPECIAL_TOKENS,
            special_token_ids=SPECIAL_TOKENS.values(),
            chat_template=template,
            tokenizer_config=config,
            generation_config=generation_config,
            default_eos=ENDOFTEXT,  # eod: the token `generate` stops on (§7.2)
        )

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> QwenV1Tokenizer:
        """Load a `qwen.tiktoken` file."""
        return cls(load_tiktoken_bpe(path), tokenizer_config, generation_config)

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def stop_token_ids(self) -> frozenset[int]:  # type: ignore[override]
        """eod plus ChatML's stop words [[im_end], [im_start]] (§7.2)."""
        return frozenset(self.eos_token_ids | {SPECIAL_TOKENS[IM_END], SPECIAL_TOKENS[IM_START]})

    def token_length_bound(self) -> LengthBound | None:
        longest = ranks_longest_token(self._ranks, SPECIAL_TOKENS)
        return None if longest is None else LengthBound(longest, nfc=True)  # its encodes normalize to NFC

    def encode_plain(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(unicodedata.normalize("NFC", text))

    def encode_with_added(self, text: str) -> list[int]:
        return self._enc.encode(
            unicodedata.normalize("NFC", text), allowed_special="all", disallowed_special=()
        )

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i < SPECIAL_START_ID]
        try:
            return self._enc.decode(ids, errors="replace")
        except KeyError as e:
            raise TokenizerError(f"unknown token id {e.args[0]}") from None

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self._enc.decode_single_token_bytes(token_id)
        except KeyError:
            raise TokenizerError(f"unknown token id {token_id}") from None

    def id_to_piece(self, token_id: int) -> str:
        if token_id >= SPECIAL_START_ID:
            return self.token_bytes(token_id).decode()
        return bytes_to_piece(self.token_bytes(token_id))

    def token_to_id(self, piece: str) -> int | None:
        if piece in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[piece]
        try:
            return self._ranks.get(piece_to_bytes(piece))
        except KeyError:
            return None

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """{token bytes: rank}; the tiktoken -> tokenizer.json converter reads it."""
        return self._ranks

    def chat_segments(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool | str = False,
        check_texts: Callable[[Sequence[str]], None] | None = None,
    ) -> list[tuple[list[int], bool]] | None:
        """ChatML ids built exactly like Qwen's `make_context` and finetune.py: roles and contents encoded
        as plain text, each on its own, control tokens inserted as ids. A tokenizer_config chat_template,
        if present, is used instead (None)."""
        if not self._builtin_template:
            return None
        from qwenkit.tokenizer.chatml import chatml_segments

        if tools:
            raise TokenizerError("Qwen v1's ChatML has no tool support (use a ReAct prompt in the user turn)")
        return chatml_segments(
            self,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            check_texts=check_texts,
        )
