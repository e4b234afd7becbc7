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
MALFORMED = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'
TRUNCATED = 'x<tool_call>\n{"name": "get_weather", "arguments": {"ci'
PLAIN = "Paris is sunny <tool today.\n\n"
CJK = '你好。<tool_call>\n{"name": "查询", "arguments": {"城市": "北京"}}\n</tool_call>'

CASES = {
    "parallel": (PARALLEL, {}),
    "thinking": (THINKING, {"reasoning": True}),
    "nested": (NESTED, {}),
    "no_args": (NO_ARGS, {}),
    "string_args": (STRING_ARGS, {}),
    "malformed": (MALFORMED, {}),
    "truncated": (TRUNCATED, {}),
    "plain": (PLAIN, {}),
    "cjk": (CJK, {}),
    "no_tools": (PARALLEL, {"tools": False}),
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


def test_malformed_and_truncated_become_content_with_warning():
    m = parse_hermes(MALFORMED)
    assert (
        m.tool_calls == []
        and m.content == 'Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'
    )
    assert len(m.warnings) == 1 and "not JSON" in m.warnings[0]
    t = parse_hermes(TRUNCATED)
    assert t.tool_calls == [] and t.content == TRUNCATED and len(t.warnings) == 1


def test_without_tools_text_is_verbatim():
    assert parse_hermes(PARALLEL, tools=False).content == PARALLEL
    assert parse_hermes(PLAIN).content == PLAIN  # a partial tag that never completes is text


def _stream(pieces: list[str], options: dict) -> tuple:
    parser = HermesParser(**options)
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    for e in events:  # markup never leaks into streamed text
        if e.kind != "tool_call" and options.get("tools", True) and not parser.warnings:
            assert "<tool_call>" not in e.text and "</tool_call>" not in e.text
    m = collect(events, parser.warnings)
    return m.content, m.reasoning, [(c.name, c.arguments) for c in m.tool_calls], len(m.warnings)


def _whole(text: str, options: dict) -> tuple:
    m = parse_hermes(text, **options)
    return m.content, m.reasoning, [(c.name, c.arguments) for c in m.tool_calls], len(m.warnings)


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
