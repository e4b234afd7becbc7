"""A GGUF vocabulary's tokens become the tokenizer's ids whether or not they are spelled in GPT-2's byte
alphabet (some converters store raw text, which transformers respells)."""

from __future__ import annotations

from qwenkit.checkpoint.gguf_tokenizer import GGUFVocab, build_tokenizer


def vocab(tokens: list[str], merges: list[str]) -> GGUFVocab:
    return GGUFVocab(
        model="gpt2",
        pre=None,
        tokens=tokens,
        token_types=[1] * len(tokens),
        merges=merges,
        special_ids={},
        add_bos_token=False,
        add_eos_token=False,
        chat_template=None,
    )


def test_tokens_in_the_byte_alphabet_keep_their_ids():
    tokens = ["a", "b", "Ġ", "ab", "Ġab", "é"]
    tok = build_tokenizer(vocab(tokens, ["a b", "Ġ ab"]))
    assert [tok.token_to_id(t) for t in tokens] == list(range(len(tokens)))
    assert tok.encode("ab ab").ids == [3, 4]


def test_a_token_in_raw_text_is_respelled_and_found():
    """ "x日" stored as raw text is the tokenizer's "xæĹ¥" (日's UTF-8 bytes e6 97 a5 in the byte
    alphabet), the spelling its merges produce."""
    tokens = ["x", "æ", "Ĺ", "¥", "æĹ", "æĹ¥", "x日", "ä"]
    tok = build_tokenizer(vocab(tokens, ["æ Ĺ", "æĹ ¥", "x æĹ¥"]))
    assert tok.token_to_id("xæĹ¥") == 6 and tok.token_to_id("x日") is None
    assert tok.encode("x日").ids == [6]
    assert tok.decode([6]) == "x日"
    assert tok.token_to_id("ä") == 7  # in the alphabet (Latin-1): kept as it is
