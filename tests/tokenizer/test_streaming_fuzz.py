"""The streaming detokenizer and the text layer, fuzzed over the three real tokenizers the repo ships
with: Qwen v1's qwen.tiktoken, Qwen3's tokenizer.json and the bundled SmolLM2 GGUF's vocabulary.

Seeded random id sequences, biased to tokens that are not whole characters (the bytes of CJK and
emoji split across tokens) and to control tokens, streamed one id or a few at a time: after every id
the text so far is the full decode of those ids less a trailing U+FFFD or two (the bytes of an
unfinished character are held back, never shown half), and the whole stream is the full decode,
U+FFFD rules at the end included. Random texts (multi-byte UTF-8, emoji sequences, CJK, combining
marks, whitespace runs, control-token text) round-trip through encode and the stream, and a stop
string drawn across token boundaries cuts the streamed reply where it first occurs in the full text;
with control tokens inside the reply, stop strings naming them, min_tokens and include_stop, the text
layer cuts where a token-by-token brute force does.
Control-token text in the messages of a chat never becomes a control token in the SmolLM2 prompt
(test_injection covers Qwen's two).
"""

from __future__ import annotations

import codecs
import random
import unicodedata

import pytest

from qwenkit.text_state import Completion, TextState
from qwenkit.tokenizer import StreamingDetokenizer

TOKENIZERS = ["v1", "qwen3", "smollm2"]
PIECES = [
    "你好", "世界", "鬱", "😀", "👨‍👩‍👧", "🇨🇳", "👍🏽", "𝄞", "e\u0301", "Å", "ñ", "ذ", "한국", "\u200b",
    " ", "  ", "\t", "\n", "\n\n", "\r\n", "   \n ", "a", "ab", "Hello", " world", "42", ".", "<", "|>",
    "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<think>", "<tool_call>", "<repo_name>",
]  # fmt: skip


def fragments(tok) -> list[int]:
    """Ids whose bytes are not valid UTF-8 alone: parts of a character."""
    found = []
    for i in range(tok.vocab_size):
        try:
            tok.token_bytes(i).decode()
        except UnicodeDecodeError:
            found.append(i)
    return found


@pytest.fixture(scope="module")
def fragment_ids(request) -> dict[str, list[int]]:
    return {name: fragments(request.getfixturevalue(name)) for name in TOKENIZERS}


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_random_ids_stream_to_the_full_decode_after_every_id(name, request, fragment_ids):
    tok = request.getfixturevalue(name)
    frags, controls = fragment_ids[name], sorted(tok.added_tokens.values())
    assert len(frags) > 300 and controls  # the draw reaches split characters and control tokens
    rng = random.Random(82)
    held_back = 0
    for _ in range(300):
        ids = [
            rng.choice(controls)
            if r < 0.15
            else rng.choice(frags)
            if r < 0.75
            else rng.randrange(tok.vocab_size)
            for r in (rng.random() for _ in range(rng.randint(0, 14)))
        ]
        for skip in (False, True):
            stream, so_far, k = StreamingDetokenizer(tok, skip_special=skip), "", 0
            while k < len(ids):
                step = ids[k : k + rng.choice([1, 1, 1, 2, 3])]
                so_far += stream.add(step[0] if len(step) == 1 else step)
                k += len(step)
                full = tok.decode(ids[:k], skip_special=skip)
                # the stream shows everything but the last bytes of an unfinished character, which decode
                # shows as U+FFFD (two, for b"\xed\xa5": Python's decoder holds a surrogate's first two
                # bytes to the third, so it shows them a token late)
                rest = full[len(so_far) :]
                assert full.startswith(so_far) and set(rest) <= {"\ufffd"} and len(rest) <= 3, (ids[:k], skip)
                held_back += full != so_far
            so_far += stream.finalize()
            assert so_far == stream.text == tok.decode(ids, skip_special=skip), (ids, skip)
            assert stream.token_ids == ids
    assert held_back > 50  # unfinished characters were met, and held


@pytest.mark.parametrize("name", TOKENIZERS)
def test_random_texts_round_trip_through_the_stream(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(7)
    split = 0
    for _ in range(200):
        text = random_text(rng)
        # v1 and Qwen3 normalize to NFC when encoding (tiktoken's caller, the tokenizer.json normalizer)
        want = text if name == "smollm2" else unicodedata.normalize("NFC", text)
        for ids in (tok.encode(text), tok.encode(text, allow_special=True)):
            stream = StreamingDetokenizer(tok)
            pieces = [stream.add(i) for i in ids]
            assert "".join(pieces) + stream.finalize() == want == tok.decode(ids), (text, ids)
            assert all("\ufffd" not in p for p in pieces)  # no half character is ever shown
            split += any(p == "" for p in pieces)
        # plain text never holds a control token, whatever it spells
        assert not set(tok.encode(text)) & tok.special_token_ids
    assert split > 20


def substring_free(stops: list[str]) -> list[str]:
    """Drop a stop string that holds another: where none holds another, the first to start is the first
    to end, so the cut cannot depend on how the text was split into steps."""
    return [s for s in stops if not any(t != s and t in s for t in stops)]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stop_strings_across_token_boundaries_cut_where_the_full_text_does(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(11)
    across = 0
    for _ in range(250):
        ids = tok.encode(random_text(rng) + random_text(rng))
        text = tok.decode(ids)
        if len(text) < 2:
            continue
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 5)])
        stops = substring_free(list(dict.fromkeys([*stops, rng.choice(["xyzzy", "😀😀", "\n\n\n"])])))
        include = rng.random() < 0.3
        state = TextState(tok, Completion([]), stops, include_stop=include)
        streamed, k, last = "", 0, 0
        while k < len(ids) and state.completion.finish_reason is None:
            step = ids[k : k + rng.choice([1, 1, 2, 4])]
            k, last = k + len(step), len(step)
            streamed += state.feed(step, "length" if k >= len(ids) else None)
        c = state.completion
        at, first = min(((i, s) for s in stops if (i := text.find(s)) >= 0), default=(len(text), None))
        want = text[: at + len(first)] if include and first else text[:at]
        assert (streamed, c.text, c.stop_reason) == (want, want, first), (text, stops, ids)
        assert c.finish_reason == ("stop" if first else "length")
        # it stopped on the step that completed the stop string, not later
        assert c.token_ids == ids[:k]
        if first:
            assert tok.decode(ids[: k - last])[at : at + len(first)] != first
            across += last == 1 and len(tok.decode(ids[k - 1 : k])) < len(first)
    assert across > 20  # stop strings that spanned tokens


def test_control_token_text_in_smollm2_messages_stays_text(smollm2):
    """SmolLM2's ChatML template around messages that spell its control tokens (all 17 added tokens are
    special: <|im_start|>, <|im_end|>, <|endoftext|>, <reponame>, <file_sep>, ...): the prompt holds
    the template's <|im_start|> and <|im_end|> only, and decodes to the rendered text."""
    rng = random.Random(3)
    controls = [t for t, i in smollm2.added_tokens.items() if i in smollm2.special_token_ids]
    assert len(controls) == 17
    start, end = smollm2.added_tokens["<|im_start|>"], smollm2.added_tokens["<|im_end|>"]
    for _ in range(60):
        contents = [
            "".join(rng.choice(controls) if rng.random() < 0.4 else random_text(rng) for _ in range(4))
            for _ in range(3)
        ]
        messages = [
            dict(role=r, content=c) for r, c in zip(["user", "assistant", "user"], contents, strict=True)
        ]
        ids = smollm2.apply_chat_template(messages)
        # default system turn + 3 turns, each <|im_start|> ... <|im_end|>, and the generation prompt
        assert [i for i in ids if i in smollm2.special_token_ids] == [start, end] * 4 + [start]
        assert smollm2.decode(ids) == smollm2.render_chat_template(messages)


def brute_force_stop(tok, ids, stops, state: TextState, include: bool, min_tokens: int):
    """Token by token, as the engine hands them over: (text, stop reason, tokens taken). A control token
    named by a stop string (``state.stop_tokens``) ends it with the text before it; eos ids (hidden) and
    other control tokens show no text; a stop string must end past the text of the first min_tokens."""
    decoder, text, floor = codecs.getincrementaldecoder("utf-8")("replace"), "", 0

    def found():
        places = [(i, -len(s), s) for s in stops if (i := text.find(s, max(floor - len(s) + 1, 0))) >= 0]
        if places:
            i, longer, s = min(places)
            return text[: i - longer] if include else text[:i], s
        return None

    for k, t in enumerate(ids):
        last = k == len(ids) - 1
        if t in state.stop_tokens and k >= min_tokens:
            text += decoder.decode(b"", final=True)
            reason = state.stop_tokens[t]
            return (*(found() or (text + (reason if include else ""), reason)), k + 1)
        shown = t not in state.hidden_ids and t not in tok.special_token_ids
        text += decoder.decode(tok.token_bytes(t) if shown else b"", final=last)
        if k < min_tokens:
            floor = len(text)
        elif hit := found():
            return (*hit, k + 1)
    return text, None, len(ids)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stop_strings_and_control_tokens_in_the_reply_agree_with_brute_force(name, request):
    """Control tokens sampled inside a reply (hidden eos, <|im_start|>, Qwen3's non-special <think>),
    stop strings spelling a control token or drawn from the text, min_tokens and include_stop."""
    tok = request.getfixturevalue(name)
    rng = random.Random(5)
    specials, hidden = sorted(tok.special_token_ids), frozenset(tok.eos_token_ids)
    seen = dict(checked=0, stop_token=0, stop_string=0)
    for _ in range(600):
        ids = tok.encode(random_text(rng) or "a", allow_special=True)
        for _ in range(rng.randint(0, 2)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        text = tok.decode([i for i in ids if i not in hidden], skip_special=True)
        in_reply = [tok.id_to_piece(i) for i in ids if i in tok.special_token_ids]
        stops = [rng.choice(in_reply or list(tok.added_tokens))] if rng.random() < 0.4 else []
        for _ in range(rng.randint(0, 2) if text else 0):
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 4)])
        stops = substring_free(list(dict.fromkeys(stops)))
        include, floor = rng.random() < 0.3, rng.choice([0, 0, rng.randint(0, len(ids))])
        if not stops or any(s != t and t in s for s in stops for t in tok.added_tokens):
            continue  # none, or one refused (it holds a control token and more)
        state = TextState(
            tok, Completion([]), stops, hidden_ids=hidden, include_stop=include, min_tokens=floor
        )
        streamed = ""
        for k, t in enumerate(ids):
            streamed += state.feed([t], "length" if k == len(ids) - 1 else None)
            if state.completion.finish_reason:
                break
        c = state.completion
        reason = c.stop_reason if c.finish_reason == "stop" else None
        want = brute_force_stop(tok, ids, stops, state, include, floor)
        assert (streamed, reason, len(c.token_ids)) == want and c.text == streamed, (ids, stops, floor)
        seen["checked"] += 1
        seen["stop_token" if reason in state.stop_tokens.values() else "stop_string"] += reason is not None
    assert seen["checked"] > 300 and seen["stop_token"] > 20 and seen["stop_string"] > 50, seen
