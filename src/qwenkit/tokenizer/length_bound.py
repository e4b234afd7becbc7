"""A lower bound on a text's token count, read from its UTF-8 length without tokenizing it.

Byte-level BPE puts every byte of its (normalized) text into exactly one token, and no token is longer
than the vocabulary's longest entry, ``L`` bytes (special and added tokens included). So a text of ``B``
bytes is at least ``ceil(B / L)`` tokens: a prompt of tens of megabytes is known to be past any context
window in milliseconds, where tokenizing it took a worker nearly a minute before the same refusal.

The bound is exact (never more than the true count) only where nothing of the text can vanish or merge
past ``L``: no added token swallows the whitespace beside it, no pre-tokenizer drops text, and the
normalizer is none or NFC (the bytes are then counted after NFC). A byte with no token of its own (the
bundled SmolLM2 has none for 21, six of them ASCII controls) is dropped by BPE, or made its unknown token:
such bytes are not counted, and the rest still take a token per ``L`` at least. Elsewhere a tokenizer
gives no bound (0).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qwenkit.tokenizer.byte_level import bytes_to_unicode

if TYPE_CHECKING:
    import tokenizers

# pre-tokenizers that only split text (with these behaviours), never drop any of it
_SPLITTING = {"ByteLevel", "Split", "Digits", "Punctuation"}
_KEEPING = {None, "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"}


@dataclass(frozen=True)
class LengthBound:
    """What a tokenizer's bound is read from."""

    longest: int  # the most bytes of text one token stands for
    nfc: bool  # the text is NFC-normalized before it is tokenized
    dropped: bytes = b""  # the byte values with no token of their own, which make no counted token


def text_bytes(text: str, nfc: bool, dropped: bytes = b"") -> int | None:
    """``text``'s UTF-8 length as the tokenizer reads it (after NFC where it normalizes: composition
    shrinks text, three Hangul jamo of 9 bytes become a syllable of 3), less its ``dropped`` bytes, or
    None for text that is not valid Unicode (a lone surrogate: the exact path names it). Normalizing 45 M
    characters takes seconds, tokenizing them a minute: one combining accent in a huge prompt no longer
    turns the bound off."""
    if text.isascii() and (not dropped or min(dropped) >= 0x80):  # O(1) in CPython; ASCII is its own NFC
        return len(text)
    if nfc and not text.isascii():  # its quick check returns NFC text itself (0.1 s for 45 M characters)
        text = unicodedata.normalize("NFC", text)
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return len(encoded.translate(None, dropped) if dropped else encoded)


def min_tokens(texts: Iterable[str], bound: LengthBound | None) -> int:
    """At least how many tokens ``texts``, each encoded on its own, come to: the sum of
    ``ceil(counted bytes / longest)``; 0 where the tokenizer gives no bound (``bound`` None)."""
    if bound is None:
        return 0
    total = 0
    for text in texts:
        size = text_bytes(text, bound.nfc, bound.dropped)
        if size is None:
            return 0
        total += -(-size // bound.longest)
    return total


def ranks_longest_token(ranks: Iterable[bytes], special: Iterable[str]) -> int | None:
    """The longest token of a tiktoken vocabulary (its mergeable ranks and special tokens), in bytes;
    None where a byte has no token of its own (tiktoken cannot encode it)."""
    ranks = set(ranks)
    if any(bytes([b]) not in ranks for b in range(256)):
        return None
    return max([*(len(r) for r in ranks), *(len(s.encode()) for s in special)])


def hf_length_bound(backend: tokenizers.Tokenizer) -> LengthBound | None:
    """How ``backend``'s bound is read; None where it does not hold for this tokenizer (see the module's
    docstring)."""
    from tokenizers import decoders, models

    normalizer = _spec(backend.normalizer)
    model = backend.model
    if not isinstance(model, models.BPE) or model.dropout or normalizer not in (None, {"type": "NFC"}):
        return None
    # ByteLevel maps each byte to one character of the pieces' alphabet: a piece's length is its bytes
    pre_tokenizer = _spec(backend.pre_tokenizer)
    byte_level = '"type": "ByteLevel"' in json.dumps(pre_tokenizer)
    if not (byte_level and _only_splits(pre_tokenizer) and isinstance(backend.decoder, decoders.ByteLevel)):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    dropped = bytes(sorted(b for b, c in bytes_to_unicode().items() if c not in vocab))
    added = backend.get_added_tokens_decoder().values()
    if any(t.lstrip or t.rstrip for t in added):  # these take the whitespace beside them, however long
        return None
    # a piece's characters are bytes of the byte alphabet, one each; a piece with others is never made
    longest = max(map(len, vocab))
    return LengthBound(
        max([longest, *(len(t.content.encode()) for t in added)]), normalizer is not None, dropped
    )


def _spec(component: Any) -> dict[str, Any] | None:
    """A normalizer's or pre-tokenizer's tokenizer.json entry (its own, without the vocabulary's)."""
    return None if component is None else json.loads(component.__getstate__())


def _only_splits(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_only_splits(s) for s in spec.get("pretokenizers", []))
    return spec.get("type") in _SPLITTING and spec.get("behavior") in _KEEPING
