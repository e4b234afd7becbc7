"""Constrained decoding in the engine: masks apply per row; a request's tokens never depend on the batch."""

from __future__ import annotations

import json

import jsonschema
import llguidance
import pytest

from qwenkit.engine import SamplingParams
from qwenkit.errors import GenerationError
from qwenkit.generate import LLM
from qwenkit.tools.grammar import (
    GrammarError,
    after_thinking,
    calls_or_json_grammar,
    declared_properties_only,
    enable_grammars,
    json_schema_grammar,
    react_call_grammar,
    tool_call_grammar,
)
from qwenkit.tools.react import parse_react

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7}, "maxItems": 3},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    llm = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=8, progress=False)
    enable_grammars(llm)
    return llm


@pytest.fixture(scope="module")
def prompts(llm):
    texts = ["Weather?", "Tell me a story", "2+2=", "Paris"]
    return [
        llm.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        for t in texts
    ]


def test_schema_output_validates_and_is_compact(llm, prompts):
    grammar = json_schema_grammar(SCHEMA)
    for seed in range(3):
        c = llm.generate(
            [prompts[0]], SamplingParams(max_tokens=60, temperature=1.0, seed=seed, grammar=grammar)
        )[0]
        assert c.finish_reason == "stop", c.text
        value = json.loads(c.text)
        jsonschema.validate(value, SCHEMA)
        assert c.text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_tool_call_grammar_is_hermes(llm, prompts):
    fn = {"name": "get_weather", "parameters": SCHEMA}
    c = llm.generate(
        [prompts[0]],
        SamplingParams(max_tokens=60, temperature=0, grammar=tool_call_grammar([fn], parallel=False)),
    )[0]
    assert c.text.startswith('<tool_call>\n{"name": "get_weather", "arguments": {') and c.text.endswith(
        "}\n</tool_call>"
    )
    body = json.loads(c.text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    jsonschema.validate(body["arguments"], SCHEMA)


def test_forced_markup_is_the_models_own_tokens(llm, prompts):
    """Text a grammar forces is written in the tokens the model writes it in: Qwen's ``<tool_call>`` and
    ``</tool_call>`` are one added token each, not ``<``, ``tool``, ``_call``, ``>`` (which the model never
    saw, and after which it cannot tell that the call is over)."""
    fn = {"name": "get_weather", "parameters": SCHEMA}
    c = llm.generate(
        [prompts[0]],
        SamplingParams(max_tokens=60, temperature=0, grammar=tool_call_grammar([fn], parallel=False)),
    )[0]
    opening, closing = (llm.tokenizer.added_tokens[t] for t in ("<tool_call>", "</tool_call>"))
    assert c.finish_reason == "stop", c.text
    ids = [t for t in c.token_ids if t not in llm.eos_token_ids]
    assert ids[0] == opening and ids[-1] == closing and ids.count(opening) == ids.count(closing) == 1, ids
    assert c.text.startswith("<tool_call>\n") and c.text.endswith("}\n</tool_call>")


def test_react_call_grammar_is_an_action(llm, prompts):
    """Qwen v1's forced call: ``Action: <name>\\nAction Input: <JSON>``, which parse_react reads back."""
    fns = [{"name": "get_weather", "parameters": SCHEMA}, {"name": "get_time"}]
    for seed in range(2):
        params = SamplingParams(max_tokens=60, temperature=1.0, seed=seed, grammar=react_call_grammar(fns))
        c = llm.generate([prompts[0]], params)[0]
        assert c.finish_reason == "stop", c.text
        (call,) = parse_react(c.text).tool_calls
        head = f"Action: {call.name}\nAction Input: "
        assert c.text.startswith(head) and call.name in ("get_weather", "get_time")
        if call.name == "get_weather":
            jsonschema.validate(json.loads(c.text.removeprefix(head)), SCHEMA)
        else:
            assert c.text == head + "{}"


def test_batched_with_unconstrained_requests_changes_nothing(llm, prompts):
    grammar = json_schema_grammar(SCHEMA)
    free = [
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(max_tokens=12, temperature=0.9, seed=5, top_k=40),
    ]
    bound = [
        SamplingParams(max_tokens=40, temperature=0, grammar=grammar),
        SamplingParams(max_tokens=40, temperature=1.0, seed=7, grammar=grammar),
    ]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts[1:3], free, strict=True)]
    alone += [
        llm.generate([p], sp)[0].token_ids for p, sp in zip([prompts[0], prompts[3]], bound, strict=True)
    ]
    streams = [
        llm.submit(p, sp)
        for p, sp in zip([prompts[1], prompts[2], prompts[0], prompts[3]], free + bound, strict=True)
    ]
    together = []
    for s in streams:
        for _ in s:
            pass
        together.append(s.completion.token_ids)
    assert together == alone
    jsonschema.validate(json.loads(llm.tokenizer.decode(together[3], skip_special=True)), SCHEMA)


# The README's example: properties listed, nothing said about other keys.
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def test_an_object_takes_only_its_listed_properties_unless_its_schema_opens_it(llm, prompts):
    """Objects with ``properties`` and nothing said about other keys take only those, at any depth, in
    response formats and tool arguments alike; ``additionalProperties`` or ``patternProperties`` open an
    object, and one without ``properties`` stays open (``json_object``)."""
    nested = {"type": "object", "properties": {"who": PERSON, "tags": {"type": "array", "items": PERSON}}}
    closed = declared_properties_only(nested)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["who"]["additionalProperties"] is False
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in nested and "additionalProperties" not in PERSON  # copies
    for opened in ({**PERSON, "additionalProperties": True}, {**PERSON, "patternProperties": {"^x": {}}}):
        assert declared_properties_only(opened) == opened
    assert declared_properties_only({"type": "object"}) == {"type": "object"}
    assert declared_properties_only({"type": "object", "properties": {}})["additionalProperties"] is False
    parts = declared_properties_only({"allOf": [PERSON, {"properties": {"city": {"type": "string"}}}]})
    assert all("additionalProperties" not in part for part in parts["allOf"])  # each part: some keys only

    compiler = enable_grammars(llm)

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(compiler.lltokenizer, grammar, log_level=0)
        return (
            all(matcher.consume_token(t) for t in llm.tokenizer.encode_plain(text)) and matcher.is_accepting()
        )

    assert accepts(json_schema_grammar(PERSON), '{"name":"Ann","age":3}')
    assert not accepts(json_schema_grammar(PERSON), '{"name":"Ann","age":3,"city":"Rome"}')
    assert accepts(
        json_schema_grammar({**PERSON, "additionalProperties": True}), '{"name":"Ann","age":3,"x":1}'
    )
    assert accepts(json_schema_grammar(None), '{"any":1}')
    call = tool_call_grammar([{"name": "add", "parameters": nested}], parallel=False)
    assert accepts(
        call, '<tool_call>\n{"name": "add", "arguments": {"who":{"name":"A","age":1}}}\n</tool_call>'
    )
    assert not accepts(
        call, '<tool_call>\n{"name": "add", "arguments": {"who":{"name":"A","age":1,"x":2}}}\n</tool_call>'
    )

    # and a random model, which never knows when to stop, now stops: the object has nowhere else to go
    for seed in range(3):
        params = SamplingParams(
            max_tokens=80, temperature=1.0, seed=seed, grammar=json_schema_grammar(PERSON)
        )
        c = llm.generate([prompts[1]], params)[0]
        assert c.finish_reason == "stop", c.text
        value = json.loads(c.text)
        jsonschema.validate(value, {**PERSON, "additionalProperties": False})


def test_closing_an_object_keeps_the_keys_its_required_and_its_parts_name(llm):
    """Closing an object to its ``properties`` keeps the keys its schema names elsewhere: those it
    ``required``s without describing (any value, as JSON Schema reads them) and those an ``allOf``,
    ``anyOf`` or ``oneOf`` part describes or requires. Closed to ``properties`` alone, these valid
    schemas could match nothing, and were refused as "required property ... is unsatisfiable"."""
    compiler = enable_grammars(llm)

    def accepts(schema: dict, text: str) -> bool:
        grammar = json_schema_grammar(schema)
        compiler.check(grammar)
        matcher = llguidance.LLMatcher(compiler.lltokenizer, grammar, log_level=0)
        return (
            all(matcher.consume_token(t) for t in llm.tokenizer.encode_plain(text)) and matcher.is_accepting()
        )

    undeclared = {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["a"]}
    assert accepts(undeclared, '{"a":[1,"x"]}') and accepts(undeclared, '{"b":2,"a":null}')
    assert not accepts(undeclared, '{"a":1,"c":2}')  # still closed to what the schema names
    assert declared_properties_only(undeclared)["properties"] == {"b": {"type": "integer"}, "a": {}}
    extended = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "allOf": [{"properties": {"b": {"type": "integer"}}, "required": ["b"]}],
    }
    assert accepts(extended, '{"a":1,"b":2}') and not accepts(extended, '{"a":1,"b":"x"}')
    either = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
    }
    assert accepts(either, '{"b":true}') and accepts(either, '{"a":1}') and not accepts(either, "{}")
    # a schema that closes itself is the caller's: nothing is added to it
    own = {"type": "object", "properties": {}, "required": ["a"], "additionalProperties": False}
    assert declared_properties_only(own) == own


def test_a_grammar_completed_by_the_last_token_max_tokens_allows_is_a_stop(llm, prompts):
    """A reply whose grammar ends on the very token ``max_tokens`` allows is whole (nothing more may
    follow it): it finishes "stop", as it does given room to spare, and only a reply cut before its grammar
    ends finishes "length" (the OpenAI SDK's ``parse()`` refuses a "length" reply)."""
    grammar = json_schema_grammar(SCHEMA)
    roomy = llm.generate(
        [prompts[0]], SamplingParams(max_tokens=60, temperature=1.0, seed=1, grammar=grammar)
    )[0]
    assert roomy.finish_reason == "stop"
    jsonschema.validate(json.loads(roomy.text), SCHEMA)
    n = len(roomy.token_ids)  # ended by the grammar: no stop token among them
    for max_tokens, reason in ((n, "stop"), (n - 1, "length")):
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1, grammar=grammar)
        c = llm.generate([prompts[0]], params)[0]
        assert (c.token_ids, c.finish_reason) == (roomy.token_ids[:max_tokens], reason)


def test_a_grammar_that_matches_nothing_is_refused_not_answered_with_an_empty_stop(llm, prompts):
    """llguidance meets a schema no value matches (``{"$ref": "#"}``, itself and nothing else) with no
    allowed token but the end of the text; taken, that was an empty reply finishing "stop". It is
    refused when checked (a 400 on the server), and a request that reaches such a dead end anyway ends
    in an error, never in "stop" with JSON that is not whole."""
    compiler = enable_grammars(llm)
    nothing = json_schema_grammar({"$ref": "#"})
    with pytest.raises(GrammarError, match="no JSON value matches the schema"):
        compiler.check(nothing)
    compiler.check(json_schema_grammar({"anyOf": [{"$ref": "#"}, {"type": "integer"}]}))  # one branch will do
    with pytest.raises(GenerationError, match=r"the grammar rejected token \d+"):
        llm.generate([prompts[0]], SamplingParams(max_tokens=20, temperature=1.0, seed=0, grammar=nothing))


def test_calls_or_json_takes_calls_or_the_formats_json_and_nothing_else(llm):
    """tool_choice "auto" beside a response format: ``<tool_call>`` blocks (several only when parallel)
    or one JSON value of the format (any object without a schema), after thinking where the model may
    think; prose, JSON outside the format, and a call followed by JSON are refused."""
    compiler = enable_grammars(llm)

    def accepts(grammar: str, text: str) -> bool:
        compiler.check(grammar)
        matcher = llguidance.LLMatcher(compiler.lltokenizer, grammar, log_level=0)
        ids = llm.tokenizer.encode_with_added(text)
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    fns = [{"name": "get_weather", "parameters": SCHEMA}, {"name": "get_time"}]
    answer = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    arguments = '{"city":"Paris","days":[1],"unit":"c"}'
    weather = f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'
    time = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    grammar = calls_or_json_grammar(fns, answer)
    for text in (weather, time, f"{weather}\n{time}", '{"answer":"sunny"}'):
        assert accepts(grammar, text), text
    for text in ('{"answer":1}', '{"answer":"x","more":1}', "It is sunny.", f'{weather}\n{{"answer":"x"}}'):
        assert not accepts(grammar, text), text
    single = calls_or_json_grammar(fns, answer, parallel=False)
    assert accepts(single, weather) and not accepts(single, f"{weather}\n{time}")
    anything = calls_or_json_grammar(fns, None)  # json_object: any object, not any value
    assert accepts(anything, '{"x":[1]}') and not accepts(anything, "[1]") and accepts(anything, time)
    thinking = after_thinking(grammar, opened=False)
    assert accepts(thinking, f"<think>\nweather?\n</think>\n\n{weather}") and accepts(thinking, time)
    assert accepts(thinking, '<think>\n</think>\n\n{"answer":"x"}') and not accepts(thinking, "sunny")
    with pytest.raises(GrammarError, match="needs at least one function"):
        calls_or_json_grammar([], answer)


@pytest.mark.parametrize(
    ("style", "call"),
    [
        ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a":1}}\n</tool_call>'),
        ("llama3_json", '{"name":"add","parameters":{"a":1}}'),
        ("react", 'Action: add\nAction Input: {"a":1}'),
    ],
)
def test_calls_or_json_takes_a_call_in_the_templates_format_or_the_answer(llm, style, call):
    """``tool_choice: "auto"`` beside a response format: a call as the template writes it, or the format's
    JSON (its ``$defs`` references still resolve), and nothing else. Llama 3's call is JSON itself: as a
    grammar's alternative its literal ``{"name": `` shut the answer out at the first ``{``."""
    compiler = enable_grammars(llm)
    add = {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    answer = {
        "type": "object",
        "properties": {"answer": {"$ref": "#/$defs/word"}},
        "required": ["answer"],
        "$defs": {"word": {"type": "string", "maxLength": 5}},
    }
    grammar = calls_or_json_grammar([add], answer, style=style)
    compiler.check(grammar)

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(compiler.lltokenizer, grammar, log_level=0)
        ids = compiler.lltokenizer.tokenize_str(text)
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    assert accepts(call) and accepts('{"answer":"sunny"}')
    assert not accepts('{"answer":"cloudy"}')  # the $defs' maxLength holds
    assert not accepts("It is sunny.") and not accepts(call.replace('"a":1', '"a":"x"'))


@pytest.mark.parametrize("style", ["hermes", "llama3_json", "react"])
def test_calls_or_json_resolves_each_functions_own_defs(llm, style):
    """A function whose parameters refer to their own ``$defs`` (as pydantic writes them), beside an
    answer whose ``$defs`` hold another thing under the same name: each ``#/$defs/...`` is its own
    schema's. Llama 3's single schema resolved a function's reference at its root, where there was none
    (or the answer's): the grammar was refused."""
    compiler = enable_grammars(llm)
    day = {"type": "object", "properties": {"day": {"type": "integer"}}, "required": ["day"]}
    book = {
        "name": "book",
        "parameters": {
            "type": "object",
            "properties": {"when": {"$ref": "#/$defs/word"}},
            "required": ["when"],
            "$defs": {"word": day},
        },
    }
    answer = {
        "type": "object",
        "properties": {"answer": {"$ref": "#/$defs/word"}},
        "required": ["answer"],
        "$defs": {"word": {"type": "string", "maxLength": 5}},
    }
    grammar = calls_or_json_grammar([book], answer, style=style)
    compiler.check(grammar)

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(compiler.lltokenizer, grammar, log_level=0)
        ids = compiler.lltokenizer.tokenize_str(text)
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    args = '{"when":{"day":3}}'
    call = {
        "hermes": f'<tool_call>\n{{"name": "book", "arguments": {args}}}\n</tool_call>',
        "llama3_json": f'{{"name":"book","parameters":{args}}}',
        "react": f"Action: book\nAction Input: {args}",
    }[style]
    assert accepts(call) and accepts('{"answer":"sunny"}')
    assert not accepts(call.replace('{"day":3}', '"sunny"')) and not accepts('{"answer":{"day":3}}')
