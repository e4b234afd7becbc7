"""Llama 3.1/3.2's bare JSON tool calls: whole, and streamed split at every character (the two agree); the
format is read from the template text; the grammar that forces it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from llama_tokenizers import LLAMA32_TEMPLATE, write_llama32_chat_model
from scripted import ScriptedModel, steer_next_request

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM
from qwenkit.tokenizer.chat_template import chatml_template
from qwenkit.tools.agent import Agent, Tool
from qwenkit.tools.calls import collect
from qwenkit.tools.grammar import llama3_call_grammar
from qwenkit.tools.llama3_json import Llama3JsonParser, parse_llama3_json
from qwenkit.tools.template_style import call_format, template_style

WEATHER = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'

# reply -> (content, [(name, arguments)], number of warnings)
CASES = {
    "one": (WEATHER, ("", [("get_weather", '{"city": "Paris", "unit": "c"}')], 0)),
    # Llama 3.1 writes <|python_tag|> before calls; "arguments" is read as vLLM reads it; nested brackets
    # and a "}" inside a string do not end the arguments
    "two_tagged": (
        '<|python_tag|>{"name": "get_time", "arguments": {}}; '
        '{"name": "search", "parameters": {"q": "a } b", "filters": [1, {"x": null}]}}\n',
        ("", [("get_time", "{}"), ("search", '{"q": "a } b", "filters": [1, {"x": null}]}')], 0),
    ),
    "spacing_kept": (
        '  {"name":"f","parameters":{"a":[1,2],"b":"x"}}',
        ("", [("f", '{"a":[1,2],"b":"x"}')], 0),
    ),
    # not in the header's order: parsed whole at its end
    "typed": (
        '{"type": "function", "name": "f", "parameters": {"a": 1}}',
        ("", [("f", '{"a": 1}')], 0),
    ),
    "text": ("It is sunny in Paris.", ("It is sunny in Paris.", [], 0)),
    "text_then_json": ("Sure: " + WEATHER, ("Sure: " + WEATHER, [], 0)),
    # a JSON answer is content; no warning, it never looked like a call
    "json_answer": ('\n{"city": "Paris"}', ('\n{"city": "Paris"}', [], 0)),
    # null arguments are none, as a history sent back reads them (a function without parameters)
    "null_parameters": ('{"name": "get_time", "parameters": null}', ("", [("get_time", "{}")], 0)),
    "no_parameters": ('{"name": "Bob"}', ('{"name": "Bob"}', [], 1)),
    "followed_by_text": (WEATHER + " Done.", (WEATHER + " Done.", [], 1)),
    "cut_off": (
        '{"name": "get_weather", "parameters": {"ci',
        ('{"name": "get_weather", "parameters": {"ci', [], 1),
    ),
    "pythonic": (
        '{"name": "f", "parameters": {\'a\': 1}}',
        ('{"name": "f", "parameters": {\'a\': 1}}', [], 1),
    ),
    # a later object that is no call ends the calls: it is content, the first call stays
    "call_then_text": (
        WEATHER + "; thanks",
        ("thanks", [("get_weather", '{"city": "Paris", "unit": "c"}')], 0),
    ),
    "tag_alone": ("<|python_tag|>", ("<|python_tag|>", [], 0)),
}


def _streamed(text: str, pieces: list[str]):
    parser = Llama3JsonParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return events, collect(events, parser.warnings)


@pytest.mark.parametrize("name", list(CASES))
def test_whole_and_streamed_agree(name):
    text, (content, calls, warnings) = CASES[name]
    whole = parse_llama3_json(text)
    assert (whole.content, [(c.name, c.arguments) for c in whole.tool_calls]) == (content, calls)
    assert len(whole.warnings) == warnings
    events, streamed = _streamed(text, list(text))
    assert (streamed.content, [(c.name, c.arguments) for c in streamed.tool_calls]) == (content, calls)
    assert streamed.warnings == whole.warnings
    # every started call either completes or is broken, and its streamed pieces are its arguments
    for start in [e for e in events if e.kind == "call_start"]:
        ends = [e.kind for e in events if e.call is start.call and e.kind in ("tool_call", "call_broken")]
        assert len(ends) == 1
        if ends == ["tool_call"]:
            pieces = "".join(e.text for e in events if e.kind == "call_args" and e.call is start.call)
            assert pieces == start.call.arguments


def test_arguments_stream_as_the_model_writes_them():
    """A call starts once its name and the opening of its parameters show, then its arguments go out
    piece by piece, before the object closes; nothing is content."""
    text = '{"name": "save_note", "parameters": {"body": "' + "step, " * 20 + '"}}'
    events, parsed = _streamed(text, [text[i : i + 5] for i in range(0, len(text), 5)])
    kinds = [e.kind for e in events]
    assert kinds[0] == "call_start" and events[0].call.name == "save_note"
    assert kinds[-1] == "tool_call" and "content" not in kinds
    args = [e.text for e in events if e.kind == "call_args"]
    assert len(args) > 20 and "".join(args) == text[len('{"name": "save_note", "parameters": ') : -1]
    assert json.loads(parsed.tool_calls[0].arguments) == {"body": "step, " * 20}


def test_a_call_broken_after_it_started_is_sent_back_as_text():
    text = '{"name": "f", "parameters": {"a": "x"}, "parameters": {"a": "y"}}'  # JSON keeps the last
    events, parsed = _streamed(text, list(text))
    assert [e.kind for e in events if e.kind != "call_args"][:2] == ["call_start", "call_broken"]
    assert (parsed.content, parsed.tool_calls) == (text, [])
    assert parsed.warnings == [
        f"a JSON tool call is not JSON with a name and object parameters; returned as text: {text!r}"
    ]


def test_call_format_is_read_from_the_template(tiny_chat_model):
    from qwenkit.tokenizer import load_tokenizer

    assert call_format(LLAMA32_TEMPLATE) == "llama3_json"
    style = template_style(LLAMA32_TEMPLATE)
    assert (style.calls, style.react, style.reasoning, style.stop) == ("llama3_json", False, False, ())
    assert call_format(load_tokenizer(tiny_chat_model).chat_template) == "hermes"
    assert call_format(chatml_template()) == "react"
    # a template that renders tools but asks for no format a reply could be parsed for: ReAct
    cut = LLAMA32_TEMPLATE.replace("JSON for a function call", "function call")
    assert call_format(cut) == "react"
    # Llama 3.1's template names <|python_tag|> (its built-in tools) beside the JSON instruction
    tagged = cut.replace("{{- bos_token }}", "{{- bos_token }}{#- <|python_tag|> #}")
    assert call_format(tagged) == "llama3_json"


def test_grammar_spells_one_call_as_the_template_asks():
    fns = [
        {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
        {"name": "get_weather"},
    ]
    lines = llama3_call_grammar(fns).splitlines()
    assert lines[:2] == [
        "start: call0 | call1",
        'call0: "{\\"name\\": \\"get_time\\", \\"parameters\\": " args0 "}"',
    ]
    assert lines[3] == 'call1: "{\\"name\\": \\"get_weather\\", \\"parameters\\": " args1 "}"'
    assert lines[4].startswith(
        'args1: %json {"type": "object", "properties": {}, "additionalProperties": false'
    )


def scripted_adder(tmp_path, *replies: str) -> tuple[LLM, Agent, Tool]:
    """An agent with an ``add`` tool over a tiny Llama 3.2 chat model whose replies are ``replies``, in
    order."""
    loaded = LLM.load(
        write_llama32_chat_model(tmp_path / "m"), dtype="float32", max_batch_size=2, progress=False
    )
    model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens["<|eot_id|>"])
    llm = LLM(model, loaded.tokenizer, max_batch_size=2, max_seq_len=2048)
    pending = steer_next_request(llm, model)
    pending.extend(llm.tokenizer.encode(reply, allow_special=True) for reply in replies)
    ints = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    add = Tool("add", lambda a, b: a + b, "Add two integers", ints)
    return llm, Agent(llm, [add], params=SamplingParams(max_tokens=100, temperature=0)), add


def test_agent_calls_through_llama_json(tmp_path):
    """The agent on a Llama 3.2 template: the tools in the template's prompt, the JSON reply run as a call,
    its result sent back as the template's ``ipython`` turn, then the answer."""
    llm, agent, add = scripted_adder(
        tmp_path, '{"name": "add", "parameters": {"a": 2, "b": 3}}', "The answer is 5."
    )
    result = agent.run("What is 2+3?")
    assert result.answer == "The answer is 5."
    assert [m["role"] for m in result.messages] == ["user", "assistant", "tool", "assistant"]
    assert result.messages[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 2, "b": 3}}
    assert result.messages[2]["content"] == "5"
    second = llm.tokenizer.decode(agent.style.tool_prompt(llm.tokenizer, result.messages[:3], [add.spec()]))
    assert "Given the following functions" in second and "Action Input" not in second
    assert second.endswith(
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "add", "parameters": {"a": 2, "b": 3}}'
        '<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"5"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_agent_sends_several_calls_back_one_per_turn(tmp_path):
    """Llama 3.2 may write several calls split by ';', but Meta's template renders one call per assistant
    turn (it raises on more): the agent runs them all and sends each back as its own turn with its
    result, in the order written; the next prompt rendered (it failed in the template)."""
    two = '{"name": "add", "parameters": {"a": 2, "b": 3}}; {"name": "add", "parameters": {"a": 1, "b": 1}}'
    llm, agent, add = scripted_adder(tmp_path, two, "5 and 2.")
    result = agent.run("What are 2+3 and 1+1?")
    assert result.answer == "5 and 2."
    roles = [m["role"] for m in result.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    calls = [m["tool_calls"] for m in result.messages if m.get("tool_calls")]
    assert [[c["function"]["arguments"] for c in turn] for turn in calls] == [
        [{"a": 2, "b": 3}],
        [{"a": 1, "b": 1}],
    ]
    assert [m["content"] for m in result.messages if m["role"] == "tool"] == ["5", "2"]
    second = llm.tokenizer.decode(agent.style.tool_prompt(llm.tokenizer, result.messages[:5], [add.spec()]))
    assert second.endswith(
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "add", "parameters": {"a": 2, "b": 3}}'
        '<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"5"<|eot_id|>'
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "add", "parameters": {"a": 1, "b": 1}}'
        '<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"2"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
