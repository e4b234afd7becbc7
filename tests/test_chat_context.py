"""Chat history that outgrows the context window loses its oldest whole turns; the system prompt stays."""

from __future__ import annotations

import pytest

from qwenkit.chat import ContextOverflowError, build_prompt
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, dtype="float32", max_seq_len=160, progress=False)


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
