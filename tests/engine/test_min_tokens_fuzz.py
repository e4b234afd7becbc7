"""min_tokens and eos under preemption, fuzzed: bounded, in the default run.

``test_differential_fuzz.py`` (slow) draws no ``min_tokens`` and runs its engine with no eos ids. Here
the engine ends on eos ids (every 11th id) and the pool holds one sequence, so requests are preempted
and recomputed while they are still short of their ``min_tokens``: the ban on ending tokens must hold
through the recompute. Seeded mixes of greedy and seeded requests (with penalties, stop_token_ids,
ignore_eos, shared prefixes, copies) join at staggered steps, some aborted; each one that finished
gives exactly the ids and finish reason it gives alone, none ends before its min_tokens, and the KV
pool is whole at the end.
"""

from __future__ import annotations

import random

import pytest
from factories import hf_model, save_hf

from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams

V = 512  # the factories' tiny vocabulary
EOS = tuple(range(0, V, 11))  # about one token in 11 ends a request that does not ignore eos
SEEDS = (8, 9, 11)  # each preempts and has a request stop on an ending token; each runs in seconds


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(
        save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("min_tokens") / "q"), dtype="float32"
    )[0]


def draw(rng: random.Random) -> tuple[dict, list[dict]]:
    window = rng.choice([32, 48])
    settings = dict(
        max_batch_size=rng.randint(2, 4),
        prefill_chunk=rng.choice([4, 8, 33]),
        block_size=rng.choice([4, 8]),
        max_seq_len=window,
        kv_cache_tokens=window,  # one sequence's worth: every other running request is preempted
        eos_token_ids=EOS,
    )
    prefix = [rng.randrange(V) for _ in range(12)]
    plan: list[dict] = []
    for _ in range(rng.randint(3, 6)):
        if plan and rng.random() < 0.2:
            plan.append(dict(rng.choice(plan)))  # a copy (n > 1)
            continue
        prompt = prefix[: rng.randint(1, 12)] if rng.random() < 0.5 else []
        prompt += [rng.randrange(V) for _ in range(rng.randint(1, 14))]
        max_tokens = rng.choice([3, 12, 24])
        kw: dict = dict(max_tokens=max_tokens, min_tokens=rng.randint(0, max_tokens))
        kw["ignore_eos"] = rng.random() < 0.3
        if rng.random() < 0.5:
            kw.update(temperature=rng.choice([0.8, 1.3]), seed=rng.randrange(1000))
        else:
            kw["temperature"] = 0
        if rng.random() < 0.4:
            kw["stop_token_ids"] = tuple(rng.randrange(V) for _ in range(40))
        if rng.random() < 0.3:
            kw.update(repetition_penalty=1.2, frequency_penalty=0.4)
        plan.append(
            dict(
                prompt=prompt,
                params=SamplingParams(**kw),
                at=rng.choice([0, 0, 1, 3]),
                abort=rng.choice([None] * 5 + [1, 4]),
            )
        )
    return settings, plan


def run(engine: Engine, plan: list[dict]) -> dict[int, dict]:
    got: dict[int, dict] = {}
    step = 0
    while len(got) < len(plan) or engine.has_unfinished():
        for i, r in enumerate(plan):
            if i not in got and r["at"] <= step:
                engine.add_request(r["prompt"], r["params"], request_id=i)
                got[i] = dict(ids=[], finish=None, steps=0)
            if i in got and got[i]["finish"] is None and got[i]["steps"] == r["abort"]:
                engine.abort(i)
        for out in engine.step():
            got[out.request_id]["ids"] += out.new_token_ids
            got[out.request_id]["finish"] = out.finish_reason
        for g in got.values():
            g["steps"] += g["finish"] is None
        step += 1
        assert step < 1000, "the engine stopped making progress"
    blocks = engine.blocks
    assert blocks.num_free == blocks.num_blocks and not any(blocks.ref_counts), "KV blocks leaked"
    assert engine.requests == {} and not engine.scheduler.running and not engine.scheduler.waiting
    return got


@pytest.mark.parametrize("seed", SEEDS)
def test_min_tokens_and_eos_hold_through_preemption_as_alone(model, seed):
    settings, plan = draw(random.Random(seed))
    engine = Engine(model, **settings)
    together = run(engine, plan)
    assert engine.preemptions > 0  # the pool was small enough
    stopped = 0  # requests that ended on an ending token past their min_tokens
    for i, r in enumerate(plan):
        got, params = together[i], r["params"]
        alone = run(Engine(model, **settings), [dict(r, at=0, abort=None)])[0]
        if got["finish"] == "abort":
            assert got["ids"] == alone["ids"][: len(got["ids"])], (seed, i)
            continue
        assert (got["ids"], got["finish"]) == (alone["ids"], alone["finish"]), (seed, i)
        ending = set(params.stop_token_ids) | (set() if params.ignore_eos else set(EOS))
        assert not ending & set(got["ids"][: params.min_tokens]), (seed, i)  # nothing ended it early
        if got["finish"] == "stop":
            assert got["ids"][-1] in ending and len(got["ids"]) > params.min_tokens
            stopped += 1
        else:  # max_tokens, or the window's end
            assert len(got["ids"]) == min(params.max_tokens, settings["max_seq_len"] - len(r["prompt"]))
    assert stopped
