"""kernels.widen and kernels.finite_rows, the engine's two passes over a step's logits: widen equals
``.float()`` bit for bit, and finite_rows says which rows hold no inf or NaN, wherever they sit. Every
row pass of the sampler reads the model's bf16 logits as it reads their float32 widening."""

from __future__ import annotations

import pytest
import torch

from qwenkit import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the CPU kernels")


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 4097, 49152, 151936])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_widen_equals_float(vocab: int, rows: int) -> None:
    g = torch.Generator().manual_seed(vocab + rows)
    x = (torch.randn(rows, vocab, generator=g) * 30).bfloat16()
    x[0, -1] = float("-inf")
    x[-1, 0] = float("nan")
    y = kernels.widen(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y.view(torch.int32), x.float().view(torch.int32))  # bit for bit, NaN included
    part = x[:, : vocab // 2 + 1]  # strided rows
    assert torch.equal(kernels.widen(part).view(torch.int32), part.float().view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 16, 17, 49152, 151937])
def test_finite_rows_finds_inf_and_nan_anywhere(vocab: int, dtype: torch.dtype) -> None:
    x = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab)) * 1e30
    x[1, -1] = float("inf")  # in the last, partial vector
    x[2, 0] = float("-inf")
    x[3, vocab // 2] = float("nan")
    x[4] = torch.finfo(dtype).max  # huge but finite: their sum would overflow, the rows are fine
    x = x.to(dtype)
    got = kernels.finite_rows(x)
    assert got.dtype == torch.bool
    assert got.tolist() == torch.isfinite(x).all(-1).tolist()
    assert got.tolist() == [True, False, False, False, True, True]


def test_bad_input_is_named() -> None:
    with pytest.raises(RuntimeError, match="widen_rows: x must be a bfloat16"):
        kernels.widen(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="finite_rows: x must be a float32 or bfloat16"):
        kernels.finite_rows(torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="finite_rows: x must be a float32 or bfloat16 .M, V."):
        kernels.finite_rows(torch.zeros(6))


@pytest.mark.parametrize("vocab", [1, 17, 2000, 49152, 151936])
def test_every_row_pass_reads_bf16_as_its_float32_widening(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    x = (torch.randn(16, vocab, generator=g) * 4).bfloat16()
    x[2, -1] = 40.0  # the best token in the last, partial vector
    x[5, : vocab // 3] = float("-inf")
    x[7, [0, vocab - 1]] = 60.0  # a tie: the first index
    view = x[:, : max(1, vocab - 5)]  # strided rows
    for logits in (x, view):
        wide = logits.float()
        rows, v = wide.shape
        assert torch.equal(kernels.argmax(logits), kernels.argmax(wide))
        assert torch.equal(kernels.argmax(logits), wide.argmax(-1))
        assert torch.equal(kernels.finite_rows(logits), kernels.finite_rows(wide))
        for k in sorted({1, min(50, v), v}):
            got, want = kernels.topk(logits, k), kernels.topk(wide, k)
            assert got[0].dtype == torch.float32
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        scales = [1 / (0.2 + 0.1 * i) for i in range(rows)]
        assert torch.equal(kernels.logsumexp(logits, scales), kernels.logsumexp(wide, scales))
        min_ps, us = [0.05 * (i % 3) for i in range(rows)], [(i + 0.5) / rows for i in range(rows)]
        drawn = kernels.sample_cdf(logits, scales, min_ps, us)
        assert torch.equal(drawn, kernels.sample_cdf(wide, scales, min_ps, us))
        top_ps, keys = [0.5 + 0.03 * i for i in range(rows)], list(range(100, 100 + rows))
        assert torch.equal(
            kernels.sample_top_p(logits, scales, top_ps, min_ps, keys),
            kernels.sample_top_p(wide, scales, top_ps, min_ps, keys),
        )
