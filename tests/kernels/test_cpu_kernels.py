"""The C++ CPU kernels against plain PyTorch float references (their build: test_kernel_build.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.kernels import build

SRC = Path(__file__).resolve().parents[2] / "src"
needs_isa = pytest.mark.skipif(build.missing_isa() is not None, reason=f"{build.missing_isa()}")
LEVEL = build.isa_level()  # the instruction-set level this CPU builds ("avx512" or "avx2")

# (N, K): the Qwen2.5-0.5B / 1.5B decode shapes (lm_head covered once, below) and odd ones.
REAL_SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864), (1536, 1536), (256, 1536), (8960, 1536)]
ODD_SHAPES = [(131, 96), (1000, 160), (17, 32), (33, 288)]  # N not a multiple of 16, K = 32 * odd


def bf16_reference(x, w, bias):
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("n", [1, 15, 16, 17, 48, 131])
@pytest.mark.parametrize("k", [1, 2, 7, 64, 130])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prepare_bf16_is_the_padded_transposed_layout(n, k, dtype):
    """Packed in place (one allocation) it is byte for byte the layout built the straightforward way:
    rows padded to tiles of 16 and K to even with zeros, then each tile's input pairs made contiguous;
    from another dtype (rounded to bf16) and from a transposed view too."""
    tiles, kp = -(-n // 16), k + k % 2
    for w in (torch.randn(n, k).to(dtype), torch.randn(k, n).to(dtype).T):
        t = torch.zeros(tiles * 16, kp, dtype=torch.bfloat16)
        t[:n, :k] = w
        want = t.view(tiles, 16, kp // 2, 2).transpose(1, 2).reshape(tiles, -1)
        got = kernels.prepare_bf16(w)
        assert torch.equal(got.weight, want) and (got.in_features, got.out_features) == (k, n)


@needs_isa
@pytest.mark.parametrize("m", [1, 3, 16, 20])
@pytest.mark.parametrize("n,k", [*REAL_SHAPES, (131, 96), (17, 40), (45, 900), (8, 7)])
def test_linear_bf16_matches_float_reference(loaded, m, n, k):
    g = torch.Generator().manual_seed(n * 7 + k + m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16) if m % 2 else None
    p = kernels.prepare_bf16(w)
    assert torch.equal(kernels.unpack_bf16(p), w)  # packing is lossless
    rows = torch.tensor([n - 1, 0])
    assert torch.equal(kernels.unpack_bf16(p, rows), w[rows])
    y = kernels.linear_bf16(x, p, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    ref = bf16_reference(x, w, bias)
    # the only rounding is the bf16 output (and fp32 accumulation order): half a bf16 ulp plus a hair
    err = (y.double() - ref).abs()
    assert (err <= ref.abs() * 2.0**-8 + 1e-5 * ref.abs().max()).all(), err.max()
    # and the plain path agrees within its own bf16 rounding
    torch.testing.assert_close(y.float(), F.linear(x, w, bias).float(), rtol=1.6e-2, atol=1e-2)


@needs_isa
def test_linear_bf16_row_alone_equals_row_in_a_batch(loaded):
    """Batch invariance at the kernel: every pass form (1, 2, 4 and 8 rows, and the 3-row passes of the
    AVX2 build) sums a row in the same order. Inputs 0 and 897 are +-2^20 against weights of 1, so the
    fp32 sums carry 2^20 (an ulp of 1/8) from the first pair to the last and cancel it there: each sum's
    rounding then shows in the bf16 outputs, and so does any change in the order of the sums. K = 898
    leaves a last odd pair of inputs."""
    g = torch.Generator().manual_seed(3)
    k = 898
    x = torch.randn(20, k, generator=g)
    x[:, 0], x[:, 897] = 2.0**20, -(2.0**20)
    w = torch.randn(80, k, generator=g)
    w[:, 0] = w[:, 897] = 1.0
    p = kernels.prepare_bf16(w.to(torch.bfloat16))
    x = x.to(torch.bfloat16)
    alone = torch.cat([kernels.linear_bf16(x[i : i + 1], p) for i in range(20)])
    exact = (x.double() @ w.to(torch.bfloat16).double().T).to(torch.bfloat16)
    assert (alone != exact).float().mean() > 0.5  # the fp32 sums' rounding shows
    for m in (2, 3, 4, 5, 6, 7, 8, 9, 16, 20):
        assert torch.equal(kernels.linear_bf16(x[:m], p), alone[:m]), m


@needs_isa
def test_linear_bf16_lm_head_and_batch_dims(loaded):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(151936, 896, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(2, 1, 896, generator=g).to(torch.bfloat16)  # (B, T, K) keeps its leading dims
    y = kernels.linear_bf16(x, kernels.prepare_bf16(w))
    assert y.shape == (2, 1, 151936)
    ref = bf16_reference(x.reshape(2, 896), w, None)
    err = (y.reshape(2, -1).double() - ref).abs()
    assert (err <= ref.abs() * 2.0**-8 + 1e-5 * ref.abs().max()).all()


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded per row in blocks of 32 to int8 and back, as the kernels do (the 'x_hat')."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // 32, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    # a true division (torch computes `127.0 / t` as 127 * (1 / t), one rounding more than the kernel)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    return (q * (amax / 127.0)).reshape(m, k)


def make_int_weights(bits, n, k, group, mode, g):
    """codes (N, K) uint8, scale/shift (K/group, N) float32 and the float weights they stand for."""
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    groups = k // group
    scale = torch.rand(groups, n, generator=g) * 0.01 + 0.001
    zero = {"zero_point": 2 ** (bits - 1), "shift": 0, "both": 3}[mode]
    shift = None if mode == "zero_point" else torch.randn(groups, n, generator=g) * 0.01
    w = (codes.double() - zero) * scale.double().T.repeat_interleave(group, dim=1)
    if shift is not None:
        w += shift.double().T.repeat_interleave(group, dim=1)
    return codes, scale, shift, zero, w


# every group size on the small real shapes and the odd ones (the largest shape: its own test below)
INT_CASES = sorted(
    {
        (n, k, group)
        for (n, k) in [(896, 896), (256, 1536), *ODD_SHAPES]
        for group in (32, 64, 96, 128, k)
        if k % group == 0
    }
)
M_DTYPE_MODE = [(1, torch.bfloat16, "zero_point"), (3, torch.float32, "shift"), (16, torch.bfloat16, "both")]


@needs_isa
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,k,group", INT_CASES)
@pytest.mark.parametrize("m,act_dtype,mode", M_DTYPE_MODE)
def test_linear_int_matches_dequantized_reference(loaded, bits, n, k, group, m, act_dtype, mode):
    check_int_linear(bits, n, k, group, m, act_dtype, mode)


@needs_isa
@pytest.mark.parametrize("bits", [8, 4])
def test_linear_int_longest_k(loaded, bits):
    check_int_linear(bits, 1536, 8960, 128, 16, torch.bfloat16, "both")  # Qwen2.5-1.5B down_proj


@needs_isa
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [2, 5])
def test_linear_int_few_rows_long_k(loaded, bits, m):
    # one pass of rows whose activations are quantized in several runs of groups, across both threads
    check_int_linear(bits, 256, 8960, 32, m, torch.bfloat16, "shift")


@needs_isa
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "group,mode,scale_dtype",
    [(32, "shift", None), (32, "zero_point", torch.float16), (128, "both", None), (64, "zero_point", None)],
)
def test_linear_int_row_alone_equals_row_in_a_batch(loaded, bits, group, mode, scale_dtype):
    """Batch invariance at the kernel: passes of 1, 2, 4 and 8 rows (the tile forms of each), and on
    AVX2 / AVX-VNNI pairs of 8-row passes with one left over (24 rows) or none (40), give every row the
    same bits as that row alone."""
    g = torch.Generator().manual_seed(group + len(mode))
    codes, scale, shift, zero, _ = make_int_weights(4 if bits == 4 else 8, 80, 896, group, mode, g)
    prepare = kernels.prepare_int4 if bits == 4 else kernels.prepare_int8
    p = prepare(codes, scale, shift, group, zero_point=zero, scale_dtype=scale_dtype)
    linear = kernels.linear_int8 if bits == 8 else kernels.linear_int4
    x = torch.randn(40, 896, generator=g)  # float32 out: a bf16 output would hide most rounding changes
    alone = torch.cat([linear(x[i : i + 1], p) for i in range(40)])
    for m in (2, 3, 4, 5, 8, 16, 24, 40):
        assert torch.equal(linear(x[:m], p), alone[:m]), m


@needs_isa
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group,mode", [(32, "zero_point"), (128, "both")])
def test_decode_prefetch_changes_no_bits(loaded, bits, group, mode):
    """Passes of 1-4 rows with the next tile prefetched and without (on AVX2 int8 then takes both halves
    of a tile in one pass instead of one at a time) give the same bits, each the dequantized reference's
    within tolerance, whatever this CPU's default; the switch reports what it was set to."""
    g = torch.Generator().manual_seed(bits + group)
    codes, scale, shift, zero, _ = make_int_weights(bits, 80, 896, group, mode, g)  # 5 tiles: 4 with a next
    prepare = kernels.prepare_int4 if bits == 4 else kernels.prepare_int8
    p = prepare(codes, scale, shift, group, zero_point=zero)
    linear = kernels.linear_int8 if bits == 8 else kernels.linear_int4
    x = torch.randn(4, 896, generator=g)
    default = kernels.decode_prefetch()
    try:
        results = {}
        for on in (False, True):
            assert kernels.decode_prefetch(on) is on
            assert kernels.decode_prefetch() is on
            results[on] = [linear(x[:m], p) for m in (1, 2, 3, 4)]
            check_int_linear(bits, 96, 1536, group, 1, torch.bfloat16, mode)
            check_int_linear(bits, 96, 1536, group, 2, torch.float32, mode)
        for m, (off, on) in enumerate(zip(results[False], results[True], strict=True), start=1):
            assert torch.equal(off, on), m
    finally:
        kernels.decode_prefetch(default)
    assert kernels.decode_prefetch() is default


@needs_isa
@pytest.mark.parametrize("kind", ["int8", "int4", "bf16", "bf16 vector tiles"])
def test_rows_past_a_panel_equal_each_row_alone(loaded, kind):
    """Where x is over 1 MiB (here K = 16384: 32-row panels, for the integer tiles' codes and scales and
    for bf16) the threads take their tiles through x a panel of rows at a time; 72 rows (panels of 32, 32
    and 8) give each row the bits it has alone, on AMX and on the vector tiles alike."""
    g = torch.Generator().manual_seed(len(kind))
    k, x = 16384, torch.randn(72, 16384, generator=g)
    if kind.startswith("bf16"):
        p = kernels.prepare_bf16(torch.randn(48, k, generator=g).bfloat16())
        x = x.bfloat16()
        linear = kernels.linear_bf16
    else:
        bits = int(kind[3])
        codes, scale, shift, zero, _ = make_int_weights(bits, 48, k, 32, "both", g)
        p = (kernels.prepare_int4 if bits == 4 else kernels.prepare_int8)(
            codes, scale, shift, 32, zero_point=zero
        )
        linear = kernels.linear_int8 if bits == 8 else kernels.linear_int4
    amx = kernels.amx_in_use()
    kernels.use_amx(amx and kind != "bf16 vector tiles")
    try:
        alone = torch.cat([linear(x[i : i + 1], p) for i in range(72)])
        assert torch.equal(linear(x, p), alone)
        assert torch.equal(linear(x[5:45], p), alone[5:45])
    finally:
        kernels.use_amx(amx)


@needs_isa
@pytest.mark.parametrize("bits", [8, 4])
def test_linear_int_is_the_same_on_any_number_of_threads(loaded, bits):
    """Each thread's tiles read the calling thread's rounded activations (the buffers are per thread),
    and the threads claim chunks of tiles as they go: with more threads than this machine's cores some
    are descheduled mid-call and the others take their chunks, and every split gives the same bits."""
    g = torch.Generator().manual_seed(len(str(bits)))
    codes, scale, shift, zero, _ = make_int_weights(4 if bits == 4 else 8, 512, 4608, 128, "both", g)
    prepare = kernels.prepare_int4 if bits == 4 else kernels.prepare_int8
    p = prepare(codes, scale, shift, 128, zero_point=zero)
    linear = kernels.linear_int8 if bits == 8 else kernels.linear_int4
    threads = torch.get_num_threads()
    try:
        for m in (1, 3, 8, 16):
            x = torch.randn(m, 4608, generator=g).bfloat16()
            torch.set_num_threads(1)
            one = linear(x, p)
            for n in (2, 3, 4):
                torch.set_num_threads(n)
                assert torch.equal(linear(x, p), one), (m, n)
    finally:
        torch.set_num_threads(threads)


@needs_isa
@pytest.mark.parametrize("bits", [8, 4])
def test_linear_int_many_rows(loaded, bits):
    check_int_linear(bits, 131, 96, 32, 20, torch.float32, "both")  # passes of 8, 8 and 4 (padded)


@needs_isa
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [8, 12, 16])
def test_linear_int_rounds_zero_and_extreme_rows_in_whole_passes(loaded, bits, m):
    """Passes of 8 rows are rounded 8 at a time: an all-zero row, a row of one huge block and rows of
    tiny values keep their own scales, and the padding rows of a half pass add nothing."""
    g = torch.Generator().manual_seed(bits + m)
    n, k, group = 48, 256, 64
    codes, scale, shift, zero, w = make_int_weights(bits, n, k, group, "both", g)
    prepare = kernels.prepare_int8 if bits == 8 else kernels.prepare_int4
    p = prepare(codes, scale, shift, group, zero_point=zero)
    x = torch.randn(m, k, generator=g)
    x[1] = 0.0
    x[2, 32:64] *= 1e4  # one block far larger than the rest of its row
    x[3] *= 1e-6
    x = x.to(torch.bfloat16)
    y = (kernels.linear_int8 if bits == 8 else kernels.linear_int4)(x, p)
    exact = quantize_activations(x).double() @ w.T
    assert torch.equal(y[1], torch.zeros(n, dtype=torch.bfloat16))
    err = (y.double() - exact).abs()
    assert (err <= exact.abs() * 2.0**-8 + 2e-5 * exact.abs().amax(1, keepdim=True) + 1e-30).all(), err.max()


# (N, K, group) of output heads: the bundled model's (a GGUF Q8_0 head), odd N, groups of 256 and per channel
HEAD_SHAPES = [(49152, 576, 32), (131, 96, 32), (70, 256, 256), (80, 896, 896)]


@needs_isa
@pytest.mark.parametrize("n,k,group", HEAD_SHAPES)
@pytest.mark.parametrize("m,act_dtype,mode", [*M_DTYPE_MODE, (20, torch.float32, "zero_point")])
def test_linear_int8_output_head_shapes(loaded, n, k, group, m, act_dtype, mode):
    """Output heads (a GGUF's Q8_0 head, --quantize's per-channel int8 one) run on linear_int8 like the
    decoder layers: within the reference's bounds at the heads' shapes too."""
    check_int_linear(8, n, k, group, m, act_dtype, mode)


def check_int_linear(bits, n, k, group, m, act_dtype, mode):
    g = torch.Generator().manual_seed(bits * 1000 + n + k + group + m)
    codes, scale, shift, zero, w = make_int_weights(bits, n, k, group, mode, g)
    prepare = kernels.prepare_int8 if bits == 8 else kernels.prepare_int4
    p = prepare(codes, scale, shift, group, zero_point=zero)
    # packing is lossless: the codes and the float weights come back exactly
    assert torch.equal(kernels.unpack_codes(p), codes)
    assert torch.equal(kernels.dequantize(p, torch.float64), w)
    rows = torch.tensor([0, n - 1, n // 2])
    assert torch.equal(kernels.dequantize(p, rows=rows), kernels.dequantize(p)[rows])
    # the kernel's row gather (embedding lookups in a packed head) is the reference bit for bit
    assert torch.equal(kernels.dequantize_rows(p, rows), kernels.dequantize(p, rows=rows))
    assert kernels.dequantize_rows(p, rows[:0]).shape == (0, k)
    torch.testing.assert_close(kernels.dequantize(p), w.float(), rtol=1e-6, atol=1e-7)

    x = torch.randn(m, k, generator=g).to(act_dtype)
    bias = torch.randn(n, generator=g).to(act_dtype) if m != 3 else None
    linear = kernels.linear_int8 if bits == 8 else kernels.linear_int4
    y = linear(x, p, bias)
    assert y.dtype == act_dtype and y.shape == (m, n)
    b = 0 if bias is None else bias.double()
    # The kernel computes dot(w, x_hat) exactly in float: only float rounding separates them.
    exact = quantize_activations(x).double() @ w.T + b
    out_ulp = 2.0**-8 if act_dtype == torch.bfloat16 else 1e-6
    err = (y.double() - exact).abs()
    assert (err <= exact.abs() * out_ulp + 2e-5 * exact.abs().max() + 1e-6).all(), err.max()
    # Against the plain float path (dequantize, then matmul) the only difference is x's rounding,
    # bounded by sum |w| * (block scale / 2).
    plain = x.double() @ kernels.dequantize(p, torch.float64).T + b
    half_step = (x.float().reshape(m, k // 32, 32).abs().amax(-1) / 254).repeat_interleave(32, dim=1)
    bound = half_step.double() @ w.abs().T
    assert ((y.double() - plain).abs() <= bound * 1.01 + exact.abs() * out_ulp + 1e-5).all()


@needs_isa
def test_float16_scales_are_picked_only_when_exact(loaded):
    g = torch.Generator().manual_seed(1)
    codes, scale, shift, _, _ = make_int_weights(4, 64, 128, 32, "shift", g)
    assert kernels.prepare_int4(codes, scale, shift, 32).scale.dtype == torch.float32
    s16, h16 = scale.half().float(), shift.half().float()  # GGUF / GPTQ scales are float16 already
    p = kernels.prepare_int4(codes, s16, h16, 32)
    assert p.scale.dtype == torch.float16 and p.shift.dtype == torch.float16
    x = torch.randn(2, 128, generator=g)
    w = kernels.dequantize(p)
    exact = quantize_activations(x) @ w.T
    torch.testing.assert_close(kernels.linear_int4(x, p), exact, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([63, 0, 17, 17])
    assert torch.equal(kernels.dequantize_rows(p, rows), w[rows])  # float16 tables too


@needs_isa
def test_bad_inputs_are_named(loaded):
    x = torch.randn(1, 64)
    w = kernels.prepare_bf16(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="x and w must be bfloat16"):
        kernels.linear_bf16(x, w)
    with pytest.raises(kernels.KernelInputError, match="x has 32 inputs, the weights 64"):
        kernels.linear_bf16(x[:, :32].to(torch.bfloat16), w)
    with pytest.raises(RuntimeError, match=r"w must be contiguous \(1, 1024\) from prepare_bf16"):
        torch.ops.qwenkit.linear_bf16(x.to(torch.bfloat16), w.weight[:, :512], None, 8)
    codes = torch.zeros(8, 64, dtype=torch.uint8)
    with pytest.raises(kernels.KernelInputError, match="group_size must be a multiple of 32"):
        kernels.prepare_int8(codes, torch.ones(1, 8), None, 48)
    with pytest.raises(kernels.KernelInputError, match=r"scale must be \(K/group_size, N\)"):
        kernels.prepare_int8(codes, torch.ones(8, 2), None, 32)
    with pytest.raises(kernels.KernelInputError, match="4-bit codes must lie in 0..15"):
        kernels.prepare_int4(codes + 16, torch.ones(2, 8), None, 32)
    p = kernels.prepare_int4(codes, torch.ones(2, 8), None, 32)
    with pytest.raises(kernels.KernelInputError, match="packed for 4 bits"):
        kernels.linear_int8(x, p)
    with pytest.raises(kernels.KernelInputError, match="x has 32 inputs, the weights 64"):
        kernels.linear_int4(torch.randn(1, 32), p)
    with pytest.raises(RuntimeError, match="scale must be contiguous float32/float16"):
        torch.ops.qwenkit.linear_int4(x, p.codes, p.scale[:, :1], None, None, 32, 8, 0)
    with pytest.raises(RuntimeError, match="bias must be a CPU vector of 8 values"):
        kernels.linear_int4(x, p, torch.ones(9))
    with pytest.raises(RuntimeError, match=r"row 8 outside 0..7"):
        kernels.dequantize_rows(p, torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="row -1 outside"):
        kernels.dequantize_rows(p, torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="ids must be 1-D int64"):
        kernels.dequantize_rows(p, torch.tensor([0.0]))
    with pytest.raises(RuntimeError, match="dequantize_rows: scale must be contiguous float32/float16"):
        torch.ops.qwenkit.dequantize_rows(p.codes, p.scale[:, :1], None, torch.tensor([0]), 4, 32, 64, 8, 0)


IQ4_CASES = [(896, 896, 32), (4864, 896, 32), (131, 96, 32), (33, 288, 96), (256, 1536, 1536)]


@needs_isa
@pytest.mark.parametrize("n,k,group", IQ4_CASES)
@pytest.mark.parametrize(
    "m,act_dtype", [(1, torch.bfloat16), (2, torch.float32), (3, torch.float32), (16, torch.bfloat16)]
)
def test_linear_int4_iq4_table_codes(loaded, n, k, group, m, act_dtype):
    """4-bit codes on zero point 128 index IQ4's value table: dequantize gives table value x scale, the
    kernel's row gather agrees, and the int4 tile (every build; AVX2 looks the table up into int8 codes)
    gives exactly what the int8 tile gives on the table's bytes as 8-bit codes."""
    g = torch.Generator().manual_seed(n + k + m)
    index = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.randn(k // group, n, generator=g) * 0.01  # IQ4_XS sub-block scales may be negative
    p = kernels.prepare_int4(index, scale, None, group, zero_point=kernels.IQ4_ZERO_POINT)
    table = torch.tensor(kernels.IQ4_VALUES, dtype=torch.float64)
    w = table[index.long()] * scale.double().T.repeat_interleave(group, dim=1)
    assert torch.equal(kernels.unpack_codes(p), index)
    assert torch.equal(kernels.dequantize(p, torch.float64), w)
    assert torch.equal(kernels.iq4_codes(index).double() - 128, table[index.long()])
    rows = torch.tensor([0, n - 1, n // 2])
    assert torch.equal(kernels.dequantize_rows(p, rows), kernels.dequantize(p, rows=rows))
    x = torch.randn(m, k, generator=g).to(act_dtype)
    assert kernels.runs_iq4_table()
    y = kernels.linear_int4(x, p)
    as_int8 = kernels.prepare_int8(kernels.iq4_codes(index), scale, None, group, zero_point=128)
    assert torch.equal(y, kernels.linear_int8(x, as_int8))
    exact = quantize_activations(x).double() @ w.T
    out_ulp = 2.0**-8 if act_dtype == torch.bfloat16 else 1e-6
    err = (y.double() - exact).abs()
    assert (err <= exact.abs() * out_ulp + 2e-5 * exact.abs().max() + 1e-6).all(), err.max()


INT5_CASES = [
    (896, 896, 32, False),
    (4864, 896, 32, True),
    (131, 96, 32, True),
    (33, 288, 96, False),
    (256, 1536, 1536, True),
]


@needs_isa
@pytest.mark.parametrize("n,k,group,with_shift", INT5_CASES)
@pytest.mark.parametrize("m,act_dtype", [(1, torch.bfloat16), (3, torch.float32), (16, torch.bfloat16)])
def test_linear_int5_codes(loaded, n, k, group, with_shift, m, act_dtype):
    """5-bit codes (GGUF Q5_0 on zero point 16, Q5_1/Q5_K with a shift): every code's fifth bit and
    nibble come back from the packing, dequantize and the row gather give (code - z) x scale + shift,
    and the 5-bit tile (every build) gives exactly what the int8 tile gives on the same codes as 8-bit
    codes, within float rounding of the exact dot."""
    g = torch.Generator().manual_seed(n + k + m + with_shift)
    codes = torch.randint(0, 32, (n, k), generator=g, dtype=torch.uint8)
    codes[0, :32] = torch.arange(32, dtype=torch.uint8)  # every value, at every position of a block
    codes[-1, :32] = torch.arange(31, -1, -1, dtype=torch.uint8)
    scale = torch.rand(k // group, n, generator=g) * 0.01
    shift = -torch.rand(k // group, n, generator=g) * 0.2 if with_shift else None
    zero_point = 0 if with_shift else 16
    p = kernels.prepare_int5(codes, scale, shift, group, zero_point=zero_point)
    assert p.codes.shape == (-(-n // 16), k * 10)
    w = (codes.double() - zero_point) * scale.double().T.repeat_interleave(group, dim=1)
    if shift is not None:
        w += shift.double().T.repeat_interleave(group, dim=1)
    assert torch.equal(kernels.unpack_codes(p), codes)
    assert torch.equal(kernels.dequantize(p, torch.float64), w)
    rows = torch.tensor([0, n - 1, n // 2])
    assert torch.equal(kernels.dequantize_rows(p, rows), kernels.dequantize(p, rows=rows))
    x = torch.randn(m, k, generator=g).to(act_dtype)
    assert kernels.runs_int5()
    y = kernels.linear_int5(x, p)
    as_int8 = kernels.prepare_int8(codes, scale, shift, group, zero_point=zero_point)
    assert torch.equal(y, kernels.linear_int8(x, as_int8))
    exact = quantize_activations(x).double() @ w.T
    out_ulp = 2.0**-8 if act_dtype == torch.bfloat16 else 1e-6
    err = (y.double() - exact).abs()
    assert (err <= exact.abs() * out_ulp + 2e-5 * exact.abs().max() + 1e-6).all(), err.max()


Q6_K_CASES = [(896, 4864), (256, 1536), (131, 256), (33, 768)]


@needs_isa
@pytest.mark.parametrize("n,k", Q6_K_CASES)
@pytest.mark.parametrize("m,act_dtype", [(1, torch.bfloat16), (3, torch.float32), (16, torch.bfloat16)])
def test_linear_q6_k(loaded, n, k, m, act_dtype):
    """GGUF Q6_K as the file holds it: codes 0..63 on zero point 32, an int8 scale per 16 inputs (the
    extremes -128 and 127 among them) and d per 256. The packing gives back codes and scales, dequantize
    and the row gather give d x sub x (q - 32) exactly, and the product (every build) is within float
    rounding of the exact dot with the rounded activations."""
    g = torch.Generator().manual_seed(n + k + m)
    codes = torch.randint(0, 64, (n, k), generator=g, dtype=torch.uint8)
    codes[0, :64] = torch.arange(64, dtype=torch.uint8)  # every code, at every position of two blocks
    sub = torch.randint(-128, 128, (k // 16, n), generator=g).to(torch.int8)
    sub[0, 0], sub[1, 0] = -128, 127
    d = (torch.rand(k // 256, n, generator=g) * 1e-3).half().float()
    d[0, -1] = 0.0  # a zero super-block
    p = kernels.prepare_q6_k(codes, sub, d)
    assert p.codes.shape == (-(-n // 16), k // 32 * 416) and (p.group_size, p.zero_point) == (256, 32)
    assert torch.equal(kernels.unpack_codes(p), codes)
    assert torch.equal(kernels.q6_k_sub_scales(p), sub.T)
    w = (
        (codes.double() - 32)
        * sub.double().T.repeat_interleave(16, dim=1)
        * d.double().T.repeat_interleave(256, 1)
    )
    assert torch.equal(kernels.dequantize(p, torch.float64), w)
    rows = torch.tensor([0, n - 1, n // 2])
    assert torch.equal(kernels.dequantize_rows(p, rows), kernels.dequantize(p, rows=rows))
    assert torch.equal(kernels.dequantize(p, rows=rows), w[rows].float())
    x = torch.randn(m, k, generator=g).to(act_dtype)
    assert kernels.runs_q6_k()
    y = kernels.linear_q6_k(x, p)
    assert y.dtype == act_dtype and y.shape == (m, n)
    exact = quantize_activations(x).double() @ w.T
    out_ulp = 2.0**-8 if act_dtype == torch.bfloat16 else 1e-6
    err = (y.double() - exact).abs()
    assert (err <= exact.abs() * out_ulp + 2e-5 * exact.abs().max() + 1e-6).all(), err.max()
    # each row alone as in the batch (every pass form sums a row the same way)
    assert torch.equal(kernels.linear_q6_k(x[-1:], p), y[-1:])


@needs_isa
@pytest.mark.parametrize("m", [1, 2, 4, 16])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("scale", [127, -128])
def test_q6_k_sums_at_their_largest_stay_exact(loaded, m, sign, scale):
    """Every code 63 against every activation at +-127, every sub-block scale at an extreme: AVX2 sums
    two quads' pairs in int16 (2 x 2 x 63 x 127 < 32767) before scaling them in int32; a wrapped sum
    would be off by 65536 x the scale. The product is the exact dot, 31 x scale x d a weight."""
    n, k = 32, 512
    codes = torch.full((n, k), 63, dtype=torch.uint8)
    sub = torch.full((k // 16, n), scale, dtype=torch.int8)
    d = torch.full((k // 256, n), 2.0**-10)
    p = kernels.prepare_q6_k(codes, sub, d)
    y = kernels.linear_q6_k(torch.full((m, k), sign), p)
    exact = sign * 31 * scale * 2.0**-10 * k
    assert torch.allclose(y.double(), torch.full((m, n), exact, dtype=torch.float64), rtol=1e-6), y[0, :4]


def test_q6_k_packing_refuses_what_it_cannot_hold():
    codes = torch.zeros(8, 256, dtype=torch.uint8)
    sub, d = torch.zeros(16, 8, dtype=torch.int8), torch.ones(1, 8)
    kernels.prepare_q6_k(codes, sub, d)  # accepted
    with pytest.raises(kernels.KernelInputError, match="codes must lie in 0..63, got 64"):
        kernels.prepare_q6_k(codes + 64, sub, d)
    with pytest.raises(kernels.KernelInputError, match="K a multiple of 256"):
        kernels.prepare_q6_k(codes[:, :128], sub[:8], d)
    with pytest.raises(kernels.KernelInputError, match=r"sub must be \(K/16, N\) = \(16, 8\) int8"):
        kernels.prepare_q6_k(codes, sub.to(torch.int16), d)
    with pytest.raises(kernels.KernelInputError, match="float16 values"):
        kernels.prepare_q6_k(codes, sub, d + 1e-5)


@needs_isa
@pytest.mark.parametrize("m", [1, 2, 4, 16])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_int5_sums_at_their_largest_stay_exact(loaded, m, sign):
    """Every code 31 against every activation at +-127: AVX2's int16 pair sums of a whole block would
    wrap (16 x 31 x 127 > 32767), so the 5-bit tiles widen every two steps; the result is the exact
    dot, 31 x 127 x K times the scales, in every path (1-2 rows, quads, pairs of passes)."""
    n, k = 32, 256
    codes = torch.full((n, k), 31, dtype=torch.uint8)
    scale = torch.full((k // 32, n), 0.5)
    p = kernels.prepare_int5(codes, scale, None, 32, zero_point=0)
    x = torch.full((m, k), sign)
    y = kernels.linear_int5(x, p)
    # x rounds to +-127 with block scale 1/127: each input adds +-31 x 0.5
    assert torch.equal(y, torch.full((m, n), sign * 31 * 0.5 * k))
    as_int8 = kernels.prepare_int8(codes, scale, None, 32, zero_point=0)
    assert torch.equal(y, kernels.linear_int8(x, as_int8))


def test_int5_codes_must_fit_5_bits():
    codes = torch.full((8, 64), 32, dtype=torch.uint8)
    with pytest.raises(kernels.KernelInputError, match="5-bit codes must lie in 0..31, got 32"):
        kernels.prepare_int5(codes, torch.ones(2, 8), None, 32, zero_point=16)
    with pytest.raises(kernels.KernelInputError, match="zero_point must lie in 0..31, got 32"):
        kernels.prepare_int5(codes - 1, torch.ones(2, 8), None, 32, zero_point=32)
    with pytest.raises(kernels.KernelInputError, match="multiple of 32 dividing K=48"):
        kernels.prepare_int5(torch.zeros(8, 48, dtype=torch.uint8), torch.ones(1, 8), None, 48)


def test_iq4_zero_point_is_only_for_4_bits():
    codes = torch.zeros(8, 64, dtype=torch.uint8)
    kernels.prepare_int4(codes, torch.ones(2, 8), None, 32, zero_point=kernels.IQ4_ZERO_POINT)  # accepted
    with pytest.raises(kernels.KernelInputError, match=r"0..15 \(or be 128: IQ4 table codes\), got 127"):
        kernels.prepare_int4(codes, torch.ones(2, 8), None, 32, zero_point=127)
    with pytest.raises(kernels.KernelInputError, match="zero_point must lie in 0..255, got 256"):
        kernels.prepare_int8(codes, torch.ones(2, 8), None, 32, zero_point=256)
