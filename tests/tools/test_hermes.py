"""Hermes parser on recorded Qwen outputs: whole, and streamed split at every token and character boundary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

from factories import qwen3_tokenizer_dir

from qwenkit.tokenizer import StreamingDetokenizer, load_tokenizer
from qwenkit.tools.calls import collect
from qwenkit.tools.hermes import HermesParser, parse_hermes

# Outputs in the form Qwen2.5/Qwen3 emit them (Qwen's function-calling docs, vLLM's hermes tests).
PARALLEL = (
    '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", '
    '"date": "2024-10-01"}}'
    "\n</tool_call>"
)
THINKING = (
    "<think>\nThe user wants the weather in Paris, so I call get_weather.\n</think>\n\n"
    "Let me check that for you.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
)
NESTED = (
    '<tool_call>\n{"name": "search", "arguments": {"search_request": {"query": "latest papers <b>", '
    '"filters": [1, 2, {"x": null}]}, "retrieval_method": "rrf"}}\n</tool_call>'
)
NO_ARGS = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
STRING_ARGS = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
# A function without parameters, called with null arguments or none: a call with ``{}``, as a history sent
# back reads it (vLLM's hermes parser sends the text "null" for the first, and content for the second).
NULL_ARGS = (
    'Now.\n<tool_call>\n{"name": "get_time", "arguments": null}\n</tool_call>\n'
    '<tool_call>\n{"name": "f"}\n</tool_call>'
)
MALFORMED = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'
TRUNCATED = 'x<tool_call>\n{"name": "get_weather", "arguments": {"ci'
PLAIN = "Paris is sunny <tool today.\n\n"
CJK = '你好。<tool_call>\n{"name": "查询", "arguments": {"城市": "北京"}}\n</tool_call>'
# The model's own spacing is kept: arguments are the text it wrote, not a re-serialization.
COMPACT = '<tool_call>\n{"name": "f", "arguments": {"a":[1,2],"b":"x"}}\n</tool_call>'
# A closing tag inside an argument string is text of the argument, not the end of the block.
TAG_IN_STRING = '<tool_call>\n{"name": "echo", "arguments": {"text": "say </tool_call> \\" {"}}\n</tool_call>'
# Python-style arguments: never started as a call, returned as text.
PYTHONIC = '<tool_call>\n{"name": "f", "arguments": {\'a\': 1}}\n</tool_call>'
# Malformed after the call started (the arguments never close).
BROKEN_ARGS = 'Ok.<tool_call>\n{"name": "f", "arguments": {"a": "x"\n</tool_call>\nbye'

# Two calls in one block (one JSON value each, not one between the tags); a list of calls; not JSON.
TWO_IN_ONE = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n{"name": "g", "arguments": {}}\n</tool_call>'
CALL_LIST = '<tool_call>\n[{"name": "f", "arguments": {"a": 1}}]\n</tool_call>'
NOT_JSON = "x<tool_call>\nf(a=1)\n</tool_call>"

CASES = {
    "parallel": (PARALLEL, {}),
    "thinking": (THINKING, {"reasoning": True}),
    "nested": (NESTED, {}),
    "no_args": (NO_ARGS, {}),
    "string_args": (STRING_ARGS, {}),
    "null_args": (NULL_ARGS, {}),
    "malformed": (MALFORMED, {}),
    "truncated": (TRUNCATED, {}),
    "plain": (PLAIN, {}),
    "cjk": (CJK, {}),
    "no_tools": (PARALLEL, {"tools": False}),
    "compact": (COMPACT, {}),
    "tag_in_string": (TAG_IN_STRING, {}),
    "pythonic": (PYTHONIC, {}),
    "broken_args": (BROKEN_ARGS, {}),
    "two_in_one": (TWO_IN_ONE, {}),
    "call_list": (CALL_LIST, {}),
    "not_json": (NOT_JSON, {}),
}


def test_parallel_calls_whole():
    m = parse_hermes(PARALLEL)
    assert m.content == "" and m.warnings == []
    assert [c.name for c in m.tool_calls] == ["get_current_temperature", "get_temperature_date"]
    assert json.loads(m.tool_calls[1].arguments) == {
        "location": "San Francisco, CA, USA",
        "date": "2024-10-01",
    }
    assert all(isinstance(c.arguments, str) for c in m.tool_calls)
    assert len({c.id for c in m.tool_calls}) == 2 and all(len(c.id) > 16 for c in m.tool_calls)


def test_thinking_split_from_content_and_call():
    m = parse_hermes(THINKING, reasoning=True)
    assert m.reasoning == "The user wants the weather in Paris, so I call get_weather."
    assert m.content == "Let me check that for you."
    assert [(c.name, json.loads(c.arguments)) for c in m.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"})
    ]
    opened = parse_hermes(THINKING.removeprefix("<think>\n"), reasoning=True, in_reasoning=True)
    assert (opened.reasoning, opened.content) == (m.reasoning, m.content)


def test_nested_arguments_kept_whole():
    (call,) = parse_hermes(NESTED).tool_calls
    assert json.loads(call.arguments) == {
        "search_request": {"query": "latest papers <b>", "filters": [1, 2, {"x": None}]},
        "retrieval_method": "rrf",
    }


def test_empty_and_string_arguments():
    assert parse_hermes(NO_ARGS).tool_calls[0].arguments == "{}"
    assert json.loads(parse_hermes(STRING_ARGS).tool_calls[0].arguments) == {"a": 1}
    m = parse_hermes(NULL_ARGS)
    assert [(c.name, c.arguments) for c in m.tool_calls] == [("get_time", "{}"), ("f", "{}")]
    assert (m.content, m.warnings) == ("Now.", [])


def test_malformed_and_truncated_become_content_with_warning():
    m = parse_hermes(MALFORMED)
    assert (
        m.tool_calls == []
        and m.content == 'Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'
    )
    assert len(m.warnings) == 1 and "not JSON" in m.warnings[0]
    t = parse_hermes(TRUNCATED)
    assert t.tool_calls == [] and t.content == TRUNCATED and len(t.warnings) == 1
    assert "was cut off" in t.warnings[0]


def test_blocks_that_are_not_one_call_are_text():
    """As vLLM's hermes parser reads them (its json.loads fails): the block verbatim as content, one
    warning each; only a streamed call that had started whole (the first of two in a block) is taken
    back by a call_broken event."""
    for text in (TWO_IN_ONE, CALL_LIST, NOT_JSON):
        m = parse_hermes(text)
        assert (m.content, m.tool_calls, len(m.warnings)) == (text, [], 1)
        assert "is not JSON with a name and object arguments" in m.warnings[0]
    parser = HermesParser()
    kinds = [e.kind for e in parser.feed(TWO_IN_ONE) + parser.finish()]
    assert kinds == ["call_start", "call_args", "call_broken", "content"]


def test_arguments_are_the_text_the_model_wrote():
    assert parse_hermes(COMPACT).tool_calls[0].arguments == '{"a":[1,2],"b":"x"}'
    (call,) = parse_hermes(TAG_IN_STRING).tool_calls
    assert json.loads(call.arguments) == {"text": 'say </tool_call> " {'}


def test_pythonic_arguments_never_start_a_call():
    parser = HermesParser()
    events = [e for ch in PYTHONIC for e in parser.feed(ch)] + parser.finish()
    assert [e.kind for e in events] == ["content"] and events[0].text == PYTHONIC
    assert len(parser.warnings) == 1


def test_call_broken_after_start_is_content_after_its_start():
    parser = HermesParser()
    events = [e for ch in BROKEN_ARGS for e in parser.feed(ch)] + parser.finish()
    kinds = [e.kind for e in events if e.kind != "call_args"]
    kinds = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]  # runs of text as one
    assert kinds == ["content", "call_start", "call_broken", "content"]
    assert "".join(e.text for e in events if e.kind == "call_args") == '{"a": "x"\n'
    m = collect(events, parser.warnings)
    assert m.content == 'Ok.<tool_call>\n{"name": "f", "arguments": {"a": "x"\n</tool_call>bye'
    assert m.tool_calls == [] and len(m.warnings) == 1


def test_long_arguments_stream_while_the_model_writes(qwen3_tokenizer):
    """Token by token, the arguments go out in many pieces, each as soon as its token is decoded:
    all but the closing brace before the model has written the end of the block."""
    long_text = " ".join(f"word{i}" for i in range(60))
    args = f'{{"path": "a.txt", "text": "{long_text}"}}'
    text = f'<tool_call>\n{{"name": "write", "arguments": {args}}}\n</tool_call>'
    ids = qwen3_tokenizer.encode(text, allow_special=True)
    detok = StreamingDetokenizer(qwen3_tokenizer, skip_special=True)
    parser, seen, args_pieces, complete_when_sent, events = HermesParser(), "", [], [], []
    for i in ids:
        piece = detok.add(i)
        seen += piece
        for e in parser.feed(piece):
            if e.kind == "call_args":
                args_pieces.append(e.text)
                complete_when_sent.append("}}" in seen)
            elif e.kind != "call_start":
                events.append(e)
    assert not any(complete_when_sent[:-1])  # all but the last before the block's JSON was complete
    events += parser.finish()
    assert [e.kind for e in events] == ["tool_call"]
    assert "".join(args_pieces) == events[0].call.arguments == args
    assert json.loads(events[0].call.arguments)["text"] == long_text
    assert len(args_pieces) > 30


def test_without_tools_text_is_verbatim():
    assert parse_hermes(PARALLEL, tools=False).content == PARALLEL
    assert parse_hermes(PLAIN).content == PLAIN  # a partial tag that never completes is text


def _check_call_events(events: list) -> None:
    """Each call: one start (name, no arguments yet), then argument pieces, then done or broken; a
    done call's arguments are its pieces joined, byte for byte."""
    pieces: dict[str, list[str]] = {}
    for e in events:
        if e.kind == "call_start":
            assert e.call.id not in pieces and e.call.name
            pieces[e.call.id] = []
        elif e.kind == "call_args":
            assert e.text and e.call.id in pieces
            pieces[e.call.id].append(e.text)
        elif e.kind in ("tool_call", "call_broken"):
            joined = "".join(pieces.pop(e.call.id))
            if e.kind == "tool_call":
                assert joined == e.call.arguments and isinstance(json.loads(joined), dict)
    assert pieces == {}, "a started call never finished"


def _stream(pieces: list[str], options: dict) -> tuple:
    parser = HermesParser(**options)
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    _check_call_events(events)
    for e in events:  # markup never leaks into streamed text
        if options.get("tools", True) and (
            e.kind == "reasoning" or (e.kind == "content" and not parser.warnings)
        ):
            assert "<tool_call>" not in e.text and "</tool_call>" not in e.text
    m = collect(events, parser.warnings)
    started = sum(e.kind == "call_start" for e in events)
    return m.content, m.reasoning, [(c.name, c.arguments) for c in m.tool_calls], len(m.warnings), started


def _whole(text: str, options: dict) -> tuple:
    return _stream([text], options)


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    return load_tokenizer(qwen3_tokenizer_dir())


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_token_by_token_equals_whole(name, qwen3_tokenizer):
    text, options = CASES[name]
    ids = qwen3_tokenizer.encode(text, allow_special=True)
    detok = StreamingDetokenizer(qwen3_tokenizer, skip_special=True)
    pieces = [detok.add(i) for i in ids] + [detok.finalize()]
    assert "".join(pieces) == text
    assert _stream(pieces, options) == _whole(text, options)


@pytest.mark.parametrize("name", list(CASES))
def test_split_at_every_character_boundary_equals_whole(name):
    text, options = CASES[name]
    whole = _whole(text, options)
    for cut in range(len(text) + 1):
        assert _stream([text[:cut], text[cut:]], options) == whole, cut
    assert _stream(list(text), options) == whole
