"""Tool calling on the chat route for Llama 3.1/3.2 Instruct templates, which render the tools themselves and
ask for bare ``{"name", "parameters"}`` JSON calls (what vLLM's ``llama3_json`` parser reads): the prompt
as transformers renders it, the calls parsed whole and streamed, the history as Meta's template writes it.

Real clients: the openai SDK."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import play, steered_server
from tool_requests import TIME, USER, WEATHER, WEATHER_FOLLOW_UP, chat_reply, client, post

from qwenkit.server.completions import chat_prompt
from qwenkit.server.schemas import ChatCompletionRequest
from qwenkit.server.tool_use import plan_tools
from qwenkit.tools.template_style import template_messages

DATE = {"date_string": "26 Jul 2024"}  # the template's "Today Date", fixed
WEATHER_JSON = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'
WEATHER_ARGS = '{"city": "Paris", "unit": "c"}'


@pytest.fixture(scope="module")
def llama32_path(tmp_path_factory):
    from llama_tokenizers import write_llama32_chat_model

    return write_llama32_chat_model(tmp_path_factory.mktemp("llama32") / "m")


@pytest.fixture(scope="module")
def steered_llama32(llama32_path):
    with steered_server(llama32_path, end_token="<|eot_id|>") as served:
        yield served


def _reference_text(path: Path, messages: list[dict], tools: list[dict]) -> str:
    """The prompt transformers renders from the same template (call arguments as objects, as Meta's
    template pipes them through ``tojson``)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
    return hf.apply_chat_template(
        template_messages(messages), tools=tools, tokenize=False, add_generation_prompt=True, **DATE
    )


def test_tools_go_in_the_template_and_json_calls_come_back_as_tool_calls(steered_llama32, llama32_path):
    """Before, a Llama 3.x template got the ReAct prompt instead of its own tool instructions; now the tools
    are rendered by the template (in the first user turn) and the reply's JSON is the call."""
    live, llm, path = steered_llama32[0], steered_llama32[1], llama32_path
    request = ChatCompletionRequest(messages=USER, tools=[WEATHER], chat_template_kwargs=DATE)
    ids = chat_prompt(llm, request)
    text = llm.tokenizer.decode(ids)
    assert ids[0] == 128000 and ids.count(128000) == 1  # the template's BOS, once
    assert text == _reference_text(path, USER, [WEATHER])
    assert (
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a "
        "JSON for a function call with its proper arguments that best answers the given prompt.\n\n"
    ) in text
    assert json.dumps(WEATHER, indent=4) + "\n\nWhat's the weather in Paris?<|eot_id|>" in text
    assert "Action Input" not in text and "Environment: ipython\n" in text
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    kwargs = dict(model="tiny", max_tokens=200, messages=USER, tools=[WEATHER], extra_body=DATE)
    replies = []
    for stream in (False, True):
        play(steered_llama32, WEATHER_JSON)
        r = chat_reply(client(live), stream, **kwargs)
        assert (r.pairs, r.finish) == ([("get_weather", WEATHER_ARGS)], "tool_calls")  # as the model wrote it
        assert r.content == (None if not stream else "")
        assert r.calls[0]["id"].startswith("call_") and len(r.calls[0]["id"]) == 29
        if not stream:
            assert r.usage.prompt_tokens == len(ids)
        replies.append(r)
    assert replies[0].calls[0]["id"] != replies[1].calls[0]["id"]


def test_several_calls_after_the_python_tag(steered_llama32):
    """``<|python_tag|>`` (a special token, not shown) then calls separated by ``;``, with ``parameters``
    or ``arguments``: each a tool call, in order, whole and streamed alike."""
    live = steered_llama32[0]
    reply = '<|python_tag|>{"name": "get_time", "arguments": {}}; ' + WEATHER_JSON
    kwargs = dict(model="tiny", max_tokens=200, messages=USER, tools=[WEATHER, TIME])
    for stream in (False, True):
        play(steered_llama32, reply)
        r = chat_reply(client(live), stream, **kwargs)
        assert (r.pairs, r.finish) == ([("get_time", "{}"), ("get_weather", WEATHER_ARGS)], "tool_calls")
        assert not r.content and len({x["id"] for x in r.calls}) == 2
    play(steered_llama32, reply)
    r = chat_reply(client(live), False, **kwargs, parallel_tool_calls=False)
    assert r.pairs == [("get_time", "{}")]


def test_a_reply_that_is_not_a_json_call_is_content(steered_llama32, caplog):
    """Text, a JSON answer with no call in it, and a call followed by more text are content, verbatim,
    finish_reason "stop"; the last (it began like a call) is logged with the request id."""
    live = steered_llama32[0]
    kwargs = dict(model="tiny", max_tokens=200, messages=USER, tools=[WEATHER])
    for reply, logged in (
        ("It is sunny in Paris.", False),
        ('{"city": "Paris", "unit": "c"}', False),
        ("Sure: " + WEATHER_JSON, False),
        (WEATHER_JSON + " Let me check.", True),
    ):
        for stream in (False, True):
            caplog.clear()
            play(steered_llama32, reply)
            r = chat_reply(client(live), stream, **kwargs)
            assert (r.content, r.finish) == (reply, "stop")
            # a stream cannot take back the call it started: its deltas came, but no call completed
            assert r.pairs == ([("get_weather", WEATHER_ARGS)] if logged and stream else [])
            lines = [rec.getMessage() for rec in caplog.records if "JSON tool call" in rec.getMessage()]
            # each names the request (its x-request-id) and the completion
            assert all(re.match(r"req_[0-9a-f]{32} ", line) for line in lines), lines
            lines = [line.split(" ", 1)[1] for line in lines]
            assert lines == (
                [
                    f"{r.id} choice 0: a JSON tool call is followed by other text; returned as text: "
                    f"{WEATHER_JSON!r}"
                ]
                if logged
                else []
            )
    play(steered_llama32, WEATHER_JSON)  # tool_choice "none": the tools are shown, nothing is parsed
    r = chat_reply(client(live), True, **kwargs, tool_choice="none")
    assert (r.content, r.calls, r.finish) == (WEATHER_JSON, [], "stop")


def test_follow_up_renders_the_call_and_result_as_the_template_writes_them(steered_llama32, llama32_path):
    """The assistant's call as Meta's JSON (its text content dropped, as the template does) and the tool
    result in an ``ipython`` turn (the template quotes string results through ``tojson``), equal to
    transformers' rendering; the model's answer is content."""
    live, llm, path = steered_llama32[0], steered_llama32[1], llama32_path
    messages = [*USER, *WEATHER_FOLLOW_UP]
    request = ChatCompletionRequest(messages=messages, tools=[WEATHER], chat_template_kwargs=DATE)
    text = llm.tokenizer.decode(chat_prompt(llm, request))
    assert text == _reference_text(path, messages, [WEATHER])
    assert text.endswith(
        "What's the weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        + WEATHER_JSON
        + '<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"sunny, 21C"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    for stream in (False, True):
        play(steered_llama32, "It is sunny, 21C.")
        r = chat_reply(client(live), stream, model="tiny", max_tokens=200, messages=messages, tools=[WEATHER])
        assert (r.content, r.calls, r.finish) == ("It is sunny, 21C.", [], "stop")


def test_two_calls_in_one_turn_are_the_templates_400(steered_llama32):
    """Meta's template renders one call per assistant turn and raises otherwise: a 400 naming it."""
    live = steered_llama32[0]
    call = WEATHER_FOLLOW_UP[0]["tool_calls"][0]
    turn = {"role": "assistant", "tool_calls": [call, {**call, "id": "call_2"}]}
    body = {"messages": [*USER, turn], "tools": [WEATHER]}
    r = post(live.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "messages: the chat template could not render them: "
        "This model only supports single tool-calls at once!"
    )


def test_forced_calls_are_one_llama_json_call(steered_llama32):
    """tool_choice "required" and a named function: the grammar forces one ``{"name": ..., "parameters":
    ...}`` (Meta's template renders one call a turn, so no ``;`` and a second even where parallel calls are
    allowed), and the (random) model calls the named or a listed tool with arguments that validate; whole
    and streamed agree."""
    live, llm = steered_llama32[0], steered_llama32[1]
    schemas = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        request = ChatCompletionRequest(messages=USER, tools=[WEATHER, TIME], tool_choice=choice)
        grammar = plan_tools(llm, request, chat_prompt(llm, request)).grammar
        heads = [line for line in grammar.splitlines() if line.startswith(("start", "call"))]
        weather = 'call0: "{\\"name\\": \\"get_weather\\", \\"parameters\\": " args0 "}"'
        time = 'call1: "{\\"name\\": \\"get_time\\", \\"parameters\\": " args1 "}"'
        assert heads == (
            ["start: call0", weather] if choice is named else ["start: call0 | call1", weather, time]
        )
        kwargs = dict(
            model="tiny",
            messages=USER,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            temperature=1.0,
            seed=1,
            max_tokens=200,  # a random model's string takes a token per byte
        )
        whole = chat_reply(client(live), False, **kwargs)
        ((name, arguments),) = whole.pairs
        finish = "stop" if choice is named else "tool_calls"  # OpenAI's for a named function
        assert (whole.finish, whole.content) == (finish, None)
        assert name == "get_weather" if choice is named else name in schemas
        jsonschema.validate(json.loads(arguments), schemas[name])
        streamed = chat_reply(client(live), True, **kwargs)
        assert (streamed.pairs, streamed.finish, streamed.content) == (whole.pairs, finish, "")


ANSWER = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]},
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tools_with_a_response_format_may_still_call(steered_llama32, stream):
    """tool_choice "auto" with a response format: the reply is one Llama 3 JSON call or the format's
    JSON, as on hermes templates (the format alone used to be enforced, so no tool could be called)."""
    live = steered_llama32[0]
    kwargs = dict(model="tiny", max_tokens=100, messages=USER, tools=[WEATHER, TIME], response_format=ANSWER)
    play(
        steered_llama32, '{"name":"get_weather","parameters":{"city":"Paris","unit":"c"}}'
    )  # compact, as the grammar spells it
    r = chat_reply(client(live), stream, **kwargs)
    assert (r.pairs, r.finish) == ([("get_weather", '{"city":"Paris","unit":"c"}')], "tool_calls"), r
    assert not r.content
    play(steered_llama32, '{"answer":"sunny"}')
    r = chat_reply(client(live), stream, **kwargs)
    assert (r.content, r.pairs, r.finish) == ('{"answer":"sunny"}', [], "stop")
    play(steered_llama32, "It is sunny.")  # neither: the grammar holds the reply to one or the other
    r = chat_reply(client(live), stream, **kwargs)
    assert not (r.content or "").startswith("It is"), r
