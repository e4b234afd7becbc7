"""The block manager and scheduler alone: pure Python, no model."""

from __future__ import annotations

from qwenkit.engine.blocks import BlockManager, block_hashes
from qwenkit.engine.request import Request, TokenLogprob
from qwenkit.engine.sampling import SamplingParams
from qwenkit.engine.scheduler import Scheduler

P = SamplingParams(temperature=0, max_tokens=100)


def req(rid, n, params=P, start=0):
    return Request(rid, list(range(start, start + n)), params)


def test_block_hashes_chain_and_key():
    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2  # the partial third block has no hash
    assert block_hashes(list(range(32)), 16) == a
    assert block_hashes([0, *list(range(1, 40))], 16)[1] == a[1]
    changed_first = block_hashes([99, *list(range(1, 40))], 16)
    assert changed_first[1] != a[1]  # a block's hash depends on everything before it
    assert block_hashes(list(range(40)), 16, b"ntk=3") != a


def test_lru_eviction_keeps_recent_prefixes():
    bm = BlockManager(4, 16)
    h = [bytes([i]) * 16 for i in range(4)]
    first = bm.allocate(2)
    for b, hh in zip(first, h[:2], strict=True):
        bm.cache_block(b, hh)
    bm.free(first)  # unheld but still cached
    assert bm.usage == 0 and bm.match_prefix(h[:2]) == first
    bm.free(first)
    second = bm.allocate(2)  # takes the never-cached blocks first
    assert set(second).isdisjoint(first) and len(bm.cached) == 2
    third = bm.allocate(1)  # now one cached block must go: the tail one (freed first)
    assert third == [first[1]] and bm.match_prefix(h[:2]) == [first[0]]
    assert bm.allocate(5) is None


def test_budget_chunks_prompts_and_decodes_first():
    s = Scheduler(BlockManager(64, 16), max_batch=4, token_budget=20)
    a, b = req("a", 50), req("b", 30, start=100)
    s.add(a)
    s.add(b)
    rows = s.schedule().rows
    assert [(r.id, n) for r, n in rows] == [("a", 20)]  # the budget is spent on a's first chunk
    a.num_computed += 20
    rows = s.schedule().rows  # b waits: a's prompt takes half the budget, and b starts on the rest
    assert [(r.id, n) for r, n in rows] == [("a", 10), ("b", 10)]
    a.num_computed += 10
    b.num_computed += 10
    rows = s.schedule().rows  # nobody waits: the oldest prompt takes the whole budget again
    assert [(r.id, n) for r, n in rows] == [("a", 20)]
    a.num_computed += 20
    b.num_computed += 20
    b.output_ids.append(7)  # b decodes (one token to compute); a has two (a preempted one's recompute)
    a.output_ids += [7, 8]
    s.add(req("c", 30, start=200))
    rows = s.schedule().rows  # the decoding row first, then a within its half, then c on the rest
    assert [(r.id, n) for r, n in rows] == [("b", 1), ("a", 2), ("c", 17)]


def test_a_decoding_request_never_waits_behind_a_long_prompt():
    s = Scheduler(BlockManager(64, 16), max_batch=4, token_budget=16)
    short, long = req("short", 4), req("long", 200, start=100)
    s.add(short)
    s.schedule()
    short.num_computed = 4
    short.output_ids.append(1)
    s.add(long)
    for _ in range(3):  # long takes its prompt in chunks; short decodes in every one of those steps
        rows = s.schedule().rows
        assert [(r.id, n) for r, n in rows] == [("short", 1), ("long", 15)]
        short.num_computed += 1
        short.output_ids.append(1)
        long.num_computed += 15


def test_preempts_newest_when_blocks_run_out():
    s = Scheduler(BlockManager(4, 16), max_batch=4, token_budget=512, prefix_caching=False)
    a, b = req("a", 20), req("b", 20, start=100)
    s.add(a)
    s.add(b)
    assert [r.id for r, _ in s.schedule().rows] == ["a", "b"]  # 2 blocks each
    for r in (a, b):
        r.num_computed = 20
        r.output_ids += [1] * 13  # both now need a third block
    out = s.schedule()
    assert [r.id for r in out.preempted] == ["b"] and [r.id for r, _ in out.rows] == ["a"]
    assert b.num_computed == 0 and b.block_table == [] and s.waiting[0] is b
    assert len(a.block_table) == 3


def test_admission_waits_for_blocks_and_rows():
    s = Scheduler(BlockManager(3, 16), max_batch=1, token_budget=512)
    a, b = req("a", 40), req("b", 10, start=100)
    s.add(a)
    s.add(b)
    assert [r.id for r, _ in s.schedule().rows] == ["a"]
    s.remove(a)
    assert s.blocks.num_free == 3
    assert [r.id for r, _ in s.schedule().rows] == ["b"]


def test_a_request_waiting_for_blocks_is_counted_once_in_the_prefix_cache_stats():
    """A waiting request looks its prefix up at every step it tries to start; while the pool had no
    blocks for it, each try was counted, so the prefix-cache queries and hits (the server's
    vllm:prefix_cache_* counters) grew by its prompt at every step it waited."""
    s = Scheduler(BlockManager(4, 16), max_batch=4, token_budget=512)
    a = req("a", 40)
    s.add(a)
    s.schedule()
    a.num_computed = 40
    s.on_computed(a)  # its two full blocks are published
    a.output_ids.append(1)
    b = req("b", 60)  # a's 40 tokens and 20 more: 2 blocks from the cache, 2 new, and 1 is free
    s.add(b)
    for _ in range(3):
        assert [r.id for r, _ in s.schedule().rows] == ["a"]
        a.num_computed += 1
        a.output_ids.append(1)
    s.remove(a)
    assert [r.id for r, _ in s.schedule().rows] == ["b"] and b.num_cached_tokens == 32
    assert (s.blocks.prefix_queries, s.blocks.prefix_hits) == (40 + 60, 32)


def test_prefix_reuse_leaves_one_token_and_skips_blocks_without_prompt_logprobs():
    s = Scheduler(BlockManager(16, 16), max_batch=4, token_budget=512)
    a = req("a", 32)
    s.add(a)
    s.schedule()
    a.num_computed = 32
    s.on_computed(a)
    same = req("same", 32)
    s.add(same)
    (row,) = s.schedule().rows[1:]
    assert row == (same, 16) and same.num_cached_tokens == 16  # the last block is recomputed
    scoring = req("score", 32, SamplingParams(max_tokens=0, prompt_logprobs=0))
    s.add(scoring)
    assert s.schedule().rows[-1] == (scoring, 32) and scoring.num_cached_tokens == 0


SCORE = SamplingParams(max_tokens=0, prompt_logprobs=1)


def computed_with_logprobs(s: Scheduler, r: Request) -> list[int]:
    """What the engine does for a scoring request: compute it whole, record every prompt token's
    log-probability (one alternative each), publish its blocks, and finish it."""
    s.add(r)
    s.schedule()
    r.num_computed = r.num_tokens
    r.prompt_logprobs = [None] + [TokenLogprob(t, -t / 100, [(t + 1, -0.5)]) for t in r.prompt_ids[1:]]
    s.on_computed(r)
    blocks = r.block_table
    s.remove(r)
    return blocks


def test_a_scoring_request_reuses_blocks_that_kept_logprobs_and_recomputes_one_position_in_a_copy():
    s = Scheduler(BlockManager(16, 16), max_batch=4, token_budget=512)
    a = req("a", 40, SCORE)
    held = computed_with_logprobs(s, a)
    assert set(s.blocks.logprobs) == set(a.block_hashes[:2])  # the partial third block keeps nothing
    refs = list(s.blocks.ref_counts)

    b = req("b", 36, SamplingParams(max_tokens=0, prompt_logprobs=0))  # the same first 36 tokens
    s.add(b)
    step = s.schedule()
    assert step.rows == [(b, 36 - 31)] and b.num_computed == 31 and b.num_cached_tokens == 31
    # block 0 shared; block 1 a private copy that position 31 is computed again into
    assert b.block_table[0] == held[0] and b.block_table[1] not in held
    assert step.copies == [(held[1], b.block_table[1])]
    assert s.blocks.ref_counts[held[1]] == refs[held[1]] == 0  # the source is not held
    assert s.blocks.ref_counts[held[0]] == 1
    # the kept log-probabilities of positions 0..31, cut to the alternatives b asked for
    assert len(b.prompt_logprobs) == 32 and b.prompt_logprobs[0] is None
    assert [(e.token_id, e.logprob, e.top) for e in b.prompt_logprobs[1:]] == [
        (t, -t / 100, []) for t in range(1, 32)
    ]
    # the copy is never published: the cached block stays the one that holds the prefix
    b.num_computed = 36
    s.on_computed(b)
    assert s.blocks.cached[b.block_hashes[1]] == held[1]

    wider = req("wider", 36, SamplingParams(max_tokens=0, prompt_logprobs=2))  # more than was kept
    s.add(wider)
    assert s.schedule().rows[-1] == (wider, 36) and wider.num_cached_tokens == 0


def test_a_copy_costs_no_block_more_than_computing_the_prompt_whole():
    """The copy's source is let go at admission, so a pool that fits the prompt fits its reuse: here
    the source is handed out again in the same step, after the copy is made (the forward makes copies
    before it writes)."""
    s = Scheduler(BlockManager(3, 16), max_batch=4, token_budget=512)
    held = computed_with_logprobs(s, req("a", 40, SCORE))  # blocks 0 and 1 cached, with log-probs
    other = req("other", 10, start=500)
    s.add(other)
    s.schedule()  # takes the one block nothing is cached in
    b = req("b", 36, SCORE)
    s.add(b)
    assert b not in [r for r, _ in s.schedule().rows]  # three blocks, two free: b waits
    assert b.block_table == [] and b.copy_source is None and s.blocks.ref_counts[:2] == [0, 0]
    s.remove(other)
    step = s.schedule()
    assert step.rows == [(b, 5)] and b.num_cached_tokens == 31
    ((source, copy),) = step.copies
    assert source == held[1] and b.block_table[0] == held[0] and b.block_table[1] == copy
    assert source in b.block_table  # handed out again, for positions 32.., written after the copy


def test_token_ids_are_slices_of_prompt_and_output_together():
    r = Request(0, [10, 11, 12], P, output_ids=[20, 21])
    whole = [10, 11, 12, 20, 21]
    for start in range(6):
        for end in range(start, 7):  # past the end as a list slice is: clipped
            assert r.token_ids(start, end) == whole[start:end], (start, end)
