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
