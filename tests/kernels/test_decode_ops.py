"""The decode step's small C++ ops (rms_norm, silu_mul, rope_, decode_attention) against plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.engine.kv_cache import PagedKVCache, StepAttention
from qwenkit.model.rope import apply_rope, apply_rope_

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built on this CPU")


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


def test_fast_rms_norm_gives_a_prompts_rows_the_bits_each_has_alone() -> None:
    """The model's norm layer runs the kernel for a prompt's rows as for a decode step's: each of 512 rows
    normed together is that row normed alone (torch's kernel, which prompts used before, sums in another
    order at some widths and row counts: 10 of these outputs). With gradients it is torch's layer, and
    the gradient reaches x."""
    from qwenkit.quant.fused import FastRMSNorm

    g = _g(9)
    norm = FastRMSNorm(896, 1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(896, generator=g) + 0.5)
        x = (torch.randn(1, 512, 896, generator=g) * 3).bfloat16()
        together = norm(x)
        alone = torch.cat([norm(x[:, i : i + 1]) for i in range(512)], dim=1)
    assert torch.equal(together, alone)
    torch.testing.assert_close(
        together,
        norm.weight * F.rms_norm(x.float(), (896,), eps=1e-6).bfloat16(),
        rtol=2**-7,
        atol=0,  # one bf16 step
    )
    xg = x.clone().requires_grad_()
    y = norm(xg)
    y.float().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_silu_mul_equals_torch() -> None:
    x = (torch.randn(4, 1, 2 * 4871, generator=_g()) * 4).bfloat16()  # odd width: the scalar tail too
    x[0, 0, :6] = torch.tensor([-100.0, 100.0, 0.0, -0.0, float("inf"), 30.0])
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = kernels.silu_mul(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2**-8, atol=0)
    assert int((got != want).sum()) <= 5  # of 38968: exp within an ulp of torch's, rounded to bf16


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(14, 2, 64), (4, 4, 32), (12, 2, 128), (6, 2, 16)])
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


def _sdpa_reference(q, k, v, gather, positions) -> torch.Tensor:
    """fp32 SDPA over each row's gathered keys, masked to its position, grouped heads: (B, H, D) float."""
    visible = torch.arange(gather.shape[1])[None] <= positions[:, None]
    return F.scaled_dot_product_attention(
        q[:, :, None].float(),
        k[gather].transpose(1, 2).float(),
        v[gather].transpose(1, 2).float(),
        attn_mask=visible[:, None, None],
        scale=1 / math.sqrt(q.shape[-1]),
        enable_gqa=True,
    )[:, :, 0]


def _paged_rows(lengths, kv_heads, dim, heads, seed, q_scale=3.0):
    """A KV pool in shuffled blocks of 16 slots and one query per row, rows of the given key counts."""
    g = _g(seed)
    span = max(lengths)
    blocks = -(-span // 16)
    order = torch.randperm(len(lengths) * blocks, generator=g).view(len(lengths), blocks)
    gather = (order[:, :, None] * 16 + torch.arange(16)).reshape(len(lengths), -1)[:, :span].contiguous()
    slots = len(lengths) * blocks * 16
    k = torch.randn(slots, kv_heads, dim, generator=g).bfloat16()
    v = torch.randn(slots, kv_heads, dim, generator=g).bfloat16()
    q = (torch.randn(len(lengths), heads, dim, generator=g) * q_scale).bfloat16()  # peaked softmax
    positions = torch.tensor(lengths) - 1
    return q, k, v, gather, positions


# Key counts around the kernel's chunks of 128 keys (partial softmaxes combined), group sizes 1, 3, 5, 6, 7,
# 8 and 10 (two passes of 8 heads over the values), head dims 64, 128, 48 (a half piece of 16), 320 (the
# head dim known only at run time); the scores by transposed keys at 5, 7 and 8 heads of 64.
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [
        (2, 2, 64),
        (9, 3, 64),
        (14, 2, 64),
        (10, 2, 64),
        (16, 2, 64),
        (2, 2, 128),
        (6, 2, 128),
        (12, 2, 128),
        (14, 2, 128),
        (20, 2, 48),
        (4, 2, 320),
    ],
)
def test_decode_attention_across_chunks_matches_sdpa(heads, kv_heads, dim) -> None:
    lengths = [1, 127, 128, 129, 255, 256, 257, 1000]
    q, k, v, gather, positions = _paged_rows(lengths, kv_heads, dim, heads, seed=4)
    got = kernels.decode_attention(q, k, v, gather, positions, 1 / math.sqrt(dim))
    want = _sdpa_reference(q, k, v, gather, positions)
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-2)


def test_decode_attention_one_dominant_key_in_a_late_chunk() -> None:
    """A key that takes nearly all the weight, in the eighth chunk of 128: the chunks' partial sums are
    rescaled to the common max, so the output is (almost) that key's value."""
    q, k, v, gather, positions = _paged_rows([1000], 2, 64, 14, seed=5, q_scale=0.3)
    base = torch.randn(2, 1, 64, generator=_g(7))
    q[0] = (q[0].view(2, 7, 64).float() + base).view(14, 64).bfloat16()  # a group's heads point one way
    hot = int(gather[0, 900])
    k[hot] = (base[:, 0] * 4).bfloat16()  # each head's score there ~ 4 |base|^2 / 8 ~ 32, elsewhere ~ 1
    got = kernels.decode_attention(q, k, v, gather, positions, 1 / math.sqrt(64))
    want = _sdpa_reference(q, k, v, gather, positions)
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-2)
    assert torch.allclose(got[0].float(), v[hot].repeat_interleave(7, 0).float(), atol=0.05)


def test_decode_attention_row_alone_equals_row_in_batch() -> None:
    """A row's output is bit-identical computed alone, inside a batch of 16 rows of other lengths, on
    1, 2 or 4 threads, and run to run: the engine's greedy tokens must not depend on the batch."""
    lengths = [1, 700, 256, 31, 257, 1000, 16, 512, 255, 90, 513, 2, 768, 400, 129, 128]
    q, k, v, gather, positions = _paged_rows(lengths, 2, 64, 14, seed=6)
    scale = 1 / math.sqrt(64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batch = kernels.decode_attention(q, k, v, gather, positions, scale)
        torch.set_num_threads(1)
        one_thread = kernels.decode_attention(q, k, v, gather, positions, scale)
        torch.set_num_threads(4)  # more threads than cores: claims of tasks in any interleaving
        four_threads = kernels.decode_attention(q, k, v, gather, positions, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch, one_thread)
    assert torch.equal(four_threads, one_thread)
    assert torch.equal(batch, kernels.decode_attention(q, k, v, gather, positions, scale))
    for b, n in enumerate(lengths):
        row = slice(b, b + 1)
        alone = kernels.decode_attention(q[row], k, v, gather[row, :n], positions[row], scale)
        assert torch.equal(alone, batch[row]), f"row {b} ({n} keys) differs alone"
    want = _sdpa_reference(q, k, v, gather, positions)
    torch.testing.assert_close(batch.float(), want, rtol=2**-7, atol=1e-2)


def test_decode_attention_reads_q_rows_in_place_and_long_contexts() -> None:
    """q as decode_layer passes it (each row's query heads inside its wider q/k/v row) gives what a
    contiguous q gives; a context of 17 chunks (2100 keys) combines like the short ones."""
    q, k, v, gather, positions = _paged_rows([2100, 5, 300], 2, 64, 14, seed=8)
    scale = 1 / math.sqrt(64)
    qkv = torch.zeros(3, 14 + 2 * 2, 64, dtype=torch.bfloat16)
    qkv[:, :14] = q
    view = qkv.narrow(1, 0, 14)
    assert not view.is_contiguous()
    got = kernels.decode_attention(view, k, v, gather, positions, scale)
    assert torch.equal(got, kernels.decode_attention(q, k, v, gather, positions, scale))
    torch.testing.assert_close(
        got.float(), _sdpa_reference(q, k, v, gather, positions), rtol=2**-7, atol=1e-2
    )


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
@pytest.mark.parametrize(("b", "t"), [(2, 3), (1, 300)])  # decode rows; a prompt chunk
def test_rope_in_place_equals_apply_rope(in_fp32, rot, b, t) -> None:
    """Bit for bit the model's apply_rope, on q and k heads read straight out of a fused qkv output
    (partial rotary too), in bf16 steps or in float32 (Qwen v1), for a decode step's rows and a prompt's."""
    g = _g(3)
    qkv = torch.randn(b, t, 20, 64, generator=g).bfloat16()  # (B, T, q + k + v heads, D)
    cos, sin = torch.randn(2, b, 1, t, rot, generator=g)
    if not in_fp32:
        cos, sin = cos.bfloat16(), sin.bfloat16()
    qk, v_before = qkv[:, :, :16], qkv[:, :, 16:].clone()
    want = apply_rope(qk.transpose(1, 2), cos, sin, in_fp32).transpose(1, 2)
    got = apply_rope_(qk, cos, sin, in_fp32)
    assert got.data_ptr() == qkv.data_ptr()  # in place
    assert torch.equal(got, want)
    assert torch.equal(qkv[:, :, 16:], v_before)  # v untouched


def test_rope_with_gradients_leaves_x_alone_and_passes_them() -> None:
    """Training (x needs gradients): not in place, through torch's ops, so the gradient reaches x."""
    g = _g(4)
    x = torch.randn(1, 40, 4, 64, generator=g).bfloat16().requires_grad_()
    cos, sin = torch.randn(2, 1, 1, 40, 64, generator=g).bfloat16()
    before = x.detach().clone()
    y = apply_rope_(x, cos, sin, False)
    assert y.data_ptr() != x.data_ptr() and torch.equal(x.detach(), before)
    y.float().sum().backward()
    want = apply_rope(before.transpose(1, 2), cos, sin, False).transpose(1, 2)
    assert torch.equal(y.detach(), want) and x.grad is not None and x.grad.abs().sum() > 0


def _lora_case(S: int, M: int, K: int, N: int, R: int, seed: int = 0):
    g = _g(seed)
    x = torch.randn(M, K, generator=g).bfloat16()
    y = torch.randn(M, N, generator=g).bfloat16()
    at = torch.randn(S, K, R, generator=g) * 0.1
    bt = torch.randn(S, R, N, generator=g) * 0.1
    return x, y, at, bt


@pytest.mark.parametrize(("K", "N", "R"), [(64, 96, 16), (576, 960, 48), (70, 33, 32), (1536, 576, 16)])
def test_lora_add_equals_torch_and_leaves_base_rows_alone(K, N, R) -> None:
    """Each row gains bf16(B_s A_s x) of its slot, as torch's float32 products of the pairs as the tiles
    hold them (bf16) rounded then added (within a bf16 step: the sums run in another order); rows of
    slot 0 keep their bits."""
    x, y, at, bt = _lora_case(3, 11, K, N, R)
    slots = torch.tensor([0, 1, 2, 3, 1, 1, 0, 2, 3, 3, 1])
    got = y.clone()
    kernels.lora_add_(got, x, *kernels.pack_lora(at, bt), slots)
    at, bt = at.bfloat16().float(), bt.bfloat16().float()
    want = y.clone()
    for m, s in enumerate(slots.tolist()):
        if s:
            want[m] = y[m] + ((x[m].float() @ at[s - 1]) @ bt[s - 1]).bfloat16()
    assert torch.equal(got[slots == 0], y[slots == 0])
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-2)
    assert not torch.equal(got[slots != 0], y[slots != 0])


def test_lora_add_rows_do_not_depend_on_the_rows_beside_them() -> None:
    """A row's update is the same bits alone, in a block of 8 rows of its adapter, or among other adapters'
    rows (the kernel takes an adapter's rows up to 8 at a time, so 11 rows make blocks of 8 and 3)."""
    x, y, at, bt = _lora_case(2, 11, 576, 960, 48, seed=1)
    tiles = kernels.pack_lora(at, bt)
    together = y.clone()
    kernels.lora_add_(together, x, *tiles, torch.ones(11, dtype=torch.long))
    mixed = y.clone()
    mixed_slots = torch.tensor([1, 2] * 5 + [1])
    kernels.lora_add_(mixed, x, *tiles, mixed_slots)
    for m in range(11):
        alone = y[m : m + 1].clone()
        kernels.lora_add_(alone, x[m : m + 1], *tiles, torch.ones(1, dtype=torch.long))
        assert torch.equal(alone[0], together[m])
        if mixed_slots[m] == 1:
            assert torch.equal(alone[0], mixed[m])


def test_lora_add_refuses_bad_input() -> None:
    x, y, at, bt = _lora_case(2, 2, 64, 96, 16)
    tiles = kernels.pack_lora(at, bt)
    with pytest.raises(RuntimeError, match="adapter slot 3 outside 0..2"):
        kernels.lora_add_(y, x, *tiles, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="one int64 adapter slot per row"):
        kernels.lora_add_(y, x, *tiles, torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"must be contiguous bfloat16 \(kernels.pack_lora\)"):
        kernels.lora_add_(y, x, at, bt, torch.tensor([1, 1]))  # not packed
    with pytest.raises(RuntimeError, match=r"must be contiguous bfloat16 \(kernels.pack_lora\)"):
        kernels.lora_add_(y, x, *(t.float() for t in tiles), torch.tensor([1, 1]))  # tiles of float32
    with pytest.raises(RuntimeError, match="must be bfloat16 CPU tensors"):
        kernels.lora_add_(y.float(), x, *tiles, torch.tensor([1, 1]))
