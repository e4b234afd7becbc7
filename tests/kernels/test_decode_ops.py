"""The decode step's small C++ ops (rms_norm, silu_mul, rope_, decode_attention) against plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.engine.kv_cache import PagedKVCache, StepAttention
from qwenkit.model.rope import apply_rope, apply_rope_

pytestmark = pytest.mark.skipif(not kernels.available(), reason="AVX-512 kernels not built on this CPU")


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(1, 1, 896), (3, 5, 1536), (2, 7, 14, 64), (1, 70)])
def test_rms_norm_equals_torch_steps(shape) -> None:
    g = _g()
    x = (torch.randn(shape, generator=g) * 3).bfloat16()
    w = (torch.rand(shape[-1], generator=g) + 0.5).bfloat16()
    want = w * F.rms_norm(x.float(), (shape[-1],), eps=1e-6).to(torch.bfloat16)
    got = kernels.rms_norm(x, w, 1e-6)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2**-8, atol=0)  # at most one bf16 step apart
    assert float((got != want).float().mean()) < 1e-3


def test_silu_mul_equals_torch() -> None:
    x = (torch.randn(4, 1, 2 * 4871, generator=_g()) * 4).bfloat16()  # odd width: the scalar tail too
    x[0, 0, :6] = torch.tensor([-100.0, 100.0, 0.0, -0.0, float("inf"), 30.0])
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = kernels.silu_mul(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2**-8, atol=0)
    assert int((got != want).sum()) <= 5  # of 38968: exp within an ulp of torch's, rounded to bf16


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(14, 2, 64), (4, 4, 32), (12, 2, 128)])
def test_decode_attention_matches_sdpa(heads, kv_heads, dim) -> None:
    g = _g(1)
    slots, rows, span = 160, 3, 40
    k = torch.randn(slots, kv_heads, dim, generator=g).bfloat16()
    v = torch.randn(slots, kv_heads, dim, generator=g).bfloat16()
    gather = torch.randperm(slots, generator=g)[: rows * span].view(rows, span)  # no slot shared
    positions = torch.tensor([39, 7, 0])
    q = torch.randn(rows, heads, dim, generator=g).bfloat16()
    got = kernels.decode_attention(q, k, v, gather, positions, 1 / math.sqrt(dim))
    visible = torch.arange(span)[None] <= positions[:, None]
    want = F.scaled_dot_product_attention(
        q[:, :, None].float(),
        k[gather].transpose(1, 2).float(),
        v[gather].transpose(1, 2).float(),
        attn_mask=visible[:, None, None],
        enable_gqa=True,
    )[:, :, 0]
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-2)
    # a row sees only its own keys up to its position: NaN in any other slot changes nothing
    k[gather[1, 8:]] = float("nan")
    v[gather[1, 8:]] = float("nan")
    assert torch.equal(kernels.decode_attention(q, k, v, gather, positions, 1 / math.sqrt(dim)), got)


def test_decode_attention_rejects_bad_input() -> None:
    q = torch.zeros(1, 4, 32, dtype=torch.bfloat16)
    pool = torch.zeros(8, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="slot 8 outside the pool"):
        kernels.decode_attention(q, pool, pool, torch.tensor([[8]]), torch.tensor([0]), 1.0)
    with pytest.raises(RuntimeError, match="outside the 1 gathered keys"):
        kernels.decode_attention(q, pool, pool, torch.tensor([[0]]), torch.tensor([1]), 1.0)


def test_step_attention_fast_decode_matches_sdpa_path(monkeypatch) -> None:
    """The engine's decode rows through the kernel give what its SDPA path gives (rows of unequal
    length, grouped heads), within bf16 rounding."""
    g = _g(2)
    cache = PagedKVCache(1, 8, 4, 2, 32, torch.bfloat16, "cpu")
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    rows = [([3, 5, 1], 9), ([0, 2], 4)]
    q = torch.randn(1, 4, 2, 32, generator=g).bfloat16()
    k = torch.randn(1, 2, 2, 32, generator=g).bfloat16()
    v = torch.randn(1, 2, 2, 32, generator=g).bfloat16()
    fast = StepAttention(cache, rows, [])
    assert fast.fast_decode
    got = fast.attend(0, q, k, v)
    slow = StepAttention(cache, rows, [])
    slow.fast_decode = False
    want = slow.attend(0, q, k, v)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize(("in_fp32", "rot"), [(False, 64), (True, 64), (False, 32), (False, 24)])
def test_rope_in_place_equals_apply_rope(in_fp32, rot) -> None:
    """Bit for bit the model's apply_rope, on q and k heads read straight out of a fused qkv output
    (partial rotary too), in bf16 steps or in float32 (Qwen v1)."""
    g = _g(3)
    qkv = torch.randn(2, 3, 20, 64, generator=g).bfloat16()  # (B, T, q + k + v heads, D)
    cos, sin = torch.randn(2, 2, 1, 3, rot, generator=g)
    if not in_fp32:
        cos, sin = cos.bfloat16(), sin.bfloat16()
    qk, v_before = qkv[:, :, :16], qkv[:, :, 16:].clone()
    want = apply_rope(qk.transpose(1, 2), cos, sin, in_fp32).transpose(1, 2)
    got = apply_rope_(qk, cos, sin, in_fp32)
    assert got.data_ptr() == qkv.data_ptr()  # in place
    assert torch.equal(got, want)
    assert torch.equal(qkv[:, :, 16:], v_before)  # v untouched
