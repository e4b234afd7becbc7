"""`Tokenizer.min_tokens`: never more than the true count (the server refuses prompts on it), for both
tokenizer kinds, whatever the text: runs of whitespace (the 128-byte tokens), special-token text, text
that NFC changes; and no bound at all for a tokenizer where text can vanish or merge past a token."""

from __future__ import annotations

import unicodedata

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_data import CORPUS
from tokenizers import decoders, models, normalizers, pre_tokenizers

from qwenkit.tokenizer import HFTokenizer
from qwenkit.tokenizer.length_bound import LengthBound

# the bytes the bundled SmolLM2's vocabulary has no token for: ASCII controls, and lead bytes of 4-byte
# characters (U+40000..U+BFFFF) or of none
SMOLLM_DROPPED = bytes([0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)])
PIECES = [" " * 300, "\n" * 200, "<|im_start|>", "<|endoftext|>", "<think>", "e\u0301", "\u1100\u1161\u11a8"]


@pytest.fixture(params=["qwen3", "v1"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def test_the_longest_token_is_128_bytes_of_spaces(tokenizer):
    assert tokenizer._token_length_bound == LengthBound(128, nfc=True)
    assert tokenizer.encode(" " * 1280) == tokenizer.encode(" " * 128) * 10


@pytest.mark.parametrize("text", [*CORPUS, *PIECES, "".join(PIECES) * 3])
def test_the_bound_is_never_past_the_count(tokenizer, text):
    bound = tokenizer.min_tokens(text)
    assert bound <= len(tokenizer.encode(text)) and bound <= len(tokenizer.encode(text, allow_special=True))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([*PIECES, "a", "é", "😀", " ", "\t"]), max_size=40), st.text(max_size=40))
def test_the_bound_is_never_past_the_count_of_mixed_text(qwen3, v1, pieces, tail):
    text = "".join(pieces) + tail
    for tokenizer in (qwen3, v1):
        assert tokenizer.min_tokens(text) <= len(tokenizer.encode(text, allow_special=True))


def test_text_nfc_changes_is_bounded_by_its_nfc_bytes(tokenizer):
    """Composition shrinks it (a Hangul syllable's three jamo, 9 bytes, become 3): the bound counts the
    NFC text's bytes, so one combining accent does not turn it off for a huge prompt (it was 0 there, and
    the prompt was tokenized for a minute before the same refusal)."""
    text = "\u1100\u1161\u11a8" * 1000
    assert not unicodedata.is_normalized("NFC", text)
    assert tokenizer.min_tokens(text) == 3000 // 128 + 1 <= len(tokenizer.encode(text))
    assert tokenizer.min_tokens(unicodedata.normalize("NFC", text)) == 3000 // 128 + 1
    accented = " " * 128_000 + "e\u0301"  # 1000 tokens of 128 spaces, then "é" once composed
    assert tokenizer.min_tokens(accented) == 1001 <= len(tokenizer.encode(accented))


def _two_letters() -> HFTokenizer:
    backend = tokenizers.Tokenizer(models.BPE({"a": 0, "b": 1}, [], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return HFTokenizer(backend)


def test_a_tokenizer_that_can_drop_text_gives_no_bound(qwen3):
    """Bytes without a token of their own are dropped (BPE without unk: no byte of the text is counted),
    a Whitespace pre-tokenizer drops spaces, an lstrip token swallows the spaces before it: none of the
    others has a bound."""
    assert _two_letters().min_tokens("x" * 10_000) == 0
    backend = tokenizers.Tokenizer.from_str(qwen3.backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    assert HFTokenizer(backend).min_tokens(" " * 10_000) == 0
    backend = tokenizers.Tokenizer.from_str(qwen3.backend.to_str())
    backend.add_special_tokens([tokenizers.AddedToken("<x>", lstrip=True)])
    assert HFTokenizer(backend).min_tokens(" " * 10_000 + "<x>") == 0
    backend = tokenizers.Tokenizer.from_str(qwen3.backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.Digits()  # no ByteLevel: a piece's characters are not bytes
    assert HFTokenizer(backend).min_tokens("é" * 10_000) == 0
    backend = tokenizers.Tokenizer.from_str(qwen3.backend.to_str())
    backend.normalizer = normalizers.Lowercase()
    assert HFTokenizer(backend).min_tokens("A" * 10_000) == 0


@pytest.fixture(scope="module")
def smollm() -> HFTokenizer:
    from qwenkit.checkpoint.gguf import read_gguf
    from qwenkit.default_model import default_model_path

    return HFTokenizer(read_gguf(default_model_path()).tokenizer)


def test_bytes_without_a_token_are_not_counted(smollm):
    """The bundled model's tokenizer drops the bytes it has no token for; it gave no bound at all for
    that, so a 16 MB prompt to the default model was tokenized for half a minute before its refusal."""
    assert smollm._token_length_bound == LengthBound(81, nfc=False, dropped=SMOLLM_DROPPED)
    assert smollm.encode("\x04\x06\x13") == [] and smollm.min_tokens("\x04\x06\x13" * 10_000) == 0
    text = "hello world " * 100_000
    assert smollm.min_tokens(text) == 1_200_000 // 81 + 1 <= len(smollm.encode(text))
    mixed = "a\x04b\U00050000 é" * 10_000  # 9 bytes a piece, 1 of them dropped
    assert smollm.min_tokens(mixed) == 80_000 // 81 + 1 <= len(smollm.encode(mixed))


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from([*map(chr, SMOLLM_DROPPED[:6]), "a", " ", "é", "\U00050000", "😀"])))
def test_the_bound_with_dropped_bytes_is_never_past_the_count(smollm, text):
    assert smollm.min_tokens(text) <= len(smollm.encode(text, allow_special=True))


def test_a_text_too_short_to_reach_the_window_reads_no_vocabulary(qwen3):
    """The vocabulary is read once, on the first text long enough to matter: a chat's first short turn
    does not wait for it (0.2 s over Qwen3's 151k entries)."""
    fresh = HFTokenizer(tokenizers.Tokenizer.from_str(qwen3.backend.to_str()))
    assert fresh.min_tokens("hi " * 1000, reaching=4 * 3000 + 1) == 0
    assert "_token_length_bound" not in vars(fresh)
    assert fresh.min_tokens("hi " * 1000, reaching=4 * 3000) == 3000 // 128 + 1
