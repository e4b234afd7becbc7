"""Decoding rows at different positions: the kernels read each row's keys 0..its position from the raw
gather table, so a step on them makes no (rows, keys) mask; SDPA's rows still get the mask and padding,
made once a step on first use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.engine.kv_cache import PagedKVCache, StepAttention

HKV, H, D, SIZE = 2, 4, 16, 16
ROWS = [([0, 1, 2], 40), ([3], 5), ([4, 5], 16)]  # (block table, position): spans differ


def _cache(dtype: torch.dtype) -> PagedKVCache:
    cache = PagedKVCache(2, 8, SIZE, HKV, D, dtype, torch.device("cpu"))
    torch.manual_seed(0)
    for pool in cache.k + cache.v:
        pool.copy_(torch.randn(pool.shape))
    return cache


def test_kernel_rows_get_the_raw_gather_and_no_mask() -> None:
    if not kernels.available():
        pytest.skip("needs the CPU kernels")
    cache = _cache(torch.bfloat16)
    attention = StepAttention(cache, ROWS, [])
    assert attention.fast_decode
    assert attention.decode_mask is None
    assert torch.equal(attention.decode_gather, cache.slots([t for t, _ in ROWS], 41))
    pools = attention.decode_pools()
    assert pools is not None and pools.gather is attention.decode_gather


def test_sdpa_rows_see_only_their_keys() -> None:
    """float32 pools attend through SDPA: each row's output is attention over its own keys alone."""
    cache = _cache(torch.float32)
    attention = StepAttention(cache, ROWS, [])
    assert not attention.fast_decode
    torch.manual_seed(1)
    q, k, v = torch.randn(1, H, 3, D), torch.randn(1, HKV, 3, D), torch.randn(1, HKV, 3, D)
    out = attention.attend(0, q, k, v)  # (1, H, 3, D)
    assert attention.decode_mask is not None and attention.decode_mask.shape == (3, 1, 1, 41)
    for row, (table, pos) in enumerate(ROWS):
        slots = [table[p // SIZE] * SIZE + p % SIZE for p in range(pos + 1)]
        keys = cache.k[0][slots].transpose(0, 1)[None]  # (1, Hkv, pos + 1, D), the new K/V included
        values = cache.v[0][slots].transpose(0, 1)[None]
        want = F.scaled_dot_product_attention(q[:, :, row : row + 1], keys, values, enable_gqa=True)
        torch.testing.assert_close(out[:, :, row : row + 1], want, rtol=1e-5, atol=1e-6)
    masked_gather = attention.decode_gather
    attention.attend(1, q, k, v)  # the next layer reuses the step's mask and padding
    assert attention.decode_gather is masked_gather
