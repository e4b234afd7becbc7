"""The Python API: text in, text out, streaming, stop strings, many prompts at once."""

from __future__ import annotations

import pytest

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM, _partial_stop_suffix


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, dtype="float32", progress=False)


SAMPLED = SamplingParams(temperature=1.0, top_k=0, seed=11, max_tokens=24, ignore_eos=True)


def test_stream_concatenates_to_the_completion(llm):
    deltas = list(llm.stream("Once upon a time", SAMPLED))
    final = deltas[-1].completion
    assert final is not None and all(d.completion is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids and len(final.token_ids) == 24
    assert final.text == llm.tokenizer.decode(final.token_ids, skip_special=True)
    assert final.finish_reason == "length"


def test_stop_string_cuts_the_text_and_ends_the_request(llm):
    full = llm.generate("Once upon a time", SAMPLED)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and stop in full
    cut = llm.generate("Once upon a time", SamplingParams(**{**SAMPLED.__dict__, "stop": (stop,)}))[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(
        d.text
        for d in llm.stream("Once upon a time", SamplingParams(**{**SAMPLED.__dict__, "stop": (stop,)}))
    )
    assert streamed == cut.text  # text held back while it could still become the stop string is never shown
    assert not llm.engine.has_unfinished() and llm.engine.cache.free_slots == llm.engine.cache.num_slots


def test_many_prompts_equal_one_at_a_time(llm):
    prompts = ["Hello", "The capital of France", "def f(x):", "1 2 3 4"]
    together = llm.generate(prompts, SAMPLED)
    alone = [llm.generate(p, SAMPLED)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.prompt_ids for c in together] == [llm.tokenizer.encode(p) for p in prompts]


def test_partial_stop_suffix():
    assert _partial_stop_suffix("abc<|en", ("<|end|>",)) == 4
    assert _partial_stop_suffix("abc", ("xyz",)) == 0
