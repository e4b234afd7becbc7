"""Preemption takes the newest running request, even one this step already gave a row: an older request
still taking its prompt is never the one to give way to newer requests that are decoding.

The scheduler gives decoding rows their token first. It used to pick its victim among the requests this
step had not yet given a row, so when an older request's next prompt chunk found the pool dry, the newer
decoding requests were spared and the older request preempted itself. Without the prefix cache it then
started its prompt over, and under a steady stream of short requests it never finished.
"""

from __future__ import annotations

from qwenkit.engine.blocks import BlockManager
from qwenkit.engine.request import Request
from qwenkit.engine.sampling import SamplingParams
from qwenkit.engine.scheduler import Scheduler


def req(rid, n, max_tokens=100, start=0):
    return Request(rid, list(range(start, start + n)), SamplingParams(temperature=0, max_tokens=max_tokens))


def test_an_older_prompt_preempts_a_newer_decoding_request():
    s = Scheduler(BlockManager(4, 16), max_batch=4, token_budget=16, prefix_caching=False)
    old, new = req("old", 60), req("new", 4, start=100)
    s.add(old)
    s.add(new)
    schedules = []
    for _ in range(4):  # old takes its prompt in chunks; new decodes from the third step
        out = s.schedule()
        schedules.append(([(r.id, n) for r, n in out.rows], [r.id for r in out.preempted]))
        for request, n in out.rows:
            request.num_computed += n
            if request.num_computed == request.num_tokens:
                request.output_ids.append(1)
    assert schedules == [
        ([("old", 16)], []),
        ([("old", 8), ("new", 4)], []),
        ([("new", 1), ("old", 15)], []),  # old's third block is the pool's last
        ([("old", 15)], ["new"]),  # old's fourth block: new gives way, though it was scheduled first
    ]
    assert new.block_table == [] and new.num_computed == 0 and s.waiting[0] is new
    assert old.num_computed == 54 and len(old.block_table) == 4


def simulate(s: Scheduler, arrive_every: int, steps: int) -> int | None:
    """Step a scheduler as the engine would (every scheduled token computed, one token sampled when a
    request has computed all it knows) with a short request arriving every ``arrive_every`` steps; the
    step at which request "long" (added first) finished, or None."""
    for step in range(steps):
        if step % arrive_every == 0:
            s.add(req(f"short-{step}", 8, max_tokens=12, start=100 + step % 50))
        for request, n in s.schedule().rows:
            request.num_computed += n
            if request.num_computed == request.num_tokens:
                request.output_ids.append(1)
                if len(request.output_ids) >= request.params.max_tokens:
                    if request.id == "long":
                        return step
                    s.remove(request)
    return None


def test_a_long_prompt_finishes_under_a_stream_of_short_requests():
    s = Scheduler(BlockManager(8, 8), max_batch=4, token_budget=8, prefix_caching=False)
    s.add(req("long", 59, max_tokens=4))
    done = simulate(s, arrive_every=2, steps=400)
    assert done is not None and done < 60, f"the oldest request finished at step {done}"
