"""bf16 products on AMX (tdpbf16ps) against the AVX-512 tiles (vdpbf16ps) they replace.

Both read the same packed weights; the vector tiles add each output's products in two chains (even and
odd input pairs), AMX in one of 32-input steps, and its adder rounds its own way, so a few outputs in ten
thousand differ in their last bit. So every row of a layer
takes one path whatever the row count, and a row's result must not depend on the rows beside it.
Where the CPU has no AMX the comparison cannot run; the first test checks that use_amx says so. AMX is
on by default where it can be; every test leaves it as it found it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenkit import kernels


def cpu_has_amx_bf16() -> bool:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return {"amx_bf16", "amx_tile", "avx512_bf16"} <= set(flags.split(":", 1)[1].split())


@pytest.fixture
def as_found(loaded):
    """Whatever a test does with use_amx, the setting afterwards is what it was before."""
    before = kernels.amx_in_use()
    yield
    kernels.use_amx(before)


@pytest.fixture
def amx(as_found):
    """AMX on for the test (skipped without it)."""
    if not kernels.use_amx(True):
        pytest.skip(
            f"AMX not in use: the {kernels.isa_level()} build loaded (only avx512 has AMX), the CPU has no "
            "AMX-BF16, or Linux refused its tile state"
        )


def test_use_amx_reports_the_cpu(as_found) -> None:
    avx512 = kernels.isa_level() == "avx512"
    assert kernels.use_amx(True) == (avx512 and cpu_has_amx_bf16())
    assert kernels.use_amx(True) == kernels.amx_in_use()
    assert kernels.use_amx(False) is False and kernels.amx_in_use() is False


def test_amx_is_on_unless_turned_off(loaded) -> None:
    code = "from qwenkit import kernels; kernels.available(); print(kernels.amx_in_use())"
    env = {k: v for k, v in os.environ.items() if k != "QWENKIT_AMX"}
    has = kernels.isa_level() == "avx512" and cpu_has_amx_bf16()
    for value, expected in ((None, str(has)), ("off", "False"), ("on", str(has))):
        run_env = env if value is None else env | {"QWENKIT_AMX": value}
        cmd = [sys.executable, "-c", code]
        out = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.split()[-1] == expected, (value, out.stdout, out.stderr)


def both_paths(x, p, bias=None):
    kernels.use_amx(True)
    on = kernels.linear_bf16(x, p, bias)
    kernels.use_amx(False)
    off = kernels.linear_bf16(x, p, bias)
    return on, off


@pytest.mark.parametrize("m", [1, 2, 5, 15, 16, 17, 31, 32, 33, 48, 100])
@pytest.mark.parametrize(("n", "k"), [(40, 64), (48, 128), (1152, 896), (136, 4864)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_amx_equals_the_vector_tiles_but_for_rare_last_bits(amx, m, n, k, with_bias) -> None:
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16() if with_bias else None
    on, off = both_paths(x, kernels.prepare_bf16(w), bias)
    ref = x.float() @ w.float().T + (0 if bias is None else bias.float())
    assert (on.float() - ref).abs().max() <= 0.01 * ref.abs().max()
    # Where they differ: by the last bit of the bf16 result, plus what fp32 rounding of the sums can move
    # (2^-20 of the sum of |terms|; near-cancelling sums have small results and so small last bits).
    terms = x.float().abs() @ w.float().abs().T + (0 if bias is None else bias.float().abs())
    last_bit = 2.0 ** (torch.floor(torch.log2(off.float().abs().clamp(min=2.0**-126))) - 7)
    diff = (on.float() - off.float()).abs()
    assert (diff <= last_bit + 2.0**-20 * terms).all()
    assert (diff > 0).float().mean() < 2e-3, f"{int((diff > 0).sum())} of {diff.numel()} differ"


@pytest.mark.parametrize(("m", "k"), [(1, 96), (15, 130), (16, 32), (40, 130), (64, 33)])
def test_k_not_a_multiple_of_64_stays_on_the_vector_tiles(amx, m, k) -> None:
    g = torch.Generator().manual_seed(m + k)
    w, x = torch.randn(72, k, generator=g).bfloat16(), torch.randn(m, k, generator=g).bfloat16()
    on, off = both_paths(x, kernels.prepare_bf16(w))
    assert torch.equal(on, off)
    kernels.use_amx(True)
    assert not kernels.bf16_runs_on_amx(k) and kernels.bf16_runs_on_amx(k * 64)  # what profile names


@pytest.mark.parametrize(("n", "k"), [(200, 896), (72, 128), (40, 4864)])
def test_a_rows_amx_result_does_not_depend_on_the_other_rows(amx, n, k) -> None:
    """A row's output is the same whatever rows share the call, from one row (tiles of M rows) to blocks
    of 16 and 32 with zero padding rows, and in either panel of rows when x outgrows one (K = 4864: 96-row
    panels): the batch invariance the engine relies on."""
    g = torch.Generator().manual_seed(5)
    w = kernels.prepare_bf16(torch.randn(n, k, generator=g).bfloat16())
    x = torch.randn(100, k, generator=g).bfloat16()
    full = kernels.linear_bf16(x, w)
    alone = torch.cat([kernels.linear_bf16(x[i : i + 1], w) for i in range(100)])
    assert torch.equal(alone, full)
    for m in (2, 7, 15, 16, 17, 33, 64):
        part = kernels.linear_bf16(x[100 - m :], w)  # row 99 at every position of a block
        assert torch.equal(part, full[100 - m :]), m


def cpu_has_amx_int8() -> bool:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return "amx_int8" in flags.split(":", 1)[1].split()


@pytest.fixture
def amx_int(amx):
    """AMX on, integer products of many rows on AMX-INT8 (skipped without it)."""
    if kernels.int_amx_rows(4) is None:
        pytest.skip("the CPU has no AMX-INT8")


def test_int_amx_rows_follows_use_amx(as_found) -> None:
    on = kernels.use_amx(True) and cpu_has_amx_int8()
    assert [kernels.int_amx_rows(bits) for bits in (8, 6, 5, 4)] == ([64, None, 48, 48] if on else [None] * 4)
    kernels.use_amx(False)
    assert kernels.int_amx_rows(4) is None and kernels.int_amx_rows(8) is None


# (bits, zero point, with shift): the weights each packing gives AMX: int8 codes read in place (zero point
# 0, tdpbsud) or made signed (128: Q8_0), int4 with a zero point (Q4_0) or a shift (Q4_1, GPTQ), IQ4 table
# indices (zero point 128 at 4 bits), 5-bit codes (Q5_0, Q5_1).
INT_FORMATS = [
    (8, 0, True),
    (8, 128, False),
    (4, 8, False),
    (4, 0, True),
    (4, 128, False),
    (5, 16, False),
    (5, 0, True),
]


def int_weights(bits: int, zero_point: int, with_shift: bool, n: int, k: int, group: int, g, scale_dtype):
    top = 16 if bits == 4 else 2**bits
    codes = torch.randint(0, top, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(k // group, n, generator=g) * 0.02 + 1e-3
    shift = torch.randn(k // group, n, generator=g) * 0.01 if with_shift else None
    prepare = {8: kernels.prepare_int8, 5: kernels.prepare_int5, 4: kernels.prepare_int4}[bits]
    linear = {8: kernels.linear_int8, 5: kernels.linear_int5, 4: kernels.linear_int4}[bits]
    return prepare(codes, scale, shift, group, zero_point, scale_dtype=scale_dtype), linear


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=lambda f: f"int{f[0]}-z{f[1]}{'-shift' if f[2] else ''}")
@pytest.mark.parametrize("m", [31, 47, 48, 64, 100])
@pytest.mark.parametrize(("n", "k", "group"), [(40, 64, 32), (72, 896, 128), (136, 4864, 32), (33, 160, 160)])
def test_integer_products_on_amx_equal_the_vector_tiles_bit_for_bit(amx_int, fmt, m, n, k, group) -> None:
    """AMX's integer sums are exact, and the float arithmetic after them is the vector tiles' in their order,
    so the outputs are identical, for every format, group size (one group per block, several, one per row)
    and row count around the switch (int4/int5 from 48 rows, int8 from 64; 100 pads a block of 16)."""
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k + fmt[0] + fmt[1])
    bits, zero_point, with_shift = fmt
    half = (m + n) % 2 == 0  # float16 and float32 scales, bf16 and fp32 activations, with and without bias
    scale_dtype = torch.float16 if half else torch.float32
    p, linear = int_weights(bits, zero_point, with_shift, n, k, group, g, scale_dtype)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16 if half else torch.float32)
    x[1] = 0  # a row of zeros: its blocks' scales are 0
    x[2, : k // 2] *= 1e3  # blocks of very different scales in one row
    bias = torch.randn(n, generator=g) if m % 3 == 0 else None
    on, off = both_int_paths(linear, x, p, bias)
    assert torch.equal(on, off)


def both_int_paths(linear, x, p, bias=None):
    kernels.use_amx(True)
    on = linear(x, p, bias)
    kernels.use_amx(False)
    off = linear(x, p, bias)
    kernels.use_amx(True)
    return on, off


def test_integer_products_on_amx_over_several_panels_of_rows(amx_int) -> None:
    """x larger than a panel (256 rows at K = 4864 on AMX) is taken through the tiles a panel at a time,
    each tile's codes made B tiles again for each; the results are still the vector tiles'."""
    g = torch.Generator().manual_seed(11)
    p, linear = int_weights(4, 0, True, 200, 4864, 128, g, torch.float32)
    x = torch.randn(300, 4864, generator=g).bfloat16()
    on, off = both_int_paths(linear, x, p)
    assert torch.equal(on, off)


def test_a_rows_integer_result_does_not_depend_on_the_other_rows(amx_int) -> None:
    """From one row (vector tiles) to 100 (AMX from 48, zero-padded to 112), a row's output is the same:
    prompts and decode steps may share a step without changing each other's tokens."""
    g = torch.Generator().manual_seed(12)
    p, linear = int_weights(4, 8, False, 72, 896, 32, g, torch.float32)
    x = torch.randn(100, 896, generator=g).bfloat16()
    full = linear(x, p)
    alone = torch.cat([linear(x[i : i + 1], p) for i in range(0, 100, 9)])
    assert torch.equal(alone, full[::9])
    for m in (31, 47, 48, 49, 64, 65):
        assert torch.equal(linear(x[100 - m :], p), full[100 - m :]), m


def test_the_prompt_benchmark_prints_both_paths(amx_int) -> None:
    """benchmarks/bench_int_prompts.py runs and prints a row per format and shape, both paths timed."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "benchmarks/bench_int_prompts.py"), "--rows", "64", "--rounds", "1"]
    out = subprocess.run([*cmd, "--calls", "1"], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| int")]
    assert len(rows) == 5 * 4 + 5  # 5 formats x 4 layer shapes (the head aside), then the step table
    for cells in rows[:20]:
        assert float(cells[2]) > 0 and float(cells[4]) > 0 and cells[6].strip().endswith("x")
