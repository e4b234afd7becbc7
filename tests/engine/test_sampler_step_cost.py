"""A sampled decode step does no work it does not need: one pass over the vocabulary for a top-k window,
and no OpenMP region for a ranked step's few candidates. The candidates and draws stay bit for bit
those of before."""

from __future__ import annotations

import pytest
import torch

from qwenkit import kernels
from qwenkit.engine import sampler
from qwenkit.engine.request import Request
from qwenkit.engine.sampling import SamplingParams

V = 5000


@pytest.fixture(params=["kernels", "torch"])
def row_passes(request, monkeypatch):
    """The sampler's row passes on the CPU kernels, and on torch's ops (``QWENKIT_KERNELS=torch``)."""
    if request.param == "kernels" and not kernels.available():
        pytest.skip("needs the CPU kernels")
    if request.param == "torch":
        monkeypatch.setattr(sampler, "on_kernels", lambda logits: False)
    return request.param


def _counted_topk(monkeypatch) -> list[int]:
    widths: list[int] = []
    inner = sampler._topk

    def counted(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        widths.append(k)
        return inner(logits, k)

    monkeypatch.setattr(sampler, "_topk", counted)
    return widths


def _window_by_doubling(logits: torch.Tensor, ks: list[int], width: int) -> tuple[list, list, int]:
    """The window as the loop found it before: ``_topk`` at each width, doubling while ties run past."""
    top_k_rows = [i for i, k in enumerate(ks) if k < V]
    while True:
        values, ids = sampler._topk(logits, width)
        kth = values[top_k_rows, [ks[i] - 1 for i in top_k_rows]]
        tied = (values[top_k_rows, -1] == kth) & (kth > float("-inf"))
        if width == V or not bool(tied.any()):
            return values.tolist(), ids.tolist(), width
        width = min(V, 2 * width)


@pytest.mark.parametrize(
    "ks, width, ties",
    [
        ([20] * 16, 20, 0),  # Qwen's defaults in every row: the k-th best is always the last column
        ([20] * 4, 20, 50),  # ties past twice the width: a second call, at 80
        ([20, 20, 7], 20, 0),
        ([5, 20], 20, 0),  # the row with k == width decides
        ([5, 9], 9, 0),
    ],
)
def test_a_top_k_window_takes_one_pass_over_the_vocabulary(row_passes, monkeypatch, ks, width, ties):
    """A top-k row whose k is the window's width has its k-th best in the window's last column, so the
    window always doubled: every step of Qwen's top_k 20 took two passes over the vocabulary, the first
    thrown away. Now the wider window is asked for at once and cut back where it is not needed; values,
    ids and width are those of the doubling loop."""
    torch.manual_seed(len(ks) + ties)
    logits = torch.randn(len(ks), V)
    if ties:  # the best `ties` tokens of the first row all equal: the window must hold every one
        logits[0, :ties] = 9.0
    want = _window_by_doubling(logits, ks, width)
    widths = _counted_topk(monkeypatch)
    values, ids, got_width = sampler._top_k_window(logits, ks, width)
    assert (values.tolist(), ids.tolist(), got_width) == want
    assert values.is_contiguous() and ids.is_contiguous()
    assert widths == ([2 * width, 4 * width] if ties else [2 * width])


def test_a_window_not_certain_to_widen_is_asked_for_as_before(row_passes, monkeypatch):
    """No row's k is the width (rows of top-p alone set it): one pass at the width, as before; and a row
    whose k-th best is -inf (fewer finite logits than k) stops at its width, cut from the wider pass."""
    torch.manual_seed(3)
    logits = torch.randn(2, V)
    widths = _counted_topk(monkeypatch)
    values, ids, width = sampler._top_k_window(logits, [20, V], 64)
    assert widths == [64] and width == 64 and values.shape == (2, 64)
    logits[0, 10:] = float("-inf")  # the 20th best of row 0 is -inf: no room needed for its ties
    want = sampler._topk(logits[:1], 20)
    widths.clear()
    values, ids, width = sampler._top_k_window(logits[:1], [20], 20)
    assert widths == [40] and width == 20
    assert values.tolist() == want[0].tolist() and ids.tolist() == want[1].tolist()
    assert values.is_contiguous() and ids.is_contiguous()


def test_a_ranked_step_s_softmax_runs_on_one_thread(row_passes, monkeypatch):
    """torch's softmax starts an OpenMP region at any size; in the engine's driver thread each waited for
    a sleeping worker, which then spun beside the kernels' workers. A ranked step's candidates (16 x 40 for
    Qwen's defaults) take it on the calling thread alone, the thread count restored after."""
    threads_seen: list[int] = []
    inner = torch.Tensor.softmax

    def recorded(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        threads_seen.append(torch.get_num_threads())
        return inner(self, *args, **kwargs)

    torch.manual_seed(0)
    logits = torch.randn(16, V)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, seed=0)
    requests = [Request(i, [1], params, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as on a 2-core machine, whatever this one has
    try:
        monkeypatch.setattr(torch.Tensor, "softmax", recorded)
        sampler.sample(logits, requests)
        monkeypatch.undo()
        assert threads_seen == [1, 1]  # top-p's shares, then the race's probabilities
        assert torch.get_num_threads() == 2
        few, every = logits[:, :40], logits
        assert torch.equal(sampler._softmax(few), few.softmax(-1))  # the same bits
        assert torch.equal(sampler._softmax(every), every.softmax(-1))  # a whole vocabulary: threads
    finally:
        torch.set_num_threads(before)


def test_rows_sharing_one_top_k_build_no_per_row_index_tensors(row_passes, monkeypatch):
    """Rows with one top_k and top-p (Qwen's defaults in every row) take their k-th best as a column and
    need no mask of which rows are top-k or top-p: a step builds its temperatures and top-p's alone, and
    the candidates are each row's own, ties at the k-th kept."""
    torch.manual_seed(5)
    logits = torch.randn(16, V)
    logits[3, :25] = 7.0  # 25 tokens tie for row 3's best: kept past k = 20, then top-p cuts them
    params = [SamplingParams(temperature=0.7, top_k=20, top_p=0.8)] * 16
    alone = [sampler.filter_candidates(logits[i : i + 1], params[:1]) for i in range(16)]
    made: list[list] = []
    inner = torch.tensor

    def counted(data, *args, **kwargs):
        made.append(data)
        return inner(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counted)
    candidates, ids = sampler.filter_candidates(logits, params)
    monkeypatch.undo()
    assert made == [[0.7] * 16, [0.8] * 16]
    width = candidates.shape[1]
    for i, (row, row_ids) in enumerate(alone):
        n = row.shape[1]
        assert torch.equal(candidates[i, :n], row[0]) and torch.equal(ids[i, :n], row_ids[0])
        assert bool((candidates[i, n:width] == float("-inf")).all())
    kept = ids[3][candidates[3] > float("-inf")]
    assert set(kept.tolist()) <= set(range(25)) and len(kept) > 20  # ties past k, then top-p's cut
