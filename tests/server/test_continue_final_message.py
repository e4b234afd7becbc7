"""vLLM's ``continue_final_message`` on the chat route, /tokenize and /v1/responses: with
``add_generation_prompt: false`` the prompt ends inside the final message (transformers' ids for the real
Qwen3 template), the reply is only the new text, a ``<think>`` the final message opened makes the reply start
inside the reasoning, and a continued reply's tool calls are parsed. Bad combinations are one-line 400s
naming the field."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import play, steered_server
from test_chat_prompt_parity import hf_strict, reference  # noqa: F401 - the fixture
from tool_requests import CALL, WEATHER, chat_reply, client

POEM = [
    {"role": "user", "content": "Write a poem"},
    {"role": "assistant", "content": "Roses are red,"},
]
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    with steered_server(tiny_chat_model) as served:
        yield served


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(live.url + path, json=body, timeout=120)


def test_tokenize_and_chat_prompt_are_transformers_ids(steered, hf_strict):  # noqa: F811
    live = steered[0]
    ids = reference(hf_strict, POEM, add_generation_prompt=False, continue_final_message=True)
    assert hf_strict.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nRoses are red,")
    r = post(live, "/tokenize", {"messages": POEM, **CONTINUE})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == ids
    play(steered, " violets are blue.")
    reply = client(live).chat.completions.create(
        model="tiny", messages=POEM, max_tokens=20, extra_body=CONTINUE
    )
    assert reply.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True])
def test_the_reply_is_only_the_new_text(steered, stream):
    """As vLLM returns it (without ``echo``): the final message's text is not repeated, and the new text
    keeps its leading whitespace, so prefill + reply is the whole message."""
    live = steered[0]
    play(steered, "\nViolets are blue.")
    r = chat_reply(client(live), stream, model="tiny", messages=POEM, max_tokens=20, extra_body=CONTINUE)
    assert (r.content, r.reasoning, r.calls, r.finish) == ("\nViolets are blue.", None, [], "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_a_think_the_final_message_opened_is_continued_as_reasoning(steered, hf_strict, stream):  # noqa: F811
    """A prefilled ``<think>`` with no ``</think>``: the reply starts inside the reasoning (the parser
    splits at the reply's ``</think>``), its leading space kept as the continued thought's."""
    live = steered[0]
    messages = [POEM[0], {"role": "assistant", "content": "<think>\nLet me"}]
    ids = reference(hf_strict, messages, add_generation_prompt=False, continue_final_message=True)
    assert post(live, "/tokenize", {"messages": messages, **CONTINUE}).json()["tokens"] == ids
    play(steered, " rhyme.\n</think>\n\nRoses are red.")
    r = chat_reply(client(live), stream, model="tiny", messages=messages, max_tokens=30, extra_body=CONTINUE)
    assert (r.reasoning, r.content, r.finish) == (" rhyme.", "Roses are red.", "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_continuing_the_reasoning_field(steered, stream):
    """transformers' ``continue_final_message`` naming a field (in chat_template_kwargs): Qwen3's template
    writes ``reasoning_content`` inside ``<think>``, so the reply continues the reasoning."""
    live = steered[0]
    messages = [POEM[0], {"role": "assistant", "content": "", "reasoning_content": "Let me"}]
    body = {
        "add_generation_prompt": False,
        "chat_template_kwargs": {"continue_final_message": "reasoning_content"},
    }
    tokens = post(live, "/tokenize", {"messages": messages, **body}).json()["tokens"]
    assert steered[1].tokenizer.decode(tokens).endswith("<|im_start|>assistant\n<think>\nLet me")
    play(steered, " think.\n</think>\n\nDone.")
    r = chat_reply(client(live), stream, model="tiny", messages=messages, max_tokens=30, extra_body=body)
    assert (r.reasoning, r.content) == (" think.", "Done.")


@pytest.mark.parametrize("stream", [False, True])
def test_a_continued_reply_calls_a_tool(steered, stream):
    live = steered[0]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking."},
    ]
    play(steered, "\n" + CALL)
    r = chat_reply(
        client(live),
        stream,
        model="tiny",
        messages=messages,
        max_tokens=60,
        tools=[WEATHER],
        extra_body=CONTINUE,
    )
    assert r.pairs == [("get_weather", '{"city": "Paris", "unit": "c"}')] and r.finish == "tool_calls"
    assert not r.content


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"continue_final_message": True, "add_generation_prompt": True},
            "continue_final_message and add_generation_prompt cannot both be set",
        ),
        (
            {"continue_final_message": True},  # add_generation_prompt's default is true, as vLLM's
            "continue_final_message and add_generation_prompt cannot both be set",
        ),
        ({"continue_final_message": "yes", "add_generation_prompt": False}, "continue_final_message: "),
    ],
)
def test_bad_combinations_are_one_line_400s_naming_the_field(server, path, fields, message):
    body = {"messages": POEM, "max_tokens": 5, **fields}
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(message) and "\n" not in error["message"]
    assert error["param"] == "continue_final_message"


@pytest.mark.parametrize(
    "fields", [{"continue_final_message": True}, {"chat_template_kwargs": {"continue_final_message": True}}]
)
def test_responses_refuse_it_by_name(server, fields):
    """/v1/responses has no add_generation_prompt: the field is refused there, not rendered into a 400 about
    another field."""
    r = post(server, "/v1/responses", {"input": POEM, "max_output_tokens": 5, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "continue_final_message"
    assert error["message"] == (
        "continue_final_message is not supported on /v1/responses; use /v1/chat/completions with "
        "add_generation_prompt false"
    )
