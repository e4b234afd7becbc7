"""Sampling: our batched filters equal transformers' own logits processors, and draws follow them."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwenkit.engine.request import Request
from qwenkit.engine.sampler import apply_penalties, filter_logits, sample
from qwenkit.engine.sampling import SamplingParams

V = 2000


def reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' warpers in generate()'s order: temperature, top-k, top-p, min-p."""
    x = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return x[0]


ROWS = [
    SamplingParams(temperature=0.7, top_p=0.8, top_k=20),  # Qwen's chat defaults
    SamplingParams(temperature=1.0, top_p=0.9),  # top-p over the whole vocabulary
    SamplingParams(temperature=1.3, top_k=50),
    SamplingParams(temperature=0.5, min_p=0.05),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.9, top_k=300, top_p=0.5, min_p=0.01),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filters_equal_transformers_warpers(seed):
    logits = torch.randn(len(ROWS), V, generator=torch.Generator().manual_seed(seed)) * 3
    ours = filter_logits(logits, ROWS)
    for row, p in enumerate(ROWS):
        ref = reference(logits[row], p)
        kept = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(ours[row]), kept), p
        assert torch.allclose(ours[row][kept], ref[kept], atol=1e-6)
    # Each row alone gives the same as in the batch.
    for row, p in enumerate(ROWS):
        assert torch.equal(filter_logits(logits[row : row + 1], [p])[0], ours[row])


def test_penalties_equal_transformers():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    prompt = [5, 9, 9, 1000, 1999]
    out = [3, 5, 5, 5]
    reqs = []
    for p in (
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=0.8),
    ):
        r = Request(0, prompt, p, output_ids=list(out))
        r.seen = torch.zeros(V, dtype=torch.bool)
        r.seen[prompt + out] = True
        if p.presence_penalty or p.frequency_penalty:
            r.output_counts = torch.bincount(torch.tensor(out), minlength=V).int()
        reqs.append(r)
    ours = apply_penalties(logits.clone(), reqs)
    history = torch.tensor([prompt + out])
    ref0 = RepetitionPenaltyLogitsProcessor(1.3)(history, logits[:1].clone())[0]
    assert torch.allclose(ours[0], ref0)
    ref1 = RepetitionPenaltyLogitsProcessor(0.8)(history, logits[1:].clone())[0]
    ref1[5] -= 0.25 * 3 + 0.5
    ref1[3] -= 0.25 * 1 + 0.5
    assert torch.allclose(ours[1], ref1)


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = SamplingParams(temperature=0.8, top_k=4, top_p=0.95)
    probs = filter_logits(logits, [p])[0].softmax(-1)
    r = Request(0, [1], p, generator=torch.Generator().manual_seed(0))
    n = 6000
    counts = torch.bincount(torch.cat([sample(logits.clone(), [r]) for _ in range(n)]), minlength=6)
    assert counts[4:].sum() == 0  # outside the top-k never drawn
    assert (counts / n - probs).abs().max() < 0.02


def test_a_rows_draws_do_not_depend_on_the_batch():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(9))
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.7, top_k=20, top_p=0.8)]

    def fresh(i):
        return Request(i, [1], params[i], generator=torch.Generator().manual_seed(100 + i))

    alone = [int(sample(logits[i : i + 1].clone(), [fresh(i)])[0]) for i in range(2)]
    together = sample(logits[:2].clone(), [fresh(0), fresh(1)]).tolist()
    assert together == alone
