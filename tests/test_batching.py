"""Batching: a request's tokens do not depend on what else is in the batch (greedy and seeded)."""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, save_hf

from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("m") / "qwen2")
    return load_model(path, dtype="float32")[0]


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    outs: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
    return [outs[i] for i in ids]


PROMPTS = [list(range(5, 12)), list(range(100, 140)), [7], list(range(300, 321))]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True),
        SamplingParams(
            temperature=1.0,
            min_p=0.05,
            repetition_penalty=1.2,
            presence_penalty=0.5,
            frequency_penalty=0.3,
            seed=7,
            max_tokens=24,
            ignore_eos=True,
        ),
    ],
)
def test_batched_equals_alone(model, params):
    alone = [run(Engine(model, max_batch_size=1), [p], [params])[0] for p in PROMPTS]
    # Small prefill chunks force prompts to be split and to share steps with decoding rows.
    together = run(Engine(model, max_batch_size=4, prefill_chunk=8), PROMPTS, [params] * len(PROMPTS))
    assert together == alone
    # Fewer slots than requests: later requests join as earlier ones leave.
    queued = run(Engine(model, max_batch_size=2, prefill_chunk=16), PROMPTS, [params] * len(PROMPTS))
    assert queued == alone


def test_seed_reproducible_and_distinct(model):
    p = SamplingParams(temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    a = run(Engine(model), [PROMPTS[1]], [p])[0]
    b = run(Engine(model), [PROMPTS[1]], [p])[0]
    c = run(
        Engine(model), [PROMPTS[1]], [SamplingParams(temperature=1.0, seed=6, max_tokens=16, ignore_eos=True)]
    )[0]
    assert a == b and a != c


def test_stop_tokens_and_abort_free_slots(model):
    engine = Engine(model, max_batch_size=1)
    first = run(engine, [PROMPTS[0]], [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)])[0]
    stop_at = first[3]
    rid = engine.add_request(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(stop_at,))
    )
    out = []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
    assert out == first[: first.index(stop_at) + 1]
    assert engine.pop_finished(rid).finish_reason == "stop"
    rid = engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=100))
    engine.step()
    engine.abort(rid)
    assert engine.pop_finished(rid).finish_reason == "abort" and engine.cache.free_slots == 1
    assert not engine.has_unfinished()


def test_logprobs_match_model(model):
    engine = Engine(model)
    rid = engine.add_request(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=1, logprobs=3, ignore_eos=True)
    )
    engine.step()
    lp = engine.pop_finished(rid).logprobs[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([PROMPTS[0]]))[0, -1], -1)
    assert lp.token_id == int(ref.argmax())
    assert abs(lp.logprob - ref.max().item()) < 1e-5
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()
