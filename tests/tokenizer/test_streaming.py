"""StreamingDetokenizer: multi-byte characters appear once, whole; the stream equals decode(all)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenkit.tokenizer import StreamingDetokenizer

TEXT = "你好，世界 😀👨‍👩‍👧 𝄞 ok 鬱 done"


@pytest.mark.parametrize("name", ["v1", "qwen3"])
def test_split_characters_appear_whole_and_once(name, request):
    tok = request.getfixturevalue(name)
    ids = tok.encode(TEXT)
    # the text must really contain characters split across byte tokens for this test to mean anything
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    stream = StreamingDetokenizer(tok)
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) + stream.finalize() == TEXT == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    for ch in "😀世𝄞鬱":
        assert sum(ch in p for p in pieces) == TEXT.count(ch)
    # a piece is emitted only when the last byte of the character arrives
    emoji_ids = tok.encode("🫠")
    assert len(emoji_ids) > 1
    s = StreamingDetokenizer(tok)
    assert [s.add(i) for i in emoji_ids] == [""] * (len(emoji_ids) - 1) + ["🫠"]


def test_skip_special_and_finalize(qwen3):
    ids = [*qwen3.encode("hi"), 151645, *qwen3.encode("🫠")[:1]]
    s = StreamingDetokenizer(qwen3, skip_special=True)
    assert s.add(ids) == "hi"
    assert s.finalize() == "\ufffd"  # an incomplete character is flushed as U+FFFD, like decode()
    assert s.text == "hi\ufffd" == qwen3.decode(ids, skip_special=True)
    s2 = StreamingDetokenizer(qwen3)
    assert s2.add(ids[:-1]) == "hi<|im_end|>"


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_stream_equals_decode(qwen3, text):
    ids = qwen3.encode(text)
    s = StreamingDetokenizer(qwen3)
    out = "".join(s.add(i) for i in ids) + s.finalize()
    assert out == qwen3.decode(ids) == s.text


def test_long_stream_is_linear(v1):
    ids = v1.encode("很长的文本😀 " * 4000)
    s = StreamingDetokenizer(v1)
    out = "".join(s.add(i) for i in ids) + s.finalize()
    assert out == v1.decode(ids)


def sentencepiece_style(decoder: str):
    """A Llama-2-style tokenizer.json (BPE on "▁" pieces with byte fallback): the 2023 layout, whose
    decoder replaces "▁" and strips the text's first space, or the later Metaspace decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    from qwenkit.tokenizer import HFTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = [("▁", "H"), ("l", "l"), ("▁H", "e"), ("ll", "o"), ("▁He", "llo"), ("▁", "w"), ("o", "r")]
    merges += [("▁w", "or"), ("▁wor", "l"), ("▁worl", "d")]
    for piece in ["▁", "H", "e", "l", "o", "w", "r", "d", "!", *("".join(m) for m in merges)]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if decoder == "strip":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first", split=False)]
        )
    return HFTokenizer(backend, {}, None)


@pytest.mark.parametrize("decoder", ["strip", "metaspace"])
def test_sentencepiece_tokens_stream_their_spaces_and_bytes(decoder):
    """Each token decoded alone lost its "▁" space and turned a fallback byte into U+FFFD: the stream
    (every reply's text) read "Helloworld���!" for "Hello world 世!"."""
    tok = sentencepiece_style(decoder)
    ids = tok.encode("Hello world 世!")
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces == ["▁Hello", "▁world", "▁", "<0xE4>", "<0xB8>", "<0x96>", "!"]
    assert [tok.token_bytes(i) for i in ids] == [b" Hello", b" world", b" ", b"\xe4", b"\xb8", b"\x96", b"!"]
    assert tok.decode(ids) == "Hello world 世!"
    s = StreamingDetokenizer(tok)
    streamed = [s.add(i) for i in ids] + [s.finalize()]
    # the first token keeps its space, as in vLLM's stream after a prompt; decode strips a text's first
    assert streamed == [" Hello", " world", " ", "", "", "世", "!", ""]
