"""Qwen1.5 / Qwen2 / Qwen2.5 / Qwen3 tokenizers: `tokenizer.json` through the `tokenizers` library."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders

from qwenkit.tokenizer.base import Tokenizer, token_text
from qwenkit.tokenizer.byte_level import piece_to_bytes
from qwenkit.tokenizer.errors import TokenizerError
from qwenkit.tokenizer.length_bound import LengthBound, hf_length_bound

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback: one raw byte


def sequence_special_ids(backend: tokenizers.Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids transformers' `tokenizer(text)` adds before and after a text's own: those of tokenizer.json's
    post_processor (Llama-3's TemplateProcessing prepends <|begin_of_text|>, Llama-2's <s>; Qwen2's
    ByteLevel adds nothing; a GGUF's is built from tokenizer.ggml.add_bos_token).

    tokenizer_config.json's add_bos_token is not read: transformers drops it wherever a tokenizer.json
    exists, so the post_processor alone decides there too.
    """
    probe = backend.encode("a", add_special_tokens=True)
    text_at = [i for i, seq in enumerate(probe.sequence_ids) if seq is not None]
    if not text_at:  # the probe text gave no token of its own, so before cannot be told from after
        if probe.ids:
            raise TokenizerError("cannot tell which tokens tokenizer.json's post_processor puts first")
        return (), ()
    return tuple(probe.ids[: text_at[0]]), tuple(probe.ids[text_at[-1] + 1 :])


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the tokenizer_config.json (template, eos) and generation_config.json.

    Built from objects so the GGUF importer can hand over a tokenizer it assembled from GGUF metadata.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        end_of_generation: Iterable[int] = (),
    ) -> None:
        """``end_of_generation``: more ids that end a generation (a GGUF's, as llama.cpp reads them)."""
        self._tok = backend
        # A tokenizer.json may carry truncation or padding for some training job; a prompt cut silently
        # or padded would be a wrong answer, and the context is checked where prompts are admitted.
        backend.no_truncation()
        backend.no_padding()
        # Plain text goes through a second pipeline over the same model, normalizer and pre-tokenizer (shared,
        # not copied) that knows no added tokens: `tokenizers` cannot switch off non-special ones (<think>,
        # <tool_call>) per call. Its encode_batch lets other threads run, as the step-by-step pipeline
        # (pre_tokenize_str, model.tokenize) did not: a 2 MB prompt holding "<think>" held the interpreter,
        # and the server's event loop, 1.4 s.
        self._plain = tokenizers.Tokenizer(backend.model)
        self._plain.normalizer = backend.normalizer
        self._plain.pre_tokenizer = backend.pre_tokenizer
        config = dict(tokenizer_config or {})
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        super().__init__(
            added_tokens={tok.content: i for i, tok in sorted(added.items())},
            special_token_ids=[i for i, tok in added.items() if tok.special],
            chat_template=config.get("chat_template"),  # one, or named ones (`named_templates`)
            tokenizer_config=config,
            generation_config=generation_config,
            sequence_special_ids=sequence_special_ids(backend),
        )
        self.eos_token_ids = self.eos_token_ids | frozenset(end_of_generation)
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._byte_fallback = bool(getattr(backend.model, "byte_fallback", False))
        self._added_by_id = {i: tok.content for i, tok in added.items()}
        if token_text(config.get("eos_token")) and not self.eos_token_ids:
            raise TokenizerError(
                f"eos_token {token_text(config.get('eos_token'))!r} is not in the vocabulary"
            )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (e.g. for saving as tokenizer.json)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_length_bound(self) -> LengthBound | None:
        return hf_length_bound(self._tok)

    def encode_plain(self, text: str) -> list[int]:
        # encode_batch, unlike encode, lets other threads run meanwhile: the server answers /health while
        # a long prompt is read in a worker thread
        return self._plain.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_with_added(self, text: str) -> list[int]:
        # encode_batch, unlike encode, lets other threads run meanwhile: a rendered chat prompt is one
        # such text, and its 2 MB message held the interpreter (and the server's /health) ~1.5 s
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        size = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < size), None)
        if bad is not None:
            raise TokenizerError(f"unknown token id {bad}")
        # decode_batch, unlike decode, lets other threads run (2M ids held the interpreter 0.25 s)
        return self._tok.decode_batch([ids], skip_special_tokens=skip_special)[0]

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added_by_id:
            return self._added_by_id[token_id].encode()
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise TokenizerError(f"unknown token id {token_id}")
        if self._byte_level:
            return piece_to_bytes(piece)
        byte = _BYTE_PIECE.fullmatch(piece) if self._byte_fallback else None
        if byte is not None:
            return bytes([int(byte.group(1), 16)])
        # Other decoders (SentencePiece's "▁", WordPiece's "##") treat a text's first token apart: its
        # leading space is stripped. Decoded alone, "▁world" lost its space and "<0xE4>" became U+FFFD,
        # so streamed text ran words together and garbled characters; the token's second copy is decoded
        # as running text.
        alone = self._tok.decode([token_id], skip_special_tokens=False)
        twice = self._tok.decode([token_id, token_id], skip_special_tokens=False)
        return twice[len(alone) :].encode()

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise TokenizerError(f"unknown token id {token_id}")
        return piece

    def token_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)
