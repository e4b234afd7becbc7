"""Batching, through the Python API: a request's text does not depend on what else runs beside it.

``tests/engine/test_differential_fuzz.py`` fuzzes the engine's token ids. This drives the layer users
call: ``LLM.submit`` from one reader thread per request through the driver thread, with text prompts
and token-id prompts (two shared prefixes for the prefix cache), stop strings (cut by the text layer,
which then aborts the engine's request), stop token ids, greedy and seeded sampling, penalties, a KV
pool small enough to preempt, and readers that abort mid-stream. Every request that was not aborted
must give the same token ids, text and finish reason as when it runs alone; an aborted one's ids are a
prefix of its lone run's; no reader hangs; every KV block is free at the end.

bfloat16 on the CPU kernels only, which compute each row on its own (see test_generate_api's
``test_many_prompts_equal_one_at_a_time`` for why float32 is not batch-invariant here).
"""

from __future__ import annotations

import random
import threading

import pytest

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM, Completion
from qwenkit.tokenizer import load_tokenizer

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "then",
    "it",
    "ran",
    "far",
    "away",
    "into",
    "night",
    "while",
    "stars",
    "shone",
]


def draw(rng: random.Random, max_seq_len: int) -> list[dict]:
    prefixes = [[rng.randrange(1000, 20000) for _ in range(rng.randint(1, 40))] for _ in range(2)]
    requests: list[dict] = []
    for _ in range(rng.randint(3, 8)):
        if requests and rng.random() < 0.15:  # a copy of an earlier one
            requests.append(dict(rng.choice(requests)))
            continue
        if rng.random() < 0.4:
            prompt: str | list[int] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        else:
            prefix = rng.choice(prefixes)
            tail = [rng.randrange(1000, 150000) for _ in range(rng.randint(0, 40))]
            prompt = (prefix[: rng.randint(1, len(prefix))] + tail)[: max_seq_len - 1]
        kw: dict = dict(max_tokens=rng.choice([1, 3, 8, 20, 60, 200]), ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.5:
            kw["temperature"] = 0
        else:
            kw.update(temperature=rng.choice([0.7, 1.0, 1.5]), seed=rng.randrange(1000))
            if rng.random() < 0.3:
                kw["top_k"] = rng.choice([5, 40])
        if rng.random() < 0.4:
            kw["stop"] = tuple(rng.choice(["e", "th", "a ", "ing", "\n"]) for _ in range(rng.randint(1, 2)))
            kw["include_stop_str_in_output"] = rng.random() < 0.3
        if rng.random() < 0.2:
            kw["stop_token_ids"] = tuple(rng.randrange(151000) for _ in range(200))
        if rng.random() < 0.2:
            kw.update(repetition_penalty=1.3, presence_penalty=0.5)
        abort = rng.choice([None] * 5 + [0, 1, 3, 7])  # deltas read before the reader aborts
        requests.append(dict(prompt=prompt, params=SamplingParams(**kw), abort=abort))
    return requests


def together(llm: LLM, requests: list[dict]) -> list[Completion]:
    streams = [llm.submit(r["prompt"], r["params"]) for r in requests]
    done: list[Completion | None] = [None] * len(requests)

    def read(i: int) -> None:
        for n, _ in enumerate(streams[i], 1):
            if requests[i]["abort"] is not None and n > requests[i]["abort"]:
                streams[i].abort()
        done[i] = streams[i].completion

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(requests))]
    for t in readers:
        t.start()
    for t in readers:
        t.join(60)
        assert not t.is_alive(), "a reader hangs"
    return done  # type: ignore[return-value]


def alone(llm: LLM, request: dict) -> Completion:
    stream = llm.submit(request["prompt"], request["params"])
    for _ in stream:
        pass
    return stream.completion


@pytest.mark.slow
def test_a_request_does_not_depend_on_its_neighbours_through_the_driver(tiny_chat_model):
    if not kernels.available():
        pytest.skip("bf16 steps are batch-invariant only on the CPU kernels")
    model = load_model(tiny_chat_model, dtype="bfloat16", fast_kernels=True)[0]
    tokenizer = load_tokenizer(tiny_chat_model)
    found = []
    for seed in range(24):
        rng = random.Random(seed)
        seq = rng.choice([64, 96, 128])
        settings = dict(
            max_batch_size=rng.randint(2, 6),
            max_seq_len=seq,
            prefill_chunk=rng.choice([4, 16, 33, 512]),
            prefix_caching=rng.random() < 0.8,
            kv_cache_tokens=int(seq * rng.uniform(1, 2)) if rng.random() < 0.6 else None,
        )
        requests = draw(rng, seq)
        with LLM(model, tokenizer, **settings) as llm:
            got = together(llm, requests)
            assert llm.driver.wait_idle()
            blocks = llm.engine.blocks
            assert blocks.num_free == blocks.num_blocks and not any(blocks.ref_counts), f"seed {seed}: leak"
            assert llm.engine.requests == {}
        for i, r in enumerate(requests):
            with LLM(model, tokenizer, **settings) as llm:
                lone = alone(llm, r)
            g, where = got[i], f"seed {seed}, request {i}"
            if g.finish_reason == "abort":
                if g.token_ids != lone.token_ids[: len(g.token_ids)]:
                    found.append(f"{where}: aborted after {g.token_ids}, alone {lone.token_ids}")
            elif (g.token_ids, g.text, g.finish_reason) != (lone.token_ids, lone.text, lone.finish_reason):
                found.append(
                    f"{where}: {g.token_ids} {g.text!r} ({g.finish_reason}), "
                    f"alone {lone.token_ids} {lone.text!r} ({lone.finish_reason})"
                )
    assert not found, "\n".join(found[:10])
