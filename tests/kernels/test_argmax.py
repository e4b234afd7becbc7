"""kernels.argmax against torch.argmax(-1): ties, NaN, -inf, rows across chunk edges, odd widths."""

from __future__ import annotations

import pytest
import torch

from qwenkit import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the CPU kernels")

CHUNK = 16384  # the kernel's chunk of a row


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 49152, 151936])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_matches_torch_on_random_rows(vocab: int, rows: int) -> None:
    g = torch.Generator().manual_seed(vocab * 31 + rows)
    x = torch.randn(rows, vocab, generator=g)
    assert torch.equal(kernels.argmax(x), x.argmax(-1))


def test_ties_take_the_first_index_within_and_across_chunks() -> None:
    x = torch.zeros(4, 3 * CHUNK)
    x[0, [5, 21, 37]] = 2.0  # three lanes' worth of ties in one chunk: the lowest index wins
    x[1, [CHUNK + 3, 2 * CHUNK + 3]] = 2.0  # tie across chunks
    x[2, [3 * CHUNK - 1, 2 * CHUNK + 17]] = 2.0  # a chunk's last lane vs. an earlier one
    x[3] = 1.0  # every value equal
    got = kernels.argmax(x)
    assert got.tolist() == x.argmax(-1).tolist() == [5, CHUNK + 3, 2 * CHUNK + 17, 0]


def test_tail_beyond_the_last_full_vector() -> None:
    x = torch.zeros(2, 40)
    x[0, 39] = 1.0  # in the 8-wide scalar tail
    x[1, 33] = float("inf")
    assert kernels.argmax(x).tolist() == x.argmax(-1).tolist() == [39, 33]


def test_nan_and_infinities_follow_torch() -> None:
    x = torch.randn(6, 2 * CHUNK + 5)
    x[0, 700] = float("nan")  # NaN beats everything
    x[1, [100, CHUNK + 100]] = float("nan")  # the first NaN, across chunks
    x[2, 2 * CHUNK + 2] = float("nan")  # NaN in the scalar tail
    x[3] = float("-inf")  # all -inf: index 0
    x[4] = float("-inf")
    x[4, CHUNK + 9] = -1e30  # the only finite value, in a later chunk
    x[5, [7, 8]] = float("inf")
    assert kernels.argmax(x).tolist() == x.argmax(-1).tolist() == [700, 100, 2 * CHUNK + 2, 0, CHUNK + 9, 7]


def test_strided_input_and_bad_input() -> None:
    x = torch.randn(16, 2000)
    view = x[:, ::2]
    assert torch.equal(kernels.argmax(view), view.argmax(-1))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.argmax(x.half())
    with pytest.raises(RuntimeError, match="empty"):
        kernels.argmax(torch.zeros(2, 0))


def test_the_sampler_takes_greedy_tokens_from_the_kernel(monkeypatch) -> None:
    from qwenkit.engine import sampler

    calls = []
    real = kernels.argmax
    monkeypatch.setattr(kernels, "argmax", lambda x: calls.append(x.shape) or real(x))
    x = torch.randn(16, 49152)
    x[3, [10, 20]] = 50.0  # a tie: the first index, as torch
    assert torch.equal(sampler.greedy(x), x.argmax(-1)) and calls == [(16, 49152)]
    # other dtypes (and devices) keep torch's argmax
    assert torch.equal(sampler.greedy(x.double()), x.double().argmax(-1)) and len(calls) == 1
