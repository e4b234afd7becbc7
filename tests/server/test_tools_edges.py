"""Tool calling at its edges, on a hermes template (steered replies): arguments the model wrote as a JSON
string, ``response_format`` beside ``tools``, calls cut off by ``max_tokens`` and malformed blocks, each
read the same whole, streamed and on the Responses route.

Real clients: the openai SDK (chat, whole and streamed) and httpx (the Responses route's items and
events)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import play, steered_server
from tool_requests import TIME, USER, WEATHER, chat_reply, client, post


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    with steered_server(tiny_chat_model) as served:
        yield served


def warnings(caplog) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if "<tool_call> block" in rec.getMessage()]


def responses_tools() -> list[dict]:
    return [{"type": "function", **tool["function"]} for tool in (WEATHER, TIME)]


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


# ---- arguments written as a JSON string ----------------------------------------------------------

# Qwen2.5 sometimes writes the arguments as a string holding the object; vLLM's hermes parser sends
# json.dumps of that string (encoded twice); the client must get the object's JSON text, once encoded.
STRING_ARGS = (
    '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"c\\"}"}'
    "\n</tool_call>"
)
ARGS = '{"city": "Paris", "unit": "c"}'


def test_string_arguments_are_the_object_once_encoded_everywhere(steered, caplog):
    live = steered[0]
    for stream in (False, True):
        play(steered, STRING_ARGS)
        r = chat_reply(client(live), stream, model="tiny", max_tokens=200, messages=USER, tools=[WEATHER])
        assert (r.pairs, r.finish, r.content or "") == ([("get_weather", ARGS)], "tool_calls", "")
    play(steered, STRING_ARGS)
    body = {"input": USER, "tools": responses_tools(), "max_output_tokens": 200}
    out = post(live.url + "/v1/responses", json=body).json()["output"]
    assert [(o["type"], o["name"], o["arguments"]) for o in out] == [("function_call", "get_weather", ARGS)]
    play(steered, STRING_ARGS)
    events = sse_events(post(live.url + "/v1/responses", json={**body, "stream": True}).text)
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert ("".join(deltas), done["arguments"]) == (ARGS, ARGS)
    assert warnings(caplog) == []


QWEN25_TEMPLATE = (Path(__file__).parents[1] / "tokenizer" / "qwen25_chat_template.jinja").read_text()


def test_a_returned_call_sent_back_renders_as_qwen25s_template_renders_the_object(steered, monkeypatch):
    """The call as the client got it (arguments: the object's JSON text) sent back in the history: the
    real Qwen2.5 template pipes arguments through ``tojson``, so the prompt must be transformers' render
    of the object (``"arguments": {...}``), never the string encoded again (which teaches the model the
    string form)."""
    import transformers
    from factories import qwen3_tokenizer_dir

    from qwenkit.server.completions import chat_prompt
    from qwenkit.server.schemas import ChatCompletionRequest

    llm = steered[1]
    monkeypatch.setattr(llm.tokenizer, "chat_template", QWEN25_TEMPLATE)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}
    history = [*USER, {"role": "assistant", "content": "", "tool_calls": [call]}]
    history.append({"role": "tool", "tool_call_id": "call_1", "content": "sunny"})
    ids = chat_prompt(llm, ChatCompletionRequest(messages=history, tools=[WEATHER]))
    as_object = json.loads(json.dumps(history))
    as_object[1]["tool_calls"][0]["function"]["arguments"] = json.loads(ARGS)
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    want = hf.apply_chat_template(
        as_object, tools=[WEATHER], chat_template=QWEN25_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert llm.tokenizer.decode(ids) == want
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
        in want
    )


# ---- response_format beside tools ----------------------------------------------------------------

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
COMPACT_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris","unit":"c"}}\n</tool_call>'
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt", [JSON_SCHEMA, {"type": "json_object"}])
def test_auto_tools_with_a_response_format_may_still_call(steered, stream, fmt):
    """tool_choice "auto" with a response format: the model either calls a tool or answers in the
    format, as OpenAI's do (an agent with an output type calls its tools first). The format alone used
    to be enforced, so the call the model chose was masked away and no tool could ever be called."""
    live = steered[0]
    kwargs = dict(model="tiny", max_tokens=100, messages=USER, tools=[WEATHER, TIME], response_format=fmt)
    play(steered, COMPACT_CALL)
    r = chat_reply(client(live), stream, **kwargs, extra_body=NO_THINKING)
    assert (r.pairs, r.finish) == ([("get_weather", '{"city":"Paris","unit":"c"}')], "tool_calls"), r
    assert not r.content
    play(steered, '{"answer":"sunny"}')
    r = chat_reply(client(live), stream, **kwargs, extra_body=NO_THINKING)
    assert (r.content, r.pairs, r.finish) == ('{"answer":"sunny"}', [], "stop")
    play(steered, "It is sunny.")  # neither: the grammar holds the reply to one or the other
    r = chat_reply(client(live), stream, **kwargs, extra_body=NO_THINKING)
    assert not (r.content or "").startswith("It is"), r


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_beside_a_response_format(steered, choice):
    """A forced call is the reply, as OpenAI's: the response format has no text to shape. The format is
    still checked as it is without tools: one no JSON matches is a 400 naming it (it was ignored)."""
    live = steered[0]
    body = {"messages": USER, "tools": [WEATHER, TIME], "tool_choice": choice, "max_tokens": 100}
    play(steered, COMPACT_CALL)
    r = chat_reply(client(live), False, model="tiny", **{**body, "response_format": JSON_SCHEMA})
    assert r.pairs == [("get_weather", '{"city":"Paris","unit":"c"}')] and not r.content
    assert r.finish == ("tool_calls" if choice == "required" else "stop")
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}
    r = post(live.url + "/v1/chat/completions", json={**body, "response_format": bad})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format"
    assert (
        err["message"]
        == "the schema cannot be used for constrained decoding: no JSON value matches the schema"
    )


# ---- cut off by max_tokens -----------------------------------------------------------------------

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'


def test_a_call_cut_off_by_max_tokens(steered, caplog):
    """finish_reason "length"; whole: no call, the raw text as content; streamed: the call started
    before the cut stays (a stream cannot take it back), then the same raw text; one warning per
    request, not one per chunk."""
    live = steered[0]
    llm = steered[1]
    cut = len(llm.tokenizer.encode(CALL, allow_special=True)) - 6  # inside the arguments
    replies = []
    for stream in (False, True):
        caplog.clear()
        play(steered, CALL)
        replies.append(
            chat_reply(client(live), stream, model="tiny", max_tokens=cut, messages=USER, tools=[WEATHER])
        )
        (line,) = warnings(caplog)
        assert (
            f"choice 0: a <tool_call> block was cut off; returned as text: {replies[-1].content[:200]!r}"
            in line
        )
    whole, streamed = replies
    assert whole.content.startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"')
    assert not whole.content.endswith("</tool_call>")
    assert (whole.pairs, whole.finish) == ([], "length")
    assert (streamed.content, streamed.finish) == (whole.content, "length")
    ((name, partial),) = streamed.pairs
    assert name == "get_weather" and whole.content.endswith(partial)


# ---- malformed blocks ----------------------------------------------------------------------------


TWO_IN_ONE = CALL.removesuffix("\n</tool_call>") + '\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize(
    ("reply", "started"),
    [
        # two calls in one block: not one JSON value (vLLM's hermes parser returns it as text too); the
        # first had streamed whole before the second showed
        (TWO_IN_ONE, [("get_weather", '{"city": "Paris", "unit": "c"}')]),
        ('<tool_call>\nget_weather(city="Paris")\n</tool_call>', []),  # not JSON
        ('<tool_call>\n[{"name": "get_time", "arguments": {}}]\n</tool_call>', []),  # a list
        ('<tool_call>\n{"name": "get_time", "arguments": "now"}\n</tool_call>', []),  # no object
    ],
)
def test_a_malformed_block_is_text_whole_and_streamed(steered, reply, started, caplog):
    """The raw block as content, finish_reason "stop", one warning; streamed, only a call whose
    arguments had begun to stream shows (and "stop" tells the client not to run it)."""
    live = steered[0]
    for stream in (False, True):
        caplog.clear()
        play(steered, reply)
        r = chat_reply(
            client(live), stream, model="tiny", max_tokens=200, messages=USER, tools=[WEATHER, TIME]
        )
        assert (r.content, r.finish, r.pairs) == (reply, "stop", started if stream else [])
        assert len(warnings(caplog)) == 1


def test_a_call_beside_one_broken_after_it_started_finishes_stop_whole_and_streamed(steered):
    """A complete call, then a block that breaks after its arguments began to stream: the stream cannot
    take that call back, so the reply is not "tool_calls" (a client that runs the calls on it would run
    the broken one); the whole reply finishes the same, with the complete call and the raw block."""
    live = steered[0]
    broken = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"\n</tool_call>'
    good = ("get_weather", '{"city": "Paris", "unit": "c"}')
    replies = []
    for stream in (False, True):
        play(steered, CALL + "\n" + broken)
        r = chat_reply(
            client(live), stream, model="tiny", max_tokens=200, messages=USER, tools=[WEATHER, TIME]
        )
        replies.append((r.content, r.finish, r.pairs))
    assert replies == [
        (broken, "stop", [good]),
        (broken, "stop", [good, ("get_time", '{"tz": "UTC"\n')]),
    ]


def test_calls_outside_the_offer_are_passed_on(steered):
    """A call to a function not in ``tools``, or arguments its schema refuses, is the model's call as
    written (as vLLM's parser passes it on; the client's tool runner decides): nothing is checked
    against the schemas unless a grammar enforced them."""
    live = steered[0]
    unknown = '<tool_call>\n{"name": "launch", "arguments": {"x": 1}}\n</tool_call>'
    mismatch = '<tool_call>\n{"name": "get_weather", "arguments": {"town": 5}}\n</tool_call>'
    unclosed = '<tool_call>\n{"name": "get_time", "arguments": {}}'  # whole JSON: vLLM takes it too
    cases = [
        (unknown, ("launch", '{"x": 1}')),
        (mismatch, ("get_weather", '{"town": 5}')),
        (unclosed, ("get_time", "{}")),
    ]
    for stream in (False, True):
        for reply, pair in cases:
            play(steered, reply)
            r = chat_reply(client(live), stream, model="tiny", max_tokens=200, messages=USER, tools=[WEATHER])
            assert (r.pairs, r.finish, r.content or "") == ([pair], "tool_calls", "")


def test_a_call_broken_after_it_started_on_the_responses_route(steered):
    """The Responses route sends a call only whole (one ``function_call`` item, never a started one), so
    a block that breaks after it began takes nothing back: the response is "completed" with the complete
    call's item and a message holding the broken block's text, whole and streamed alike."""
    live = steered[0]
    broken = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"\n</tool_call>'
    body = {"input": USER, "tools": responses_tools(), "max_output_tokens": 200}
    play(steered, CALL + "\n" + broken)
    whole = post(live.url + "/v1/responses", json=body).json()
    play(steered, CALL + "\n" + broken)
    events = sse_events(post(live.url + "/v1/responses", json={**body, "stream": True}).text)
    streamed = events[-1]["response"]
    good = {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}
    for response in (whole, streamed):
        assert (response["status"], response["incomplete_details"]) == ("completed", None)
        call, message = response["output"]
        assert {key: call[key] for key in good} == good and call["type"] == "function_call"
        assert (message["type"], message["status"]) == ("message", "completed")
        assert [part["text"] for part in message["content"]] == [broken]
    assert events[-1]["type"] == "response.completed"
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["function_call", "message"]  # no item was started for the broken call
