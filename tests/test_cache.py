"""Cache: generation with the paged KV cache (chunked, prefix-shared, preempted and recomputed) equals
recomputing without it."""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, save_hf, write_v1_checkpoint

from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams
from qwenkit.engine.kv_cache import PagedKVCache, StepAttention


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(save_hf(hf_model("qwen3"), tmp_path_factory.mktemp("m") / "q3"), dtype="float32")[0]


def test_cached_logits_equal_recomputed(model):
    cfg = model.config
    cache = PagedKVCache(
        cfg.num_hidden_layers, 16, 4, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu"
    )
    seqs = [
        torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 17)
    ]
    for t in cache.k + cache.v:  # the pool is uninitialized memory: no unwritten slot may leak in
        t.fill_(float("nan"))
    tables = [[9, 2, 14, 5, 0, 11, 7, 3], [1, 12, 6, 15, 4]]  # scattered, interleaved blocks
    done = [0, 0]
    with torch.no_grad():
        # Both sequences in uneven chunks, batched together: one-token rows decode (at different
        # positions, so the shorter row's padding meets unwritten slots), longer ones chunk.
        for sizes in ((5, 3), (9, 2), (1, 1), (1, 1), (7, 1), (1, 1), (1, 8), (6, 9)):
            rows = [(b, min(sizes[b], len(s) - done[b])) for b, s in enumerate(seqs) if done[b] < len(s)]
            rows = [r for r in rows if r[1] == 1] + [r for r in rows if r[1] > 1]  # decoding rows first
            ids, pos = [], []
            for b, n in rows:
                ids += seqs[b][done[b] : done[b] + n]
                pos += range(done[b], done[b] + n)
            step = StepAttention(
                cache,
                [(tables[b], done[b]) for b, n in rows if n == 1],
                [(tables[b], done[b], n) for b, n in rows if n > 1],
            )
            logits = model(torch.tensor([ids]), positions=torch.tensor([pos]), cache=step)[0]
            offset = 0
            for b, n in rows:
                full = model(torch.tensor([seqs[b][: done[b] + n]]))[0, done[b] : done[b] + n]
                assert (logits[offset : offset + n] - full).abs().max() < 1e-4
                offset += n
                done[b] += n
    assert done == [30, 17]


def run(engine: Engine, prompts, params, ids=None):
    rids = [engine.add_request(p, params) for p in prompts]
    out = {r: [] for r in rids}
    cached = {}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
            cached[o.request_id] = o.num_cached_tokens
    return [out[r] for r in rids], [cached[r] for r in rids]


SYSTEM = list(range(3, 60))  # a shared 57-token prefix: 3 full blocks of 16
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_prefix_cache_hits_equal_uncached(model):
    prompts = [[*SYSTEM, 100, 101, 102], [*SYSTEM, 200, 201], SYSTEM[:40]]
    uncached, none = run(Engine(model, prefix_caching=False), prompts, PARAMS)
    engine = Engine(model)
    first, c0 = run(engine, prompts[:1], PARAMS)
    rest, c1 = run(engine, prompts[1:], PARAMS)
    assert first + rest == uncached and none == [0, 0, 0]
    assert c0 == [0] and c1 == [48, 32]  # whole blocks of the shared prefix, then what they share
    stats = engine.stats()
    assert stats.prefix_hits == 80 and stats.kv_usage == 0


def test_copies_of_one_prompt_share_its_blocks(model):
    """n > 1: copies admitted together wait for the first to publish the prompt's blocks."""
    engine = Engine(model)
    outs, cached = run(
        engine, [SYSTEM] * 3, SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    )
    assert cached == [0, 48, 48]
    alone, _ = run(
        Engine(model, prefix_caching=False),
        [SYSTEM],
        SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True),
    )
    assert outs == alone * 3


def test_preemption_recomputes_exactly(model):
    """A pool too small for everyone: the newest requests are preempted and recomputed, never corrupted."""
    prompts = [list(range(10 + i, 40 + i)) for i in range(4)]
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=40, ignore_eos=True)
    roomy, _ = run(Engine(model, max_batch_size=4), prompts, params)
    tight = Engine(model, max_batch_size=4, max_seq_len=96, kv_cache_tokens=160, prefill_chunk=32)
    squeezed, _ = run(tight, prompts, params)
    assert squeezed == roomy
    assert tight.preemptions > 0 and tight.stats().kv_usage == 0


def test_prefix_cache_keys_include_v1_ntk_alpha(tmp_path):
    """Qwen v1 dynamic NTK: the same prefix under a different alpha has different K/V, so no reuse."""
    v1 = load_model(write_v1_checkpoint(tmp_path / "v1"), dtype="float32")[0]
    assert v1.ntk_alpha(20) == 1 and v1.ntk_alpha(50) == 3  # trained length 32
    short, long = list(range(5, 25)), list(range(5, 55))
    engine = Engine(v1, max_seq_len=128)
    run(engine, [short], PARAMS)
    out, cached = run(engine, [long], PARAMS)
    assert cached == [0]
    ref, _ = run(Engine(v1, max_seq_len=128, prefix_caching=False), [long], PARAMS)
    assert out == ref
    again, cached = run(engine, [[*long[:49], 7]], PARAMS)  # same alpha: reuse
    assert cached == [48]
    assert again == run(Engine(v1, max_seq_len=128, prefix_caching=False), [[*long[:49], 7]], PARAMS)[0]
