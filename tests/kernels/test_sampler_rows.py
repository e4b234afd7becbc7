"""kernels.topk and kernels.logsumexp, the sampler's passes over whole rows, against torch: random rows of
the vocabularies the families use, k from 1 to the whole row, ties, -inf, strided input, bad input."""

from __future__ import annotations

import pytest
import torch

from qwenkit import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the CPU kernels")


@pytest.mark.parametrize("vocab", [1, 7, 17, 2000, 49152, 151936])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_topk_matches_torch(vocab: int, rows: int) -> None:
    g = torch.Generator().manual_seed(vocab * 7 + rows)
    x = torch.randn(rows, vocab, generator=g) * 3
    for k in sorted({1, min(20, vocab), min(64, vocab), min(1024, vocab), vocab}):
        values, ids = kernels.topk(x, k)
        want_values, want_ids = torch.topk(x, k)
        assert torch.equal(values, want_values), k
        assert torch.equal(x.gather(1, ids), values), k
        differ = ids != want_ids  # only where torch orders equal values otherwise
        assert torch.equal(values[differ], want_values[differ]), k


def test_topk_ties_go_to_the_lower_index_and_minus_inf_counts() -> None:
    inf = float("inf")
    x = torch.tensor([[1.0, 3.0, 3.0, -inf, 2.0, 3.0, -inf], [-inf] * 7])
    values, ids = kernels.topk(x, 7)
    assert ids.tolist() == [[1, 2, 5, 4, 0, 3, 6], [0, 1, 2, 3, 4, 5, 6]]
    assert values[0].tolist() == [3.0, 3.0, 3.0, 2.0, 1.0, -inf, -inf]
    wide = torch.zeros(2, 5000)
    wide[0, 4000:] = 1.0  # 1,000 equal best values after 4,000 equal others
    assert kernels.topk(wide, 3)[1].tolist() == [[4000, 4001, 4002], [0, 1, 2]]


def test_logsumexp_matches_torch_per_row_scale() -> None:
    g = torch.Generator().manual_seed(3)
    for vocab in (1, 17, 49152, 151936):
        x = torch.randn(5, vocab, generator=g) * 4
        scales = [1 / 0.7, 1.0, 5.0, 1e-3, 100.0]
        want = torch.logsumexp(x * torch.tensor(scales)[:, None], -1)
        torch.testing.assert_close(kernels.logsumexp(x, scales), want, rtol=1e-5, atol=1e-4)
    x = torch.full((2, 40), -float("inf"))
    x[1, 5] = 0.0
    assert kernels.logsumexp(x, [2.0, 2.0]).tolist() == [-float("inf"), 0.0]
    view = torch.randn(4, 3000)[:, ::3]
    torch.testing.assert_close(kernels.logsumexp(view, [1.0] * 4), torch.logsumexp(view, -1))


def test_bad_input_is_named() -> None:
    x = torch.randn(2, 100)
    with pytest.raises(RuntimeError, match="k must lie in 1..100"):
        kernels.topk(x, 0)
    with pytest.raises(RuntimeError, match="k must lie in 1..100"):
        kernels.topk(x, 101)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.topk(x.half(), 3)
    x[1, 0] = float("nan")
    with pytest.raises(RuntimeError, match="row 1 holds NaN"):
        kernels.topk(x, 5)
    with pytest.raises(RuntimeError, match="one scale per row"):
        kernels.logsumexp(torch.randn(2, 10), [1.0])
    with pytest.raises(RuntimeError, match="scales must be positive"):
        kernels.logsumexp(torch.randn(2, 10), [1.0, 0.0])


def reference_cdf_draw(x: torch.Tensor, scale: float, min_p: float, u: float) -> tuple[int, float]:
    """The draw in float64, and how far u * total lies from the nearest boundary of the cumulative sum."""
    e = torch.exp((x.double() - x.max()) * scale)
    e[e < min_p] = 0
    cdf = e.cumsum(0)
    target = u * float(cdf[-1])
    index = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64), right=True)[0])
    return min(index, x.numel() - 1), float((cdf - target).abs().min() / cdf[-1])


@pytest.mark.parametrize("vocab", [1, 17, 2000, 151936])
def test_sample_cdf_draws_what_the_float64_cumulative_sum_gives(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g) * 3
    x[:, ::7] = -float("inf") if vocab > 1 else x[:, ::7]  # never drawn
    scales, min_ps = [1.0, 1 / 0.7, 2.0, 0.5, 1.0, 10.0], [0.0, 0.0, 0.05, 0.0, 0.3, 0.0]
    us = torch.rand(6, generator=g).tolist()
    us[0] = 0.0  # the first token with any probability
    got = kernels.sample_cdf(x, scales, min_ps, us).tolist()
    for m in range(6):
        want, margin = reference_cdf_draw(x[m], scales[m], min_ps[m], us[m])
        if margin > 1e-4:  # float32 sums may differ from float64 right at a boundary
            assert got[m] == want, (m, got[m], want)
        assert torch.isfinite(x[m, got[m]])
        p = torch.softmax(x[m] * scales[m], 0)
        assert p[got[m]] >= min_ps[m] * p.max()


def test_sample_cdf_bad_input_is_named() -> None:
    x = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match="one scale, min_p and uniform per row"):
        kernels.sample_cdf(x, [1.0], [0.0, 0.0], [0.1, 0.2])
    with pytest.raises(RuntimeError, match="row 1 needs scale > 0"):
        kernels.sample_cdf(x, [1.0, 1.0], [0.0, 0.0], [0.1, 1.0])
    with pytest.raises(RuntimeError, match="float32"):
        kernels.sample_cdf(x.double(), [1.0, 1.0], [0.0, 0.0], [0.1, 0.2])


TOP_P_SETTINGS = ((1.0, 0.9, 0.0), (0.7, 0.5, 0.0), (0.2, 0.95, 0.05), (1.5, 0.3, 0.0))  # T, top-p, min-p


def test_sample_top_p_draws_what_the_sampler_s_torch_path_draws() -> None:
    """The nucleus from a histogram, edge tokens sorted, the race with noise hashed from token ids: the
    same token as ``filter_candidates`` (sorted window) and ``_keyed_exp`` give with the same key, over
    peaked and flat rows, temperatures, top-p and min-p."""
    from qwenkit.engine.sampler import _keyed_exp, filter_candidates
    from qwenkit.engine.sampling import SamplingParams

    g = torch.Generator().manual_seed(21)
    for sd in (0.3, 1.0, 3.0, 8.0):
        x = torch.randn(32, 5000, generator=g) * sd
        for temperature, top_p, min_p in TOP_P_SETTINGS:
            params = [SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p)] * 32
            keys = torch.randint(-(2**62), 2**62, (32,), generator=g)
            got = kernels.sample_top_p(x, [1 / temperature] * 32, [top_p] * 32, [min_p] * 32, keys.tolist())
            candidates, ids = filter_candidates(x, params)
            race = candidates.softmax(-1) / _keyed_exp(keys[:, None], ids)
            want = ids.gather(1, race.argmax(-1, keepdim=True))[:, 0]
            assert torch.equal(got, want), (sd, temperature, top_p, min_p)


def test_sample_top_p_breaks_ties_at_the_edge_by_the_lower_id() -> None:
    """Three best tokens, then 4,997 equal ones: the nucleus takes the equal ones with the lowest ids."""
    x = torch.zeros(1, 5000)
    x[0, 4997:] = 2.0  # the three best sit at the end, so lowest-id ties are not simply the first ids
    e_tie = torch.exp(torch.tensor(-2.0 / 1.5)).item()
    z = 3 + 4997 * e_tie
    kept_ties = int((0.3 * z - 3) / e_tie) + 1  # tied tokens whose better mass stays below top_p
    picks = {
        int(kernels.sample_top_p(x, [1 / 1.5], [0.3], [0.0], [key])[0])
        for key in torch.randint(-(2**62), 2**62, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    }
    ties = {p for p in picks if p < 4997}
    assert ties and max(ties) < kept_ties and max(ties) > kept_ties // 2  # spread over exactly those
    assert picks & {4997, 4998, 4999}


def test_sample_top_p_bad_input_is_named() -> None:
    x = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match="one scale, top_p, min_p and key per row"):
        kernels.sample_top_p(x, [1.0, 1.0], [0.9], [0.0, 0.0], [1, 2])
    with pytest.raises(RuntimeError, match="row 0 needs scale > 0, top_p in"):
        kernels.sample_top_p(x, [1.0, 1.0], [0.0, 0.9], [0.0, 0.0], [1, 2])
