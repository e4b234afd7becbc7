"""The engine's request lifecycle, fuzzed: many requests arriving over time, aborted, preempted.

Where ``test_differential_fuzz.py`` mixes a few requests with every sampling feature, this one drives
one engine with many greedy requests (up to 20) through a small KV pool and a small token budget, so
prompts are taken in chunks, requests are preempted and recomputed, and prefix blocks are published,
shared, let go and evicted all the time. Prompts are 1 token, whole blocks, a block plus or minus one,
a shared prefix that ends on a block boundary (alone or with a tail), and up to the window's last
token; max_tokens runs past the window too. Requests join between steps, some are aborted while their
prompt is computed or while they decode, and the engine's API is poked with ids that are in use,
unknown or finished.

Checked after every step: each KV block's reference count is the number of block tables holding it,
the free list is exactly the unheld blocks, a block two requests hold is a published prefix block,
the prefix-cache map and the blocks' hashes agree, and a waiting request holds nothing. At the end:
every finished request's tokens and finish reason equal the same request run alone, an aborted one's
tokens are a prefix of those, every request had exactly one last output within a bounded number of
steps, and the whole pool is free again (cached prefixes kept only as evictable blocks).
"""

from __future__ import annotations

import random
import time

import pytest
from factories import hf_model, save_hf

from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams, SamplingParamsError

V = 512  # the factories' tiny vocabulary
SCENARIOS = 8
STEP_LIMIT = 3000  # a scenario that has not ended by then starves a request


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("lifecycle") / "qwen2")
    return load_model(path, dtype="float32")[0]


def draw_scenario(rng: random.Random) -> tuple[dict, list[dict]]:
    """Engine settings, and requests: prompt, params, the step it joins at, and the number of steps
    after joining at which it is aborted (None: never)."""
    block = rng.choice([4, 8, 16])
    window = rng.choice([32, 48, 64])
    settings = dict(
        max_batch_size=rng.randint(1, 8),
        prefill_chunk=rng.choice([1, 3, 5, 8, 16, 33]),
        block_size=block,
        prefix_caching=rng.random() < 0.85,
        max_seq_len=window,
        kv_cache_tokens=rng.choice([window, window + block, int(1.5 * window), 2 * window, 6 * window]),
        cuda_graphs=rng.random() < 0.3,  # decode-only steps through the static decode step
    )
    shared = [rng.randrange(V) for _ in range(block * rng.randint(1, 3))]  # ends on a block boundary
    stops = tuple(rng.randrange(V) for _ in range(30))
    plan: list[dict] = []
    for _ in range(rng.randint(4, 20)):
        kind = rng.randrange(9)
        if kind == 0:
            prompt = [rng.randrange(V)]
        elif kind == 1:
            prompt = [rng.randrange(V) for _ in range(block * rng.randint(1, 3) + rng.choice([-1, 0, 1]))]
        elif kind == 2:
            prompt = list(shared)  # the shared prefix is the whole prompt
        elif kind in (3, 4):
            prompt = shared + [rng.randrange(V) for _ in range(rng.randint(1, 12))]
        elif kind == 5:
            prompt = [*shared[: block * rng.randint(1, len(shared) // block)], rng.randrange(V)]
        elif kind == 6:
            prompt = [rng.randrange(V) for _ in range(window - rng.randint(1, 3))]  # the window's end
        elif kind == 7 and plan:
            prompt = list(rng.choice(plan)["prompt"])  # a copy of an earlier prompt
        else:
            prompt = [rng.randrange(V) for _ in range(rng.randint(1, window - 1))]
        prompt = prompt[: window - 1] or [1]
        params = SamplingParams(
            temperature=0,
            max_tokens=rng.choice([1, 2, 3, 7, 15, 500]),
            ignore_eos=rng.random() < 0.8,
            stop_token_ids=stops if rng.random() < 0.3 else (),
        )
        # aborted some steps after it joins (while waiting or taking its prompt, mostly), or after
        # some of its tokens came out (while decoding)
        abort = rng.choice(
            [None] * 6 + [("steps", rng.choice([0, 1, 2, 4, 8])), ("tokens", rng.randint(1, 6))]
        )
        plan.append(dict(prompt=prompt, params=params, at=rng.randint(0, 25), abort=abort))
    return settings, plan


def check_blocks(engine: Engine) -> None:
    """The block manager agrees with the requests' block tables."""
    blocks, sched = engine.blocks, engine.scheduler
    for request in sched.waiting:
        assert not request.block_table, f"waiting request {request.id} holds blocks {request.block_table}"
    holders = [0] * blocks.num_blocks
    for request in sched.running:
        table = request.block_table
        assert len(set(table)) == len(table), f"request {request.id} holds a block twice: {table}"
        assert len(table) >= blocks.blocks_needed(request.num_computed), f"{request.id} lost blocks"
        for b in table:
            holders[b] += 1
    assert blocks.ref_counts == holders, "a block's reference count is not the number of its holders"
    assert set(blocks.free_queue) == {b for b, n in enumerate(holders) if n == 0}
    for b, n in enumerate(holders):
        assert n <= 1 or blocks.block_hash[b] is not None, f"block {b} shared but not a prefix block"
    assert {h: b for h, b in blocks.cached.items()} == {
        h: b for b, h in enumerate(blocks.block_hash) if h is not None
    }


def run(engine: Engine, plan: list[dict], rng: random.Random | None = None) -> dict[int, dict]:
    """Drive ``engine`` through ``plan``; each request's ids, finish reason and when it ended, by index.
    With ``rng``, the API is also poked with ids in use, unknown and finished ones between steps."""
    got: dict[int, dict] = {}
    ended: set[int] = set()
    step = 0
    while len(got) < len(plan) or engine.has_unfinished():
        for i, r in enumerate(plan):
            if i not in got and r["at"] <= step:
                engine.add_request(r["prompt"], r["params"], request_id=i)
                got[i] = dict(ids=[], finish=None, joined=step, aborted_in=None)
            g = got.get(i)
            if g and g["finish"] is None and r["abort"] and due(r["abort"], step - g["joined"], g["ids"]):
                request = engine.requests[i]
                g["aborted_in"] = (
                    "waiting"
                    if request not in engine.scheduler.running
                    else "prompt"
                    if request.num_computed < len(request.prompt_ids)
                    else "decode"
                )
                engine.abort(i)
                assert i not in [r.id for r in engine.scheduler.running + list(engine.scheduler.waiting)]
        if rng is not None:
            poke(engine, rng, got, ended)
        for out in engine.step():
            g = got[out.request_id]
            assert g["finish"] is None, f"request {out.request_id} has an output after its last"
            g["ids"] += out.new_token_ids
            g["finish"] = out.finish_reason
            cached = out.num_cached_tokens
            assert cached % engine.blocks.block_size == 0 and cached < len(plan[out.request_id]["prompt"])
            assert cached == 0 or engine.scheduler.prefix_caching
            if out.finish_reason is not None:
                g["ended"] = step
                ended.add(out.request_id)
                assert out.request_id not in engine.requests
        check_blocks(engine)
        step += 1
        assert step < STEP_LIMIT, f"starved: {sorted(set(range(len(plan))) - ended)} never ended"
    blocks = engine.blocks
    assert blocks.num_free == blocks.num_blocks and not any(blocks.ref_counts), "KV blocks leaked"
    assert engine.requests == {} and not engine.scheduler.running and not engine.scheduler.waiting
    return got


def due(abort: tuple[str, int], steps: int, ids: list[int]) -> bool:
    kind, n = abort
    return steps == n if kind == "steps" else len(ids) >= n


def poke(engine: Engine, rng: random.Random, got: dict[int, dict], ended: set[int]) -> None:
    """Calls that must change nothing: adding an id in use, aborting an unknown or finished id."""
    live = sorted(engine.requests)
    before = (len(engine.scheduler.waiting), len(engine.scheduler.running), engine.blocks.num_free)
    if live and rng.random() < 0.2:
        with pytest.raises(SamplingParamsError, match="already in use"):
            engine.add_request([1, 2, 3], SamplingParams(max_tokens=1), request_id=rng.choice(live))
    if rng.random() < 0.2:
        engine.abort(f"unknown-{rng.randrange(10)}")
    if ended and rng.random() < 0.3:
        engine.abort(rng.choice(sorted(ended)))
    assert (len(engine.scheduler.waiting), len(engine.scheduler.running), engine.blocks.num_free) == before


def alone(model, settings: dict, r: dict, memo: dict) -> dict:
    key = (tuple(r["prompt"]), r["params"])
    if key not in memo:
        memo[key] = run(Engine(model, **settings), [dict(r, at=0, abort=None)])[0]
    return memo[key]


def differences(model, seed: int) -> tuple[list[str], dict[str, int]]:
    """What differs between each request of scenario ``seed`` and the same request alone, and counts
    of what the scenario exercised."""
    rng = random.Random(seed)
    settings, plan = draw_scenario(rng)
    engine = Engine(model, **settings)
    together = run(engine, plan, rng)
    seen = dict(preemptions=engine.preemptions, prefix_hits=engine.blocks.prefix_hits)
    for key in ("aborted in waiting", "aborted in prompt", "aborted in decode", "stop", "length"):
        seen[key] = 0
    found, memo = [], {}
    for i, r in enumerate(plan):
        got, lone, where = together[i], alone(model, settings, r, memo), f"seed {seed}, request {i}"
        if got["finish"] == "abort":
            seen[f"aborted in {got['aborted_in']}"] += 1
            if got["ids"] != lone["ids"][: len(got["ids"])]:
                found.append(f"{where}: aborted after {got['ids']}, alone {lone['ids']}")
            continue
        seen[got["finish"]] = seen.get(got["finish"], 0) + 1
        if (got["ids"], got["finish"]) != (lone["ids"], lone["finish"]):
            found.append(f"{where}: {got['ids']} ({got['finish']}), alone {lone['ids']} ({lone['finish']})")
    return found, seen


@pytest.mark.slow
def test_many_requests_arriving_aborted_and_preempted_run_as_alone(model):
    start = time.perf_counter()
    found: list[str] = []
    totals: dict[str, int] = {}
    for seed in range(SCENARIOS):
        diffs, seen = differences(model, seed)
        found += diffs
        for k, v in seen.items():
            totals[k] = totals.get(k, 0) + v
    print(f"{SCENARIOS} scenarios in {time.perf_counter() - start:.1f} s: {totals}")
    assert not found, "\n".join(found[:10])
    # the fuzz reached what it is for
    assert totals["preemptions"] and totals["prefix_hits"]
    assert totals["aborted in waiting"] and totals["aborted in prompt"] and totals["aborted in decode"]
    assert totals["stop"] and totals["length"]
