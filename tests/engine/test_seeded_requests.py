"""A seeded request's tokens are its own: the same on repeat, alone or batched beside unseeded and other
seeded requests of other lengths and settings, over many temperature-1 steps of a random model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM

STEPS = 48
# one row of each way the sampler draws: the whole vocabulary, top-k (with top-p), top-p alone
SEEDED = [
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1234, max_tokens=STEPS, ignore_eos=True),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=77, max_tokens=STEPS, ignore_eos=True),
    SamplingParams(
        temperature=1.0, top_k=0, top_p=0.9, min_p=0.01, seed=5, max_tokens=STEPS, ignore_eos=True
    ),
]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    """bfloat16, where the CPU kernels compute each row of a step on its own (see test_generate_api's
    test_many_prompts_equal_one_at_a_time for why not float32)."""
    return LLM.load(tiny_chat_model, dtype="bfloat16", max_batch_size=8, progress=False)


def run(llm: LLM, jobs: list[tuple[str, SamplingParams]]) -> list[list[int]]:
    """Every (prompt, params) submitted in one batch; each one's output token ids."""
    with llm.driver.together():
        streams = [llm.submit(prompt, params) for prompt, params in jobs]
    for stream in streams:
        for _ in stream:
            pass
    return [stream.completion.token_ids for stream in streams]


def test_a_seeded_request_gives_the_same_tokens_alone_on_repeat_and_in_any_batch(llm):
    alone = [run(llm, [(PROMPT, p)])[0] for p in SEEDED]
    assert all(len(ids) == STEPS for ids in alone)
    assert [run(llm, [(PROMPT, p)])[0] for p in SEEDED] == alone  # on repeat
    assert len({tuple(ids) for ids in alone}) == 3
    unseeded = SamplingParams(temperature=1.0, top_k=0, max_tokens=9, ignore_eos=True)
    others = [
        ("Hi", unseeded),  # ends early: the batch shrinks mid-run
        ("A much longer prompt about the weather in the mountains, " * 3, replace(unseeded, max_tokens=70)),
        ("def f(x):", SamplingParams(temperature=0.7, top_k=20, top_p=0.8, max_tokens=30, ignore_eos=True)),
        ("1 2 3", replace(SEEDED[0], seed=1235, max_tokens=20)),  # another seed, next to ours
        (PROMPT, replace(SEEDED[1], temperature=0.0)),  # greedy, same prompt
    ]
    batched = run(llm, [(PROMPT, p) for p in SEEDED] + others)
    assert batched[:3] == alone
    reordered = run(llm, others[::-1] + [(PROMPT, p) for p in SEEDED[::-1]])
    assert reordered[-3:][::-1] == alone
    # unseeded requests are not reproducible: two runs of one differ
    twice = run(llm, [(PROMPT, replace(unseeded, max_tokens=STEPS))] * 2)
    assert twice[0] != twice[1]
