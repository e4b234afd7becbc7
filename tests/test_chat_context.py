"""Chat history that outgrows the context window loses its oldest whole turns; the system prompt stays."""

from __future__ import annotations

import pytest

from qwenkit.chat import ChatError, ChatSession, ContextOverflowError, build_prompt
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, dtype="float32", max_seq_len=160, progress=False)


PARAMS = SamplingParams(max_tokens=2, temperature=0)


def conversation(turns: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"question {i} " + "word " * 10},
                 {"role": "assistant", "content": f"answer {i} " + "word " * 10}]  # fmt: skip
    return [*msgs, {"role": "user", "content": "last question"}]


def test_oldest_turns_dropped_until_prompt_and_reply_fit(llm):
    params = SamplingParams(max_tokens=40)
    msgs = conversation(8)
    ids = build_prompt(llm, msgs, params)
    assert len(ids) + 40 <= 160
    text = llm.tokenizer.decode(ids)
    assert "Be brief." in text and "last question" in text
    assert "question 0 " not in text and "question 7 " in text  # oldest gone, newest kept
    kept = next(i for i in range(8) if f"question {i} " in text)
    assert all(f"answer {j} " in text for j in range(kept, 8))  # whole turns only
    # A short conversation is untouched.
    short = conversation(1)
    assert build_prompt(llm, short, params) == llm.tokenizer.apply_chat_template(short)


def test_a_message_that_cannot_fit_is_a_clear_error(llm):
    huge = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(ContextOverflowError, match="does not fit the 160-token window"):
        build_prompt(llm, huge, SamplingParams(max_tokens=40))


@pytest.mark.parametrize("messages", [None, "hi"])
def test_messages_that_are_not_a_list_are_named(llm, messages):
    """None failed with TypeError in list(); "hi" became two messages, 'h' and 'i'."""
    from qwenkit.chat import chat
    from qwenkit.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match=r"^chat messages must be a non-empty list of \{'role'"):
        chat(llm, messages, SamplingParams(max_tokens=2))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda llm: ChatSession(llm, PARAMS, system=5), "system must be a string or None, got 5"),
        (
            lambda llm: ChatSession(llm, PARAMS, history=None),
            "history must be a list of chat messages, got None",
        ),
        (
            lambda llm: ChatSession(llm, {"max_tokens": 2}),
            "params must be a SamplingParams, got {'max_tokens': 2}",
        ),
        (lambda llm: ChatSession(None, PARAMS), "llm must be an LLM (LLM.load(path)), got None"),
        (lambda llm: list(ChatSession(llm, PARAMS).ask(None)), "the user's text must be a string, got None"),
        (lambda llm: list(ChatSession(llm, PARAMS).ask(5)), "the user's text must be a string, got 5"),
    ],
)
def test_a_chat_session_refuses_arguments_of_the_wrong_type_by_name(llm, make, message):
    """Each failed inside the chat template ("'dict object' has no attribute 'content'", "can only
    concatenate str (not "int") to str") or in list concatenation, naming nothing the caller wrote."""
    from qwenkit.engine import SamplingParamsError

    with pytest.raises(SamplingParamsError if message.startswith("params") else ChatError) as raised:
        make(llm)
    assert str(raised.value) == message


def test_a_chat_session_with_none_for_params_uses_the_models_defaults(llm):
    session = ChatSession(llm, None)
    assert session.params == llm.default_params()
