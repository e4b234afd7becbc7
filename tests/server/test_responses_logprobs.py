"""``/v1/responses`` log-probabilities through the official openai SDK: ``include:
["message.output_text.logprobs"]`` gives the entries of exactly the output text's tokens (the chat
route's, for the same greedy request), whole and streamed alike; reasoning tokens are not among them."""

from __future__ import annotations

import codecs
import sys
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import play, steered_server

INCLUDE = ["message.output_text.logprobs"]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
QUESTION = "Name three colours."


def sdk(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def entries(logprobs) -> list[dict]:
    """SDK logprob objects (or the chat route's) as plain dicts, for comparing across routes."""
    return [lp.model_dump() for lp in logprobs]


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    with steered_server(tiny_chat_model) as served:
        yield served


@pytest.fixture(scope="module")
def opened(tiny_chat_model, chat_llm):
    """A template whose generation prompt opens <think> (thinking-only Qwen3 releases): the reply starts
    inside the reasoning."""
    old = "{{- '<|im_start|>assistant\\n' }}"
    template = chat_llm.tokenizer.chat_template
    assert template.count(old) == 1
    opens = template.replace(old, "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    with steered_server(tiny_chat_model, chat_template=opens) as served:
        yield served


@pytest.mark.parametrize(("top", "temperature"), [(None, 0), (3, 0), (5, 1.0)])
def test_logprobs_are_the_chat_routes_for_the_output_text(server, top, temperature):
    c = sdk(server)
    extra = {"top_logprobs": top} if top is not None else {}
    body = {**NO_THINKING, "seed": 7}
    r = c.responses.create(
        model="tiny",
        input=QUESTION,
        max_output_tokens=12,
        temperature=temperature,
        include=INCLUDE,
        extra_body=body,
        **extra,
    )
    chat = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        temperature=temperature,
        logprobs=True,
        top_logprobs=top,
        extra_body=body,
    )
    (part,) = r.output[0].content
    assert part.text == chat.choices[0].message.content == "".join(lp.token for lp in part.logprobs)
    assert entries(part.logprobs) == entries(chat.choices[0].logprobs.content)
    assert len(part.logprobs) == 12 and r.top_logprobs == (top or 0)
    assert [len(lp.top_logprobs) for lp in part.logprobs] == [top or 0] * 12


def _streamed(live, **kwargs) -> tuple[list, object]:
    with sdk(live).responses.stream(**kwargs) as stream:
        events = list(stream)
    return events, events[-1].response


REPLY = "Blue, green and 紅 red. 🦜 Done"
THINKING = "<think>\nThe user wants colours; pick three.\n</think>\n\n" + REPLY


@pytest.mark.parametrize("reply", [REPLY, THINKING])
@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_cover_the_message_text_only(steered, reply, stream):
    """A scripted reply (its text with a character split over tokens, the emoji): the message's entries
    are its text's tokens, not the reasoning's, the whitespace after </think> or <|im_end|>; they are
    the chat route's entries for the same reply's last tokens. Streamed, each delta carries its own text's
    tokens, and the deltas' together are the done event's and the final response's."""
    live, llm, _ = steered
    kwargs = dict(model="tiny", input=QUESTION, max_output_tokens=100, include=INCLUDE, top_logprobs=2)
    play(steered, reply)
    if stream:
        events, r = _streamed(live, **kwargs)
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        assert len(deltas) > 1
        written, text = b"", ""
        for d in deltas:  # each delta's tokens are those whose text starts in it (one may end a character
            # in the next delta: " \xe7" writes the space, the next tokens 紅)
            written, text = written + bytes(b for lp in d.logprobs for b in lp.bytes), text + d.delta
            assert codecs.getincrementaldecoder("utf-8")().decode(written) == text
        (done,) = [e for e in events if e.type == "response.output_text.done"]
        streamed = [lp for d in deltas for lp in d.logprobs]
        assert entries(streamed) == entries(done.logprobs) == entries(r.output[-1].content[0].logprobs)
    else:
        r = sdk(live).responses.create(**kwargs)
    (part,) = r.output[-1].content
    assert [o.type for o in r.output] == (["reasoning", "message"] if reply == THINKING else ["message"])
    assert part.text == REPLY and bytes(b for lp in part.logprobs for b in lp.bytes) == REPLY.encode()
    assert [lp.bytes for lp in part.logprobs] == [
        list(llm.tokenizer.token_bytes(t)) for t in llm.tokenizer.encode(REPLY)
    ]
    assert all(len(lp.top_logprobs) == 2 for lp in part.logprobs)
    play(steered, reply)
    chat = sdk(live).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=100,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert entries(part.logprobs) == entries(content[len(content) - len(part.logprobs) :])


def test_top_logprobs_without_include_gives_none(server):
    """As OpenAI's API and vLLM: the entries come with ``include`` only (``top_logprobs`` sizes them)."""
    kwargs = dict(model="tiny", input=QUESTION, max_output_tokens=4, temperature=0, top_logprobs=3)
    r = sdk(server).responses.create(**kwargs)
    assert r.output[0].content[0].logprobs == [] and r.top_logprobs == 3
    events, final = _streamed(server, **kwargs)
    assert all(e.logprobs == [] for e in events if e.type == "response.output_text.delta")
    assert final.output[0].content[0].logprobs == []


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"top_logprobs": -1}, "top_logprobs", "greater than or equal to 0"),
        (
            {"tools": [{"type": "function", "name": "f"}]},
            "include",
            "include message.output_text.logprobs is not supported with tools",
        ),
        ({"stop": ["."]}, "stop", "stop strings are not supported with include message.output_text.logprobs"),
    ],
)
def test_what_cannot_be_aligned_is_a_400_naming_it(server, extra, param, words):
    body = {"input": QUESTION, "include": INCLUDE, **extra}
    r = httpx.post(server.url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and "\n" not in err["message"], err


def test_tools_turned_off_still_give_logprobs(server):
    """``tool_choice: "none"``: the reply is text only, so its tokens are given."""
    r = sdk(server).responses.create(
        model="tiny",
        input=QUESTION,
        tools=[{"type": "function", "name": "f"}],
        tool_choice="none",
        include=INCLUDE,
        max_output_tokens=5,
        temperature=0,
        extra_body=NO_THINKING,
    )
    (part,) = r.output[0].content
    assert len(part.logprobs) == 5 and "".join(lp.token for lp in part.logprobs) == part.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_that_starts_inside_the_reasoning(opened, stream):
    live, _llm, _ = opened
    play(opened, "The user wants colours.\n</think>\n\n" + REPLY)
    kwargs = dict(model="tiny", input=QUESTION, max_output_tokens=100, include=INCLUDE)
    r = _streamed(live, **kwargs)[1] if stream else sdk(live).responses.create(**kwargs)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "The user wants colours."
    (part,) = r.output[1].content
    assert part.text == REPLY and bytes(b for lp in part.logprobs for b in lp.bytes) == REPLY.encode()
    assert all(lp.top_logprobs == [] for lp in part.logprobs)


def test_a_token_running_from_dropped_whitespace_into_the_message_is_kept(steered):
    """`` Hello`` right after ``</think>``: its space is not message text (whitespace after markup is
    dropped) but its "Hello" is, so its entry is the message's first."""
    live, _, _ = steered
    play(steered, "<think>\nhmm\n</think> Hello there")
    r = sdk(live).responses.create(model="tiny", input=QUESTION, max_output_tokens=50, include=INCLUDE)
    (part,) = r.output[-1].content
    assert part.text == "Hello there"
    assert [lp.token for lp in part.logprobs] == [" Hello", " there"]
