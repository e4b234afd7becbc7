"""Qwen v1 (qwen.tiktoken): ids equal a raw tiktoken.Encoding and the VERIFIED ids of qwen_facts §6-7."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_data import CORPUS, QWEN_TIKTOKEN

from qwenkit.tokenizer import STOP_WORDS_IDS, QwenV1Tokenizer, make_context

HELLO_CONTEXT = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
HELLO_CONTEXT += [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]


@pytest.mark.parametrize("text", CORPUS)
def test_ids_equal_raw_tiktoken(v1, raw_tiktoken, text):
    nfc = unicodedata.normalize("NFC", text)
    assert v1.encode(text) == raw_tiktoken.encode_ordinary(nfc)
    assert v1.encode(text, allow_special=True) == raw_tiktoken.encode(nfc, allowed_special="all")


def test_verified_ids(v1):
    assert v1.encode("\n") == [198]
    assert [v1.encode(w) for w in ("system", "user", "assistant", "Hello")] == [
        [8948],
        [872],
        [77091],
        [9707],
    ]
    assert v1.encode("You are a helpful assistant.") == [2610, 525, 264, 10950, 17847, 13]
    assert v1.encode("Hello world") == [9707, 1879]
    assert v1.encode(" Hello world") == [21927, 1879]
    assert v1.encode("12345") == [16, 17, 18, 19, 20]  # digits split one at a time
    assert v1.encode("Observation:") == [37763, 367, 25]
    assert v1.encode("Observation:\n") == [37763, 367, 510]


def test_special_text_is_plain_unless_allowed(v1):
    text = 'print("<|endoftext|>")'
    assert v1.encode(text) == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    assert v1.encode(text, allow_special=True) == [1350, 445, 151643, 899]


def test_special_tokens_and_sizes(v1):
    assert v1.vocab_size == 151851
    assert len(v1.added_tokens) == 208
    assert v1.token_to_id("<|endoftext|>") == 151643
    assert v1.token_to_id("<|im_start|>") == 151644
    assert v1.token_to_id("<|im_end|>") == 151645
    assert v1.token_to_id("<|extra_0|>") == 151646
    assert v1.token_to_id("<|extra_204|>") == 151850
    assert v1.special_token_ids == frozenset(range(151643, 151851))
    assert v1.eos_token_ids == {151643}
    assert v1.stop_token_ids == {151643, 151644, 151645}
    assert STOP_WORDS_IDS == [[151645], [151644]]
    # pieces use the vocab.json (byte-level) spelling, so v1 and Qwen2 pieces agree
    assert v1.id_to_piece(21927) == "ĠHello"
    assert v1.token_to_id("ĠHello") == 21927
    assert v1.id_to_piece(151645) == "<|im_end|>"
    assert v1.token_to_id("no such piece ☃") is None


def test_decode(v1):
    ids = [*v1.encode("你好 world", allow_special=False), 151645, 151643]
    assert v1.decode(ids) == "你好 world<|im_end|><|endoftext|>"
    assert v1.decode(ids, skip_special=True) == "你好 world"
    split_char = next(c for c in "😀🦜𝄞" if len(v1.encode(c)) > 1)
    assert v1.decode(v1.encode(split_char)[:1]) == "\ufffd"


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_roundtrip_random_unicode(v1, text):
    assert v1.decode(v1.encode(text)) == unicodedata.normalize("NFC", text)


def test_make_context_verified_ids(v1):
    text, ids = make_context(v1, "Hello")
    assert ids == HELLO_CONTEXT
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert v1.apply_chat_template([{"role": "user", "content": "Hello"}]) == HELLO_CONTEXT
    assert v1.render_chat_template([{"role": "user", "content": "Hello"}]) == text


def _reference_make_context(enc, query, history, system, max_window_size):
    """Qwen's make_context transcribed from qwen_facts §7.1 over a raw tiktoken encoder."""
    im_start, im_end = [151644], [151645]
    nl = enc.encode_ordinary("\n")

    def tok(role, content):
        return enc.encode_ordinary(role) + nl + enc.encode_ordinary(content)

    system_tokens = im_start + tok("system", system) + im_end
    context: list[int] = []
    for q, r in reversed(history):
        nxt = nl + im_start + tok("user", q) + im_end + nl + im_start + tok("assistant", r) + im_end
        if len(system_tokens) + len(nxt) + len(context) < max_window_size:
            context = nxt + context
        else:
            break
    context = system_tokens + context
    return (
        context
        + nl
        + im_start
        + tok("user", query)
        + im_end
        + nl
        + im_start
        + enc.encode_ordinary("assistant")
        + nl
    )


@pytest.mark.parametrize("window", [10_000, 60, 45, 44, 20])
def test_make_context_history_and_truncation(v1, raw_tiktoken, window):
    history = [("第一问 what is 1+1?", "2"), ("  spaced\n", "\nanswer <|im_end|>"), ("last q", "last a 😀")]
    text, ids = make_context(v1, "now?", history, system="Be brief.", max_window_size=window)
    assert ids == _reference_make_context(raw_tiktoken, "now?", history, "Be brief.", window)
    # the "<|im_end|>" typed into an answer stays text: every im_end closes a turn the builder opened
    assert ids.count(151645) == ids.count(151644) - 1
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert v1.decode(ids) == text


def test_truncation_strict_less_than(v1):
    history = [("a", "b")]
    no_history = make_context(v1, "q", [], "S", 10_000)[1]
    full = make_context(v1, "q", history, "S", 10_000)[1]
    turn_len = len(full) - len(no_history)
    system_len = len([151644, 8948, 198, *v1.encode("S"), 151645])
    assert make_context(v1, "q", history, "S", system_len + turn_len + 1)[1] == full
    assert make_context(v1, "q", history, "S", system_len + turn_len)[1] == no_history


def test_loads_from_file_directly():
    tok = QwenV1Tokenizer.from_file(QWEN_TIKTOKEN)
    assert tok.encode("Hello world") == [9707, 1879]
