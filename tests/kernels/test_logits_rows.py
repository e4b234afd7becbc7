"""kernels.widen and kernels.finite_rows, the engine's two passes over a step's logits: widen equals
``.float()`` bit for bit, and finite_rows says which rows hold no inf or NaN, wherever they sit."""

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


@pytest.mark.parametrize("vocab", [1, 16, 17, 49152, 151937])
def test_finite_rows_finds_inf_and_nan_anywhere(vocab: int) -> None:
    x = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab)) * 1e30
    x[1, -1] = float("inf")  # in the last, partial vector
    x[2, 0] = float("-inf")
    x[3, vocab // 2] = float("nan")
    x[4] = torch.finfo(torch.float32).max  # huge but finite: their sum would overflow, the rows are fine
    got = kernels.finite_rows(x)
    assert got.dtype == torch.bool
    assert got.tolist() == torch.isfinite(x).all(-1).tolist()
    assert got.tolist() == [True, False, False, False, True, True]


def test_bad_input_is_named() -> None:
    with pytest.raises(RuntimeError, match="widen_rows: x must be a bfloat16"):
        kernels.widen(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="finite_rows: x must be a float32"):
        kernels.finite_rows(torch.zeros(2, 3, dtype=torch.bfloat16))
