"""``continue_final_message`` in the Python chat API: ``chat(llm, messages, continue_final_message=True)``
continues the final assistant message (transformers' prompt, no generation prompt), returns only the new
text, and a ``<think>`` the final message opened makes the reply start inside the reasoning."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "tools"))

from scripted import ScriptedModel, steer_next_request

from qwenkit.chat import build_prompt, chat_message
from qwenkit.engine import SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.generate import LLM

PARAMS = SamplingParams(temperature=0, max_tokens=30)


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    loaded = LLM.load(tiny_chat_model, dtype="float32", progress=False)
    model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens["<|im_end|>"])
    llm = LLM(model, loaded.tokenizer, max_batch_size=2, max_seq_len=1024)
    return llm, steer_next_request(llm, model)


def play(steered, reply: str) -> None:
    llm, pending = steered
    pending.append(llm.tokenizer.encode(reply, allow_special=True))


def test_the_prompt_is_the_templates_continued_prompt(steered):
    llm = steered[0]
    messages = [{"role": "user", "content": "Poem?"}, {"role": "assistant", "content": "Roses are red,"}]
    ids = build_prompt(llm, messages, PARAMS, continue_final_message=True)
    expected = llm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert ids == expected
    assert llm.tokenizer.decode(ids).endswith("<think>\n\n</think>\n\nRoses are red,")
    play(steered, "\nviolets are blue.")
    assert chat_message(llm, messages, PARAMS, continue_final_message=True) == {
        "role": "assistant",
        "content": "violets are blue.",  # the history's form: stripped, as every reply
    }


def test_a_prefilled_think_is_continued_as_reasoning(steered):
    llm = steered[0]
    messages = [{"role": "user", "content": "Poem?"}, {"role": "assistant", "content": "<think>\nLet me"}]
    play(steered, " rhyme.\n</think>\n\nRoses.")
    reply = chat_message(llm, messages, PARAMS, continue_final_message=True)
    assert reply == {"role": "assistant", "content": "Roses.", "reasoning_content": " rhyme."}


def test_a_generation_prompt_beside_it_is_refused(steered):
    messages = [{"role": "user", "content": "Poem?"}, {"role": "assistant", "content": "Roses"}]
    with pytest.raises(
        QwenkitError, match="^continue_final_message and add_generation_prompt cannot both be set"
    ):
        build_prompt(steered[0], messages, PARAMS, continue_final_message=True, add_generation_prompt=True)
