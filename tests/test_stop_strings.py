"""Stop strings and stop tokens through the text layer (``TextState``) and the Python API: where the text
is cut, which tokens and logprobs stay, and that a stream concatenates to the text ``generate`` returns."""

from __future__ import annotations

import codecs
import random

import pytest

from qwenkit.engine import SamplingParams, SamplingParamsError
from qwenkit.generate import LLM
from qwenkit.text_state import Completion, TextState
from qwenkit.tokenizer.byte_level import bytes_to_piece


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, dtype="float32", progress=False)


def byte_ids(llm: LLM, text: str) -> list[int]:
    """``text`` as one token per UTF-8 byte (the byte-level vocabulary holds every single byte)."""
    return [llm.tokenizer.token_to_id(bytes_to_piece(bytes([b]))) for b in text.encode()]


def fed(llm: LLM, steps: list[list[int]], stop: tuple[str, ...], finish_at_end="length", **kw) -> tuple:
    """Feed ``steps`` (one engine output each) to a TextState; (emitted pieces, completion)."""
    state = TextState(llm.tokenizer, Completion([]), stop, **kw)
    pieces = []
    for i, ids in enumerate(steps):
        pieces.append(state.feed(ids, finish_at_end if i == len(steps) - 1 else None))
        if state.completion.finish_reason is not None:
            break
    return pieces, state.completion


@pytest.mark.parametrize(
    "text, stop, cut",
    [
        ("你好😀世界", "😀", "你好"),
        ("你好😀世界", "好😀", "你"),
        ("你好😀世界", "😀世", "你好"),
        ("ab😀", "b😀", "a"),
    ],
)
def test_a_stop_string_cut_across_the_bytes_of_one_character(llm, text, stop, cut):
    """A character whose UTF-8 bytes come one token each: the stop string is found once the last byte
    arrives, at that token, and no byte of it shows before."""
    ids = byte_ids(llm, text)
    pieces, done = fed(llm, [[t] for t in ids], (stop,))
    assert (done.text, done.finish_reason, "".join(pieces)) == (cut, "stop", cut)
    end = len(text[: text.index(stop) + len(stop)].encode())  # the token that completed the stop string
    assert done.token_ids == ids[:end]


def test_a_stop_string_inside_the_first_token_ends_at_once(llm):
    ids = llm.tokenizer.encode(" hello world")
    pieces, done = fed(llm, [[t] for t in ids], ("ell",))
    assert (pieces, done.text, done.token_ids, done.finish_reason) == ([" h"], " h", ids[:1], "stop")


@pytest.mark.parametrize(
    "stops, cut",
    [
        (("abcd", "bc"), "a"),  # "bc" is whole first, though "abcd" started earlier
        (("cd", "bcd"), "a"),  # both whole at "d": the one that starts first
        (("bcd", "b"), "a"),
    ],
)
def test_overlapping_stop_strings_cut_at_the_first_one_found_token_by_token(llm, stops, cut):
    ids = byte_ids(llm, "abcdef")
    pieces, done = fed(llm, [[t] for t in ids], stops)
    assert (done.text, "".join(pieces), done.finish_reason) == (cut, cut, "stop")


def test_text_held_back_as_a_stop_prefix_is_flushed_at_max_tokens(llm):
    ids = byte_ids(llm, "xyab")
    pieces, done = fed(llm, [[t] for t in ids], ("abc",))
    assert pieces == ["x", "y", "", "ab"] and (done.text, done.finish_reason) == ("xyab", "length")
    # the last token completes the stop string as the request reaches max_tokens: "stop", cut
    pieces, done = fed(llm, [[t] for t in byte_ids(llm, "xyabc")], ("abc",))
    assert (done.text, "".join(pieces), done.finish_reason) == ("xy", "xy", "stop")


def test_include_stop_str_in_output_keeps_the_stop_string_and_nothing_after_it(llm):
    ids = llm.tokenizer.encode("one two three four")
    _, done = fed(llm, [ids], ("two", " three"), include_stop=True)
    assert (done.text, done.finish_reason) == ("one two", "stop")


RANDOM_RUNS = 20
SPLIT = "😀世"  # the one-byte tokens of their bytes are favoured in one run: characters come split


def expected_cut(
    llm: LLM, ids: list[int], stops: list[str], include: bool, min_tokens: int = 0
) -> tuple[int, str] | None:
    """By brute force: the first token whose text (complete characters only, as the standard library's
    UTF-8 decoder gives them) holds a stop string, and the text before the first place one starts (with
    ``include``, through the longest that starts there). With ``min_tokens``, only from the token after
    them, and only stop strings that end past their text. None: no stop string is ever found."""
    data, floor = b"", 0
    for k, token in enumerate(ids, 1):
        data += llm.tokenizer.token_bytes(token)
        text = codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=k == len(ids))
        if k <= min_tokens:
            floor = len(text)
            continue
        places = [i for s in stops if (i := text.find(s, max(floor - len(s) + 1, 0))) >= 0]
        if places:
            at = min(places)
            return k, text[: at + max(len(s) for s in stops if text.find(s, at) == at) if include else at]
    return None


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("split", [False, True])
def test_random_stop_sets_stream_and_generate_agree_with_brute_force(llm, split):
    """Over random stop sets drawn from a seeded sampled completion (pieces of it, characters split across
    tokens, strings that never occur): ``generate`` and ``stream`` give the same text, the tokens up to
    the one that completed the stop string, one logprob a token, and the brute-force cut."""
    rng = random.Random(0)
    bias = tuple((t, 10.0) for t in sorted(set(byte_ids(llm, SPLIT)))) if split else ()
    base = SamplingParams(
        temperature=1.0, seed=5, max_tokens=48, ignore_eos=True, logprobs=0, logit_bias=bias
    )
    full = llm.generate("Once upon a time", base)[0]
    text = full.text
    assert len(full.token_ids) == 48 and any(ord(ch) > 0x2E7F for ch in text)  # CJK or emoji among them
    if split:  # tokens that are not whole characters (U+FFFD where their neighbours do not complete them)
        assert sum(not is_utf8(llm.tokenizer.token_bytes(t)) for t in full.token_ids) >= 3
    for _ in range(RANDOM_RUNS):
        stops = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.8:
                start = rng.randrange(len(text))
                stops.append(text[start : start + rng.randint(1, 6)])
            else:
                stops.append("".join(rng.choice("xyz" + SPLIT) for _ in range(rng.randint(1, 3))))
        include, floor = rng.random() < 0.3, rng.choice([0, 0, rng.randint(1, 12)])
        fields = {"stop": tuple(stops), "include_stop_str_in_output": include, "min_tokens": floor}
        params = SamplingParams(**{**base.__dict__, **fields})
        done = llm.generate("Once upon a time", params)[0]
        deltas = list(llm.stream("Once upon a time", params))
        streamed = "".join(d.text for d in deltas)
        want = expected_cut(llm, full.token_ids, stops, include, floor)
        k, cut = want if want is not None else (48, text)
        assert (done.text, streamed, done.token_ids) == (cut, cut, full.token_ids[:k]), (stops, floor)
        assert done.finish_reason == ("stop" if want else "length") == deltas[-1].finish_reason
        assert [t for d in deltas for t in d.token_ids] == done.token_ids
        assert done.logprobs == full.logprobs[:k] and len(deltas[-1].completion.logprobs) == k


def test_an_empty_stop_string_is_refused_not_dropped():
    with pytest.raises(SamplingParamsError, match="^stop cannot contain an empty string$"):
        SamplingParams(stop=("a", ""))
    with pytest.raises(SamplingParamsError, match="^stop cannot contain an empty string$"):
        SamplingParams(stop="")


def test_a_stop_string_spelling_eos_stops_on_it_under_ignore_eos(llm):
    """ignore_eos lets the model go past eos, but a stop string that spells it still asks to stop there
    (it stopped only when eos itself ended the request, so under ignore_eos it never did)."""
    im_end = llm.tokenizer.added_tokens["<|im_end|>"]
    assert im_end in llm.eos_token_ids
    forced = dict(temperature=1.0, seed=1, max_tokens=6, ignore_eos=True, logit_bias=((im_end, 100.0),))
    cut = llm.generate("Hi", SamplingParams(**forced, stop=("<|im_end|>",)))[0]
    assert (cut.token_ids, cut.text, cut.finish_reason) == ([im_end], "", "stop")
    kept = llm.generate("Hi", SamplingParams(**forced, stop=("<|im_end|>",), include_stop_str_in_output=True))
    assert (kept[0].token_ids, kept[0].text, kept[0].finish_reason) == ([im_end], "<|im_end|>", "stop")
    on = llm.generate("Hi", SamplingParams(**forced))[0]  # without the stop string: on to max_tokens
    assert (on.token_ids, on.text, on.finish_reason) == ([im_end] * 6, "", "length")


@pytest.mark.parametrize("stop", ["<|im_start|>user", "\n<|im_end|>", "a<|endoftext|>b"])
def test_a_stop_string_spanning_a_special_token_and_text_is_refused_in_one_line(llm, stop):
    """A special token's text never shows in the reply (skip_special_tokens, as vLLM's default), so such
    a stop string could never be found: vLLM takes it and never stops; here it is refused, naming the
    token to stop on instead (a stop string that is the token alone stops on it)."""
    special = next(t for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>") if t in stop)
    with pytest.raises(SamplingParamsError) as e:
        llm.generate("Hi", SamplingParams(max_tokens=2, stop=("ok", stop)))
    assert str(e.value) == (
        f"stop string {stop!r} holds the special token {special} and other text, but special tokens "
        f"never show in the text, so it could never be found: stop on {special!r} alone"
    )
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_stop_reason_names_what_stopped_the_request(llm):
    """vLLM's stop_reason: the stop string found, the stop_token_ids id, None for eos and length."""
    base = dict(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    full = llm.generate("Once upon a time", SamplingParams(**base))[0]
    assert (full.finish_reason, full.stop_reason) == ("length", None)
    piece = full.text[5:8]
    cut = llm.generate("Once upon a time", SamplingParams(**base, stop=("zzz", piece)))[0]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", piece)
    token = full.token_ids[3]
    by_id = llm.generate("Once upon a time", SamplingParams(**base, stop_token_ids=(token,)))[0]
    assert (by_id.finish_reason, by_id.stop_reason, by_id.token_ids[-1]) == ("stop", token, token)
    im_start, im_end = (llm.tokenizer.added_tokens[t] for t in ("<|im_start|>", "<|im_end|>"))
    forced = {**base, "logit_bias": ((im_start, 100.0),), "stop": ("<|im_start|>",)}
    special = llm.generate("Hi", SamplingParams(**forced))[0]
    assert (special.finish_reason, special.stop_reason) == ("stop", "<|im_start|>")
    eos = {**base, "ignore_eos": False, "logit_bias": ((im_end, 100.0),)}
    ended = llm.generate("Hi", SamplingParams(**eos))[0]
    assert (ended.token_ids, ended.finish_reason, ended.stop_reason) == ([im_end], "stop", None)


def test_min_tokens_bans_the_tokens_that_would_end_the_request_until_then(llm):
    """vLLM's min_tokens: eos (unless ignore_eos) and stop_token_ids cannot be sampled before it."""
    im_end = llm.tokenizer.added_tokens["<|im_end|>"]
    token = llm.tokenizer.encode(" hello")[0]
    base = dict(temperature=1.0, seed=2, max_tokens=8)
    for forced, extra in ((((im_end, 100.0),), {}), (((token, 100.0),), {"stop_token_ids": (token,)})):
        ended = llm.generate("Hi", SamplingParams(**base, **extra, logit_bias=forced))[0]
        assert (len(ended.token_ids), ended.finish_reason) == (1, "stop")
        held = llm.generate("Hi", SamplingParams(**base, **extra, logit_bias=forced, min_tokens=3))[0]
        ending = forced[0][0]
        assert ending not in held.token_ids[:3] and held.token_ids[3:] == [ending]
        assert (len(held.token_ids), held.finish_reason) == (4, "stop")


def test_min_tokens_beyond_max_tokens_is_refused_in_one_line():
    with pytest.raises(SamplingParamsError, match=r"^min_tokens must be in \[0, max_tokens=4\], got 5$"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_a_special_token_stop_string_waits_for_min_tokens(llm):
    im_start = llm.tokenizer.added_tokens["<|im_start|>"]
    forced = dict(
        temperature=1.0, seed=1, max_tokens=6, logit_bias=((im_start, 100.0),), stop=("<|im_start|>",)
    )
    done = llm.generate("Hi", SamplingParams(**forced, min_tokens=2))[0]
    assert (done.token_ids, done.text, done.finish_reason, done.stop_reason) == (
        [im_start] * 3,
        "",
        "stop",
        "<|im_start|>",
    )
