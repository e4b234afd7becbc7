"""A prompt chunk's causal attention on AMX (kernels.prefill_attention), keys read in place from the pool.

Checked against attention in float32 over the same keys, as closely as torch's own bf16 SDPA gets; a
query's result must not depend on how the prompt was cut into chunks; bad arguments are refused by name;
and the engine's StepAttention takes it for prompt chunks and agrees with its SDPA path. Where AMX is
not in use the kernel does not run (prefill_attention_runs says so) and these tests skip."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.engine.kv_cache import PagedKVCache, StepAttention


@pytest.fixture
def amx(loaded):
    before = kernels.amx_in_use()
    if not kernels.use_amx(True) or not kernels.prefill_attention_runs(64):
        kernels.use_amx(before)
        pytest.skip(f"AMX not in use (the {kernels.isa_level()} build, or a CPU without AMX-BF16)")
    yield
    kernels.use_amx(before)


def make(n, start, H, Hkv, D, pool=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    kp = torch.randn(pool, Hkv, D, generator=g).bfloat16()
    vp = torch.randn(pool, Hkv, D, generator=g).bfloat16()
    slots = torch.randperm(pool, generator=g)[: start + n]
    qkv = torch.randn(n, H + 2 * Hkv, D, generator=g).bfloat16()
    return qkv[:, :H], kp, vp, slots  # q as the model hands it over: a view, rows H + 2 Hkv heads apart


def causal(n, start):
    return torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]


def sdpa(q, kp, vp, slots, start, dtype):
    k = kp[slots].transpose(0, 1)[None].to(dtype)
    v = vp[slots].transpose(0, 1)[None].to(dtype)
    queries = q.transpose(0, 1)[None].to(dtype)
    out = F.scaled_dot_product_attention(queries, k, v, attn_mask=causal(q.shape[0], start), enable_gqa=True)
    return out[0].transpose(0, 1)  # (n, H, D)


@pytest.mark.parametrize(
    ("n", "start", "H", "Hkv", "D"),
    [
        (1, 0, 2, 1, 64),
        (5, 0, 4, 2, 64),
        (17, 0, 14, 2, 64),  # Qwen2.5-0.5B's heads; a partial block of 16 queries
        (37, 100, 14, 2, 64),  # across the first 128-key block
        (200, 0, 12, 2, 128),  # Qwen2.5-1.5B's heads
        (130, 300, 4, 4, 128),  # Qwen v1: no GQA
        (16, 16, 2, 2, 32),
        (64, 700, 8, 1, 256),
    ],
)
def test_matches_float32_attention_as_closely_as_sdpa(amx, n, start, H, Hkv, D) -> None:
    q, kp, vp, slots = make(n, start, H, Hkv, D)
    got = kernels.prefill_attention(q, kp, vp, slots, start, D**-0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (n, H, D)
    exact = sdpa(q, kp, vp, slots, start, torch.float32)
    torch_bf16 = sdpa(q, kp, vp, slots, start, torch.bfloat16).float()
    err, torch_err = (got.float() - exact).abs().max(), (torch_bf16 - exact).abs().max()
    assert err <= 1.5 * torch_err + 1e-3, (float(err), float(torch_err))
    # and the typical output is right to bf16's rounding, not only the worst
    assert (got.float() - exact).abs().mean() <= 2 * (torch_bf16 - exact).abs().mean() + 1e-4


def test_a_querys_result_does_not_depend_on_the_chunks(amx) -> None:
    """The same 300-token prompt in one chunk, and in chunks of 128, 64, 100 and 8 tokens: every query's
    output bit for bit the same (key blocks start at position 0, so each query's arithmetic is its own)."""
    q, kp, vp, slots = make(300, 0, 14, 2, 64)
    whole = kernels.prefill_attention(q, kp, vp, slots, 0, 0.125)
    for cuts in ([0, 128, 300], [0, 64, 128, 192, 256, 300], [0, 100, 200, 300], [0, 8, 296, 300]):
        parts = [
            kernels.prefill_attention(q[a:b], kp, vp, slots[:b], a, 0.125)
            for a, b in itertools.pairwise(cuts)
        ]
        assert torch.equal(torch.cat(parts), whole), cuts


def test_masked_keys_never_reach_the_output(amx) -> None:
    """A query must not see keys after its position: keys past the chunk's first query made to win any
    softmax (and their values huge) leave that query's output as it was, and change the later ones'.
    (NaN there would reach it as 0 * NaN, in torch's SDPA as here: a masked weight is a zero.)"""
    q, kp, vp, slots = make(40, 20, 4, 2, 64)
    before = kernels.prefill_attention(q, kp, vp, slots, 20, 0.125)
    kp[slots[21:]] = q[0, 0] * 50  # scores of thousands for q[0] were they seen
    vp[slots[21:]] = 1e4
    after = kernels.prefill_attention(q, kp, vp, slots, 20, 0.125)
    assert torch.equal(after[0], before[0])  # position 20 sees keys 0..20 only
    assert (after[1:] != before[1:]).any(dim=2).all()  # every later query, in every head, does see them


def test_bad_arguments_are_refused_by_name(amx) -> None:
    q, kp, vp, slots = make(8, 4, 4, 2, 64)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.prefill_attention(q.float(), kp, vp, slots, 4, 0.125)
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.prefill_attention(q, kp, vp, torch.cat([slots[:-1], torch.tensor([5000])]), 4, 0.125)
    with pytest.raises(RuntimeError, match="start \\+ n"):
        kernels.prefill_attention(q, kp, vp, slots[:-1], 4, 0.125)
    with pytest.raises(RuntimeError, match="head shapes"):
        kernels.prefill_attention(q[:, :3], kp, vp, slots, 4, 0.125)
    with pytest.raises(RuntimeError, match="scale must be positive"):
        kernels.prefill_attention(q, kp, vp, slots, 4, 0.0)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.prefill_attention(
            q[..., :48], kp[..., :48].contiguous(), vp[..., :48].contiguous(), slots, 4, 0.1
        )


def test_step_attention_takes_it_for_prompt_chunks(amx) -> None:
    """The engine's StepAttention: a decode row and two prompt chunks (one starting its sequence, one
    after 70 cached tokens) in one step; the chunks' output on the kernel agrees with the SDPA path."""
    H, Hkv, D, block = 14, 2, 64, 16
    g = torch.Generator().manual_seed(3)
    cache = PagedKVCache(1, 32, block, Hkv, D, torch.bfloat16, "cpu")
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    decode = [([0, 1], 20)]
    chunks = [([2, 3, 4], 0, 40), ([5, 6, 7, 8, 9, 10], 70, 23)]
    N = 1 + 40 + 23
    q = (
        torch.randn(1, N, H, D, generator=g).bfloat16().transpose(1, 2)
    )  # (1, H, N, D), heads of a row together
    k = torch.randn(1, Hkv, N, D, generator=g).bfloat16()
    v = torch.randn(1, Hkv, N, D, generator=g).bfloat16()
    fast_step = StepAttention(cache, decode, chunks)
    assert fast_step.fast_prefill
    fast = fast_step.attend(0, q, k, v)
    kernels.use_amx(False)
    plain_step = StepAttention(cache, decode, chunks)
    assert not plain_step.fast_prefill
    plain = plain_step.attend(0, q, k, v)
    assert fast.shape == plain.shape == (1, H, N, D)
    assert (fast.float() - plain.float()).abs().max() < 0.03
    assert torch.equal(fast[:, :, :1], plain[:, :, :1])  # the decode row takes the same kernel either way
