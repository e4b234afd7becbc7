"""Evaluation reads a Qwen3 reply's thinking by the one split the chat API and the server use
(``qwenkit.tokenizer.thinking``): the block at the start is reasoning, its first ``</think>`` ends it, and
a reply cut off inside it has no answer. Evaluation had a split of its own (on the last ``</think>``),
which scored the thinking's numbers as the answer when the prompt had opened ``<think>`` and the reply
was cut off inside it, and scored no answer where the model wrote ``</think>`` a second time.

A steered model (``tools/scripted.py``) writes what a trained Qwen3 would; the engine, detokenizer,
template, backend, plan and extractors all run for real."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import ScriptedModel, steer_next_request

from qwenkit.evaluate.backends import LocalBackend
from qwenkit.evaluate.extract import qwen_mmlu_chat
from qwenkit.evaluate.multiple_choice import MCItem, rejudge, score_generate
from qwenkit.evaluate.plans.generation import gsm8k_plan
from qwenkit.evaluate.plans.settings import Settings
from qwenkit.generate import LLM


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    loaded = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=2, progress=False)
    model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens["<|im_end|>"])
    llm = LLM(model, loaded.tokenizer, max_batch_size=2, max_seq_len=2048)
    return llm, steer_next_request(llm, model)


@pytest.fixture
def opened(steered, monkeypatch):
    """Qwen3-2507 Thinking's template: the generation prompt ends ``<think>\\n``."""
    llm = steered[0]
    template = llm.tokenizer.chat_template
    with_think = template.replace(
        "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}"
    )
    assert with_think != template
    monkeypatch.setattr(llm.tokenizer, "chat_template", with_think)


def _gsm8k_row(steered, tmp_path, reply: str, max_new_tokens: int = 64) -> dict:
    llm, pending = steered
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "What is 6 times 7?", "answer": "6*7=42\n#### 42"}) + "\n")
    plan = gsm8k_plan(
        Settings(task="gsm8k", method="generate", data=str(data), max_new_tokens=max_new_tokens)
    )
    pending.append(llm.tokenizer.encode(reply, allow_special=True))
    [row] = plan.run_chunk(LocalBackend(llm), plan.items)
    return row


def _cut_at(llm, reply: str, end: str) -> int:
    """The token count at which ``reply`` has been written up to ``end`` (where max_tokens cuts it)."""
    ids = llm.tokenizer.encode(reply, allow_special=True)
    return next(k for k in range(len(ids)) if llm.tokenizer.decode(ids[:k]).endswith(end))


def test_a_reply_cut_off_inside_opened_thinking_has_no_answer(steered, opened, tmp_path):
    reply = "6 times 7 is 42, but let me check.\n</think>\n\nThe answer is 42."
    cut = _cut_at(steered[0], reply, "is 42, but")
    row = _gsm8k_row(steered, tmp_path, reply, max_new_tokens=cut)
    assert row["output"] == "<think>\n6 times 7 is 42, but"  # the turn as written: the prompt's <think> too
    assert row["thinking"] == "6 times 7 is 42, but"
    assert row["scored_text"] == ""
    assert row["extracted_by"] == dict.fromkeys(row["extracted_by"])  # no extractor reads a number
    assert row["correct"] is False


def test_opened_thinking_that_closes_gives_the_answer_after_it(steered, opened, tmp_path):
    row = _gsm8k_row(steered, tmp_path, "6 times 7 is 41? No: 42.\n</think>\n\nThe answer is 42.")
    assert row["output"] == "<think>\n6 times 7 is 41? No: 42.\n</think>\n\nThe answer is 42."
    assert (row["thinking"], row["scored_text"]) == ("6 times 7 is 41? No: 42.", "The answer is 42.")
    assert row["extracted"] == "42." and row["correct"] is True  # Qwen's regex keeps the ".", a decimal


def test_the_first_close_ends_the_thinking(steered, tmp_path):
    """A model that writes ``</think>`` again after its answer: the answer is what follows the first,
    as the server's ``content`` (and vLLM's Qwen3 reasoning parser) has it."""
    row = _gsm8k_row(steered, tmp_path, "<think>\n6 times 7.\n</think>\n\n42</think>")
    assert (row["thinking"], row["scored_text"]) == ("6 times 7.", "42</think>")
    assert row["extracted"] == "42" and row["correct"] is True


def test_a_reply_without_a_block_is_all_answer(steered, tmp_path):
    row = _gsm8k_row(steered, tmp_path, "It is 42. Not <think>41</think>.")
    assert "thinking" not in row
    assert row["scored_text"] == "It is 42. Not <think>41</think>."
    assert row["extracted_by"]["qwen-gsm8k-chat"] == "41"  # the last number, as Qwen's script reads it


def test_a_rescore_of_a_cut_choice_reply_still_has_no_answer(steered, opened):
    """The saved reply holds the prompt's ``<think>``, so ``--rescore`` splits it as the run did."""
    llm, pending = steered
    item = MCItem("q1", "logic", "Which is a prime?", ("4", "6", "7", "9"), "C")
    reply = "C is 7, a prime.\n</think>\n\nC"
    cut = _cut_at(llm, reply, "a prime")
    pending.append(llm.tokenizer.encode(reply, allow_special=True))
    [row] = score_generate(LocalBackend(llm), [item], ["Which is a prime?"], qwen_mmlu_chat, cut)
    assert (row["output"], row["thinking"]) == ("<think>\nC is 7, a prime", "C is 7, a prime")
    assert (row["extracted"], row["correct"]) == ("", False)
    saved = {**row, "choices": list(item.choices), "question": item.question}
    assert rejudge(saved, qwen_mmlu_chat) == {"extracted": "", "correct": False}
