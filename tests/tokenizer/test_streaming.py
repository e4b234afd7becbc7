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
