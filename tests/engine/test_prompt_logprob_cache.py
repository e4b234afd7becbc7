"""Scoring requests (prompt log-probabilities, as evaluation sends them) reuse cached prefix blocks that
kept their tokens' log-probabilities: the values are the model's, the same bits as computing the prompt
whole on the kernels' bfloat16 path, and the shared prefix is computed once."""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, save_hf

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams

SHARED = list(range(200, 245))  # 45 tokens: two full blocks and part of a third
TAILS = [[7, 8, 9], [10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27], [3, 4]]


def score(engine: Engine, prompts: list[list[int]], top: int = 0) -> list[dict]:
    """Each prompt's log-probabilities (and alternatives) and cached-token count, all added at once."""
    params = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=top)
    ids = [engine.add_request(p, params) for p in prompts]
    got: dict = {}
    while engine.has_unfinished():
        for out in engine.step():
            entry = got.setdefault(out.request_id, {"lps": None, "cached": 0})
            entry["lps"] = out.prompt_logprobs or entry["lps"]
            entry["cached"] = max(entry["cached"], out.num_cached_tokens)
    return [
        {
            "values": [(lp.token_id, lp.logprob, lp.top) for lp in got[i]["lps"][1:]],
            "first": got[i]["lps"][0],
            "cached": got[i]["cached"],
        }
        for i in ids
    ]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("m") / "qwen2")


def test_reused_blocks_give_the_models_log_probabilities(path):
    model = load_model(path, dtype="float32")[0]
    engine = Engine(model, max_batch_size=2, prefill_chunk=64)
    first = score(engine, [SHARED + TAILS[0]], top=2)[0]
    assert first["cached"] == 0
    later = score(engine, [SHARED + t for t in TAILS[1:]], top=1)
    assert [r["cached"] for r in later] == [31, 31, 31]  # two blocks, the last position computed again
    wider = score(engine, [SHARED + TAILS[1]], top=3)[0]  # more alternatives than the blocks kept
    assert wider["cached"] == 0
    checks = [(first, TAILS[0], 2), *((r, t, 1) for r, t in zip(later, TAILS[1:], strict=True))]
    for result, tail, top in [*checks, (wider, TAILS[1], 3)]:
        prompt = SHARED + tail
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), -1)
        assert result["first"] is None and len(result["values"]) == len(prompt) - 1
        for p, (token, logprob, alternatives) in enumerate(result["values"], start=1):
            assert token == prompt[p]
            assert abs(logprob - ref[p - 1, token].item()) < 1e-4, p
            assert [t for t, _ in alternatives] == ref[p - 1].topk(top).indices.tolist(), p


@pytest.mark.skipif(not kernels.available(), reason="needs the CPU kernels")
def test_bf16_scores_from_cached_blocks_are_the_bits_of_computing_whole(path):
    """Concurrent scoring requests with one context (as evaluation sends a question's candidates) wait
    for the first to compute it, then take its blocks; the values equal an engine without a cache."""
    model = load_model(path, dtype="bfloat16", fast_kernels=True)[0]
    prompts = [SHARED + t for t in TAILS]
    whole = score(Engine(model, max_batch_size=4, prefix_caching=False), prompts)
    assert [r["cached"] for r in whole] == [0, 0, 0, 0]

    engine = Engine(model, max_batch_size=4, prefill_chunk=40)
    together = score(engine, prompts)
    assert [r["values"] for r in together] == [r["values"] for r in whole]
    assert sorted(r["cached"] for r in together) == [0, 31, 31, 31]
    again = score(engine, prompts[::-1])  # every block is cached now, the whole context reused
    assert [r["values"] for r in again] == [r["values"] for r in whole[::-1]]
    assert [r["cached"] for r in again] == [31, 47, 31, 31]  # 62 tokens: a third block of its own


def test_a_copy_made_for_a_step_of_one_token_rows_runs_on_the_static_decode_path(path):
    """A tight token budget gives an admitted scoring request one token a step beside a decoding one,
    so its first step, the one that needs the copy, runs through the static decode step."""
    model = load_model(path, dtype="float32")[0]
    engine = Engine(model, max_batch_size=2, prefill_chunk=2, cuda_graphs=True)
    score(engine, [SHARED + TAILS[0]])
    static_steps = []
    run = engine._forward_static
    engine._forward_static = lambda rows: static_steps.append(len(rows)) or run(rows)
    engine.add_request([5, 6], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    engine.step()  # the generating request is decoding when the scoring one arrives
    (result,) = score(engine, [SHARED + TAILS[1]])
    assert result["cached"] == 31 and static_steps
    prompt = SHARED + TAILS[1]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), -1)
    got = [logprob for _, logprob, _ in result["values"]]
    want = [ref[p - 1, prompt[p]].item() for p in range(1, len(prompt))]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
