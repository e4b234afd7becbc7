"""The C++ CPU kernels against plain PyTorch float references, their build cache and their fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.kernels import build, ops

SRC = Path(__file__).resolve().parents[2] / "src"
needs_isa = pytest.mark.skipif(build.missing_isa() is not None, reason=f"{build.missing_isa()}")
LEVEL = build.isa_level()  # the instruction-set level this CPU builds ("avx512" or "avx2")

# (N, K): the Qwen2.5-0.5B / 1.5B decode shapes (lm_head covered once, below) and odd ones.
REAL_SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864), (1536, 1536), (256, 1536), (8960, 1536)]
ODD_SHAPES = [(131, 96), (1000, 160), (17, 32), (33, 288)]  # N not a multiple of 16, K = 32 * odd


@pytest.fixture(scope="module")
def loaded():
    if not kernels.available():
        pytest.fail("kernels did not load on a CPU that has the ISA (see stderr)")


def bf16_reference(x, w, bias):
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


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
@pytest.mark.parametrize("bits", [8, 4, "8-wide"])
@pytest.mark.parametrize(
    "group,mode,scale_dtype",
    [(32, "shift", None), (32, "zero_point", torch.float16), (128, "both", None), (64, "zero_point", None)],
)
def test_linear_int_row_alone_equals_row_in_a_batch(loaded, bits, group, mode, scale_dtype):
    """Batch invariance at the kernel: passes of 1, 2, 4 and 8 rows (the tile forms of each) give every
    row the same bits as that row alone."""
    g = torch.Generator().manual_seed(group + len(mode))
    codes, scale, shift, zero, _ = make_int_weights(4 if bits == 4 else 8, 80, 896, group, mode, g)
    prepare = kernels.prepare_int4 if bits == 4 else kernels.prepare_int8
    p = prepare(codes, scale, shift, group, zero_point=zero, scale_dtype=scale_dtype)
    linear = {8: kernels.linear_int8, 4: kernels.linear_int4, "8-wide": kernels.linear_int8_float}[bits]
    x = torch.randn(16, 896, generator=g)  # float32 out: a bf16 output would hide most rounding changes
    alone = torch.cat([linear(x[i : i + 1], p) for i in range(16)])
    for m in (2, 3, 4, 5, 8, 16):
        assert torch.equal(linear(x[:m], p), alone[:m]), m


@needs_isa
@pytest.mark.parametrize("bits", [8, 4, "8-wide"])
def test_linear_int_is_the_same_on_one_or_two_threads(loaded, bits):
    """Each thread's tiles read the calling thread's rounded activations (the buffers are per thread)."""
    g = torch.Generator().manual_seed(len(str(bits)))
    codes, scale, shift, zero, _ = make_int_weights(4 if bits == 4 else 8, 512, 4608, 128, "both", g)
    prepare = kernels.prepare_int4 if bits == 4 else kernels.prepare_int8
    p = prepare(codes, scale, shift, 128, zero_point=zero)
    linear = {8: kernels.linear_int8, 4: kernels.linear_int4, "8-wide": kernels.linear_int8_float}[bits]
    threads = torch.get_num_threads()
    try:
        for m in (1, 3, 8, 16):
            x = torch.randn(m, 4608, generator=g).bfloat16()
            torch.set_num_threads(1)
            one = linear(x, p)
            torch.set_num_threads(2)
            assert torch.equal(linear(x, p), one), m
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


def wide_block(group: int) -> int:
    """Inputs per 16-bit activation block: the largest multiple of 32 up to 256 dividing the group."""
    return next(b for b in range(256, 31, -32) if group % b == 0)


def quantize_activations_16(x: torch.Tensor, group: int) -> torch.Tensor:
    """x rounded as linear_int8_float rounds it: per row and block, by the power of two 2^(e - 15) where
    the block's largest |x| < 2^e, to int16 (round half to even), and back; float64."""
    m, k = x.shape
    b = wide_block(group)
    blocks = x.double().reshape(m, k // b, b)
    amax = blocks.abs().amax(-1, keepdim=True)
    step = torch.where(amax > 0, torch.exp2(torch.frexp(amax).exponent.double() - 15), torch.ones_like(amax))
    q = torch.round(blocks.float().double() / step).clamp(-32768, 32767)
    return (q * step * (amax > 0)).reshape(m, k)


# (N, K, group): the bundled model's head, odd N, a group of 256, and groups split into blocks (896: 224s)
HEAD_SHAPES = [
    (896, 896, 32),
    (131, 96, 32),
    (49152, 576, 32),
    (70, 256, 256),
    (80, 896, 896),
    (40, 1024, 512),
]


@needs_isa
@pytest.mark.parametrize("n,k,group", HEAD_SHAPES)
@pytest.mark.parametrize("m,act_dtype,mode", [*M_DTYPE_MODE, (20, torch.float32, "zero_point")])
def test_linear_int8_float_matches_dequantized_reference(loaded, n, k, group, m, act_dtype, mode):
    """int8 weights against activations rounded to 16 bits (output heads): the kernel's sums are its
    rounded x against the weights up to float rounding, and within 2^-15 of each block's largest |x| of
    the unrounded product, far inside the int8-activation kernel's error."""
    g = torch.Generator().manual_seed(n + k + group + m)
    codes, scale, shift, zero, w = make_int_weights(8, n, k, group, mode, g)
    p = kernels.prepare_int8(codes, scale, shift, group, zero_point=zero)
    x = (torch.randn(m, k, generator=g) * 3).to(act_dtype)
    x[0, :32] *= 1e-3  # a block of small values: its own step, not the row's
    bias = torch.randn(n, generator=g).to(act_dtype) if m != 3 else None
    y = kernels.linear_int8_float(x, p, bias)
    assert y.dtype == act_dtype and y.shape == (m, n)
    b = 0 if bias is None else bias.double()
    x16 = quantize_activations_16(x, group)
    block = wide_block(group)
    block_max = x.double().reshape(m, -1, block).abs().amax(-1).repeat_interleave(block, 1)
    if act_dtype == torch.bfloat16:  # 8 significant bits: values of at least 1/128 of the block max are kept
        kept = x.double().abs() >= block_max / 128
        assert torch.equal(x16[kept], x.double()[kept])
    exact = x16 @ w.T + b
    out_ulp = 2.0**-8 if act_dtype == torch.bfloat16 else 1e-6
    err = (y.double() - exact).abs()
    # fp32 sums of K exact products (and the zero point's sum of x): a few ulps of the sum of |terms|
    terms = x16.abs() @ (w.abs() + zero * scale.double().T.repeat_interleave(group, dim=1)).T
    assert (err <= exact.abs() * out_ulp + 1e-6 * terms + 1e-6).all(), float(err.max())
    # against the unrounded x: x's rounding, at most half a step per input
    plain = x.double() @ w.T + b
    assert ((x.double() - x16).abs() <= block_max * 2.0**-15).all()
    bound = (block_max * 2.0**-15) @ w.abs().T
    assert ((y.double() - plain).abs() <= bound + exact.abs() * out_ulp + 1e-6 * terms + 1e-6).all()
    with pytest.raises(kernels.KernelInputError, match="packed for 4 bits"):
        kernels.linear_int8_float(x, kernels.prepare_int4(codes >> 4, scale, shift, group))


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


# --- build cache and fallback --------------------------------------------------------------------


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != ops.ENV_SWITCH}
    full_env.update(PYTHONPATH=str(SRC), **env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )


@needs_isa
def test_second_process_reuses_the_cached_library(loaded):
    r = run_python("from qwenkit import kernels; print(kernels.available())")
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
    assert "building" not in r.stderr and r.stderr.strip() == "", r.stderr


@needs_isa
def test_prebuild_command_reports_the_library(loaded, capsys):
    assert build.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"qwenkit kernels: {LEVEL} ready at ")
    assert out[0].endswith(build.LIBRARY_NAME) and Path(out[0].split(" at ", 1)[1]).is_file()


@pytest.fixture
def fake_cache(tmp_path, monkeypatch, loaded):
    """A private cache whose 'compiler' copies the library this session built, counting the builds."""
    real = build.ensure_built(LEVEL)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = []

    def copy_compile(cxx, level, out):
        builds.append(out)
        shutil.copyfile(real, out)

    monkeypatch.setattr(build, "_compile", copy_compile)
    return builds


@needs_isa
def test_cache_entry_is_built_once_then_reused(fake_cache, tmp_path):
    first = build.ensure_built(LEVEL, announce=False)
    assert first.is_relative_to(tmp_path / "qwenkit" / "kernels") and len(fake_cache) == 1
    assert build.ensure_built(LEVEL, announce=False) == first and len(fake_cache) == 1
    assert [p.name for p in first.parent.parent.iterdir()] == [first.parent.name]  # no temp dirs left


@needs_isa
def test_damaged_cache_entry_is_rebuilt(fake_cache):
    lib = build.ensure_built(LEVEL, announce=False)
    good = lib.read_bytes()
    lib.write_bytes(good[: len(good) // 2])  # a truncated file, as after a crash or a full disk
    again = build.ensure_built(LEVEL, announce=False)
    assert len(fake_cache) == 2 and again.read_bytes() == good


@needs_isa
def test_failed_build_is_refused_cleanly(fake_cache, monkeypatch, tmp_path):
    def broken(cxx, level, out):
        out.write_bytes(b"half")
        raise build.KernelBuildError("g++ failed: error: something")

    monkeypatch.setattr(build, "_compile", broken)
    with pytest.raises(build.KernelBuildError, match="g\\+\\+ failed"):
        build.ensure_built(LEVEL, announce=False)
    assert list((tmp_path / "qwenkit" / "kernels").iterdir()) == []  # nothing half-written stays


def test_no_compiler_falls_back_with_one_line(tmp_path):
    code = "from qwenkit import kernels; print(kernels.available()); print(kernels.available())"
    r = run_python(code, XDG_CACHE_HOME=str(tmp_path), CXX="false", PATH="/nonexistent")
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "plain PyTorch path" in lines[0], r.stderr
    if build.missing_isa() is None:
        assert "no C++ compiler found" in lines[0]
    r = run_python(
        "from qwenkit.kernels.build import main; main()", XDG_CACHE_HOME=str(tmp_path), PATH="/nonexistent"
    )
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1 and "not built" in r.stdout


def test_unwritable_cache_falls_back_with_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    r = run_python("from qwenkit import kernels; print(kernels.available())", XDG_CACHE_HOME=str(not_a_dir))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "plain PyTorch path" in lines[0], r.stderr
    if build.missing_isa() is None:
        assert "cannot write the kernel cache" in lines[0]


def test_missing_isa_falls_back_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(ops, "_loaded", None)
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"sse4_2", "avx", "fma"})  # AVX without AVX2
    monkeypatch.delenv(ops.ENV_SWITCH, raising=False)
    assert kernels.available() is False and kernels.available() is False
    err = capsys.readouterr().err.strip().splitlines()
    lacks = "this CPU lacks avx2, f16c"
    assert err == [f"qwenkit: CPU kernels unavailable: {lacks}; using the plain PyTorch path"]


AVX512_FLAGS = set(build.ISA_LEVELS["avx512"])


@pytest.mark.parametrize(
    "flags,cap,level",
    [
        (AVX512_FLAGS | {"avx2"}, None, "avx512"),
        (AVX512_FLAGS | {"avx2"}, "avx2", "avx2"),  # QWENKIT_KERNELS=avx2 on an AVX-512 CPU
        ({"avx2", "fma", "f16c", "avx512f"}, None, "avx2"),  # AVX-512 without BF16/VNNI
        ({"avx2", "fma"}, None, None),
    ],
)
def test_the_best_level_the_cpu_has_is_built(monkeypatch, flags, cap, level):
    monkeypatch.setattr(build, "_cpu_flags", lambda: flags)
    assert build.isa_level(cap) == level
    assert (build.missing_isa(cap) is None) == (level is not None)
    if level:  # the flags a level compiles with are exactly the ones checked
        assert set(build.compile_flags(level)) >= set(build.ISA_LEVELS[level].values())
        assert level == "avx512" or not any("avx512" in f for f in build.compile_flags(level))
    else:
        assert build.missing_isa(cap) == "this CPU lacks f16c"


def test_a_cpu_other_than_x86_64_linux_is_named(monkeypatch):
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    assert build.isa_level() is None
    assert build.missing_isa().startswith("the CPU kernels need Linux on x86-64 (this is Linux aarch64")


@needs_isa
def test_avx2_switch_loads_the_avx2_build(loaded, tmp_path):
    """QWENKIT_KERNELS=avx2 takes the AVX2 build even on an AVX-512 CPU, and it computes the product."""
    out = tmp_path / "y.pt"
    code = (
        "import torch\nfrom qwenkit import kernels\n"
        "w = torch.randn(40, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)\n"
        "x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)\n"
        "print(kernels.available(), kernels.ops.isa_level())\n"
        f"torch.save(kernels.linear_bf16(x, kernels.prepare_bf16(w)), {str(out)!r})\n"
    )
    r = run_python(code, QWENKIT_KERNELS="avx2")
    assert r.returncode == 0 and r.stdout.split() == ["True", "avx2"], r.stderr
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    want = bf16_reference(x, w, None)
    assert (torch.load(out).double() - want).abs().max() <= 0.01 * want.abs().max()


def test_torch_switch_turns_the_kernels_off(monkeypatch, capsys):
    monkeypatch.setenv(ops.ENV_SWITCH, "torch")
    assert kernels.available() is False
    assert capsys.readouterr().err == ""
    r = run_python("from qwenkit import kernels; print(kernels.available())", QWENKIT_KERNELS="torch")
    assert r.stdout.strip() == "False" and r.stderr == ""


@needs_isa
def test_a_misspelt_switch_is_named_once_not_ignored(loaded):
    """QWENKIT_KERNELS=toch is no choice: one line names it and the setting used (the kernels)."""
    code = "from qwenkit import kernels; print(kernels.available(), kernels.available())"
    r = run_python(code, QWENKIT_KERNELS="toch")
    assert r.returncode == 0 and r.stdout.strip() == "True True", r.stderr
    named = "qwenkit: QWENKIT_KERNELS='toch' is not one of auto, avx2, torch; using 'auto'"
    assert r.stderr.strip().splitlines() == [named]
    r = run_python(code, QWENKIT_KERNELS=" Torch ")  # case and spaces do not matter
    assert r.stdout.strip() == "False False" and r.stderr == ""


# --- a library stored in the venv (container images: built in the build stage, no compiler at run time) --

VENV_CHECK = """
import sys
sys.prefix = {prefix!r}
import torch
from qwenkit import kernels
ok = kernels.available()
print(ok)
if ok:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = kernels.linear_bf16(x, kernels.prepare_bf16(w)).float()
    want = x.float() @ w.float().T
    print(float((got - want).abs().max() / want.abs().max()))
"""


@pytest.fixture
def venv_copy(tmp_path, monkeypatch, capsys, loaded):
    """``--into-venv`` run for a stand-in venv prefix (the libraries come from the session's cache; the
    level this CPU does not load is compiled once into it, as an image's build stage compiles both)."""
    prefix = tmp_path / "venv"
    monkeypatch.setattr(build.sys, "prefix", str(prefix))
    assert build.main(["--into-venv"]) == 0
    stored = prefix / "share" / "qwenkit" / "kernels"
    assert capsys.readouterr().out.strip().splitlines() == [
        f"qwenkit kernels: {level} stored in the venv at {stored / level / build.LIBRARY_NAME}"
        for level in build.ISA_LEVELS
    ]
    return prefix


def run_without_compiler(prefix: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    empty_cache = tmp_path / "cache"
    return run_python(
        VENV_CHECK.format(prefix=str(prefix)),
        XDG_CACHE_HOME=str(empty_cache),
        CXX="false",
        PATH="/nonexistent",
    )


@needs_isa
def test_library_stored_in_the_venv_loads_without_a_compiler(venv_copy, tmp_path):
    stored = venv_copy / "share" / "qwenkit" / "kernels"
    assert sorted(p.name for p in stored.iterdir()) == sorted(build.ISA_LEVELS)
    for level in build.ISA_LEVELS:
        assert sorted(p.name for p in (stored / level).iterdir()) == sorted(
            [build.LIBRARY_NAME, build.LIBRARY_NAME + ".sha256", "key"]
        )  # no temporary files left
        assert build.venv_library(level) == stored / level / build.LIBRARY_NAME
    r = run_without_compiler(venv_copy, tmp_path)
    lines = r.stdout.split()
    assert r.returncode == 0 and lines[0] == "True" and r.stderr == "", r.stderr
    assert float(lines[1]) < 0.01  # the op computes (within bf16 output rounding)
    assert not (tmp_path / "cache").exists()  # nothing was built or cached


@needs_isa
@pytest.mark.parametrize("damage", ["truncated", "other source"])
def test_damaged_or_stale_venv_library_is_not_loaded(venv_copy, tmp_path, damage):
    stored = venv_copy / "share" / "qwenkit" / "kernels" / LEVEL
    if damage == "truncated":
        lib = stored / build.LIBRARY_NAME
        lib.write_bytes(lib.read_bytes()[:4096])
    else:  # built from another qwenkit source or for another torch
        (stored / "key").write_text("0" * 24 + "\n")
    assert build.venv_library(LEVEL) is None
    r = run_without_compiler(venv_copy, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "False"
    (line,) = r.stderr.strip().splitlines()
    assert "no C++ compiler found" in line and "plain PyTorch path" in line


def test_build_command_refuses_unknown_arguments(capsys):
    assert build.main(["--into"]) == 2
    assert "usage: python -m qwenkit.kernels.build [--into-venv]" in capsys.readouterr().out


def test_every_file_a_build_reads_ships_in_the_package():
    """A non-editable install (the images) must carry every source a build reads: the package data
    globs of qwenkit.kernels cover build.SOURCES."""
    import fnmatch

    import tomllib

    data = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["qwenkit.kernels"]
    package = SRC / "qwenkit" / "kernels"
    for source in build.SOURCES:
        rel = source.relative_to(package).as_posix()
        assert source.is_file() and any(fnmatch.fnmatch(rel, g) for g in globs), (rel, globs)
