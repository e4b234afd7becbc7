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

from qwenkit.engine import sampler
from qwenkit.engine.request import Request
from qwenkit.engine.sampler import NUCLEUS_START, apply_penalties, filter_logits, sample, token_logprobs
from qwenkit.engine.sampling import SamplingParams
from qwenkit.engine.token_counts import TokenCounts

V = 2000


@pytest.fixture(autouse=True, params=["kernels", "torch"])
def row_passes(request, monkeypatch):
    """Every test twice: the sampler's row passes (argmax, top-k, logsumexp) on the CPU kernels, and on
    torch's ops (another CPU, or ``QWENKIT_KERNELS=torch``)."""
    from qwenkit import kernels
    from qwenkit.engine import sampler

    if request.param == "kernels" and not kernels.available():
        pytest.skip("needs the CPU kernels")
    if request.param == "torch":
        monkeypatch.setattr(sampler, "on_kernels", lambda logits: False)
    return request.param


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


def penalized_request(prompt: list[int], out: list[int], p: SamplingParams) -> Request:
    """A request that generated ``out`` after ``prompt``, its seen tokens counted as the engine counts."""
    r = Request(0, prompt, p, output_ids=list(out))
    r.seen = TokenCounts(prompt + out)
    if p.presence_penalty or p.frequency_penalty:
        r.output_counts = TokenCounts(out, counted=True)
    return r


def test_penalties_equal_transformers():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    prompt = [5, 9, 9, 1000, 1999]
    out = [3, 5, 5, 5]
    reqs = []
    for p in (
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=0.8),
    ):
        reqs.append(penalized_request(prompt, out, p))
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


def tied_row() -> torch.Tensor:
    """A row whose best token is 10, then four tokens tied for second (30 < 77 < 200 < 400)."""
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(0)).clamp(max=4.0)
    row[0, [400, 30, 200, 77]] = 5.0
    row[0, 10] = 6.0
    return row


def test_top_logprobs_of_tied_tokens_do_not_depend_on_the_batch():
    """Ties (common in bf16 logits) go to the lower token id, so a request's top alternatives do not
    depend on how many another row in its step asked for (torch's topk ordered ties by k)."""
    row = tied_row()
    alone = token_logprobs(row, torch.tensor([10]), [2])[0]
    beside = token_logprobs(torch.cat([row, row]), torch.tensor([10, 10]), [2, 3])
    assert [t for t, _ in alone.top] == [10, 30]
    assert beside[0].top == alone.top and [t for t, _ in beside[1].top] == [10, 30, 77]


def test_top_k_ties_go_to_the_lower_id():
    """The candidates of a top-k row are the same whatever the step's widest top-k is, on the CPU kernels
    and on torch's path (a GPU's): tied tokens rank by id, and every token tied with the k-th is kept."""
    row = tied_row()
    for k in range(1, 8):
        values, ids = sampler._topk(torch.cat([row, row]), k)
        assert ids[:, :5].tolist() == [[10, 30, 77, 200, 400][:k]] * 2
        assert values[0, 1:5].tolist() == [5.0] * min(4, k - 1)
    p = [SamplingParams(temperature=5.0, top_k=2, seed=0), SamplingParams(temperature=5.0, top_k=40, seed=0)]

    def draws(rows: list[int]) -> list[int]:
        gens = {i: torch.Generator().manual_seed(i) for i in rows}
        out = []
        for _ in range(40):
            reqs = [Request(i, [1], p[i], generator=gens[i]) for i in rows]
            out.append(sample(torch.cat([row] * len(rows)), reqs).tolist()[0])
        return out

    assert set(draws([0])) == {10, 30, 77, 200, 400} and draws([0, 1]) == draws([0])


@pytest.mark.parametrize("k", [1, 2, 3, 20, 64, 65, 300])
def test_top_k_keeps_every_token_tied_with_the_kth_as_transformers_does(k):
    """transformers' TopKLogitsWarper (and vLLM's top-k) keep every token whose logit equals the k-th
    best; qwenkit kept exactly k, the lower ids, so a tie (common in bf16 logits) at the k-th place
    changed the distribution. Ties here run past the window of the widest k in the step (65 tied
    tokens at the boundary), beside a row with another k. (Where top-p cuts through tied tokens, which of
    them transformers keeps follows its unstable sort: no reference to compare with.)"""
    g = torch.Generator().manual_seed(6)
    rows = (torch.randn(3, V, generator=g) * 2).round() / 2  # many ties
    rows[1, :] = -3.0
    rows[1, 5:70] = 1.0  # 65 tokens tied for first
    rows[1, 900] = 2.0
    params = [
        SamplingParams(temperature=0.7, top_k=k),
        SamplingParams(temperature=1.3, top_k=k),
        SamplingParams(temperature=1.0, top_k=max(1, k // 2), min_p=0.05),
    ]
    ours = filter_logits(rows, params)
    for row, p in enumerate(params):
        ref = reference(rows[row], p)
        kept = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(ours[row]), kept), (row, int(kept.sum()))
        assert torch.allclose(ours[row][kept], ref[kept], atol=1e-6)
        assert torch.equal(filter_logits(rows[row : row + 1], [p])[0], ours[row])  # alone as in the batch
    if k == 2:
        assert int(torch.isfinite(ours[1]).sum()) == 66  # token 900 and all 65 tied for second


def test_ranked_topk_is_a_stable_sort_of_the_row():
    """``ranked_topk`` (torch's path) takes each row's k best as a stable descending sort does: ties,
    -inf, -0.0 and 0.0 included."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, V, generator=g) * 4).round() / 4  # many ties
    x[1, ::7] = float("-inf")
    x[2, :50] = 0.0
    x[2, 50:100] = -0.0
    for k in (1, 5, 60, V):
        values, ids = sampler.ranked_topk(x, k)
        _, ref_ids = torch.sort(x + 0.0, dim=-1, descending=True, stable=True)
        assert torch.equal(ids, ref_ids[:, :k]) and torch.equal(values, x.gather(1, ref_ids[:, :k]))


def test_top_p_alone_grows_its_window_to_the_nucleus():
    """A row with top-p and no top-k never sorts the vocabulary: its window of best candidates grows until
    it holds the nucleus (here several hundred tokens of a flat row), its probabilities normalized over the
    whole vocabulary; the kept set is transformers' own, beside a peaked row whose nucleus fits at once."""
    g = torch.Generator().manual_seed(5)
    flat = torch.randn(5000, generator=g) * 0.3
    peaked = torch.randn(5000, generator=g) * 6
    logits = torch.stack([flat, peaked, flat])
    params = [
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.7, top_p=0.8),
        SamplingParams(temperature=0.5, top_p=0.6, min_p=0.2),
    ]
    ours = filter_logits(logits, params)
    kept_counts = []
    for row, p in enumerate(params):
        ref = reference(logits[row], p)
        kept = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(ours[row]), kept), p
        assert torch.allclose(ours[row][kept], ref[kept], atol=1e-5)
        assert torch.equal(filter_logits(logits[row : row + 1], [p])[0], ours[row])
        kept_counts.append(int(kept.sum()))
    assert kept_counts[0] > 4 * NUCLEUS_START and kept_counts[1] < NUCLEUS_START


def test_top_p_alone_draws_follow_its_nucleus():
    logits = torch.randn(1, 3000, generator=torch.Generator().manual_seed(8)) * 0.5
    p = SamplingParams(temperature=1.0, top_p=0.3)
    probs = filter_logits(logits, [p])[0].softmax(-1)
    nucleus = int((probs > 0).sum())
    assert NUCLEUS_START < nucleus < 1000  # the window had to grow
    rows = [Request(i, [1], p, generator=torch.Generator().manual_seed(i)) for i in range(100)]
    n = 20000
    draws = [sample(logits.expand(len(rows), -1).clone(), rows) for _ in range(n // len(rows))]
    counts = torch.bincount(torch.cat(draws), minlength=3000)
    assert counts[probs == 0].sum() == 0  # never outside the nucleus
    assert 0.5 * (counts / n - probs).abs().sum() < 0.08  # total variation against the filtered distribution


def test_penalties_over_a_large_vocabulary_touch_only_seen_tokens():
    """Rows with histories of different lengths (padded in one gather): each equals transformers'
    repetition penalty and OpenAI's additive ones over the whole vocabulary; every other logit is
    untouched, bit for bit."""
    V = 151936
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, V, generator=g) * 4
    histories = [
        ([5, 9, 9, 151935, 0], [3, 5, 5, 5]),
        (torch.randint(0, V, (700,), generator=g).tolist(), [17, 17, 40000]),
        ([2], []),
    ]
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.8, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=1.1, presence_penalty=-0.4),
    ]
    reqs = [penalized_request(prompt, out, p) for (prompt, out), p in zip(histories, params, strict=True)]
    ours = apply_penalties(logits.clone(), reqs)
    for row, ((prompt, out), p) in enumerate(zip(histories, params, strict=True)):
        ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(
            torch.tensor([prompt + out]), logits[row : row + 1].clone()
        )[0]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=V).float()
        ref -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        assert torch.equal(ours[row], ref), row
        untouched = torch.ones(V, dtype=torch.bool)
        untouched[prompt + out] = False
        assert torch.equal(ours[row][untouched], logits[row][untouched])


def test_token_counts_keep_first_appearance_order_and_counts():
    counts = TokenCounts([7, 3, 7], counted=True)
    for t in [*range(100, 130), 3]:
        counts.add(t)
    assert counts.ids.tolist() == [7, 3, *range(100, 130)]  # past the first 16 slots
    assert counts.counts.tolist() == [2, 2] + [1] * 30
    assert 3 in counts and 4 not in counts and len(counts) == 32
    with pytest.raises(ValueError, match="without counting"):
        _ = TokenCounts([1]).counts


def test_whole_vocabulary_draws_follow_the_distribution():
    """Rows without top-k or top-p draw by their cumulative probabilities: tokens min-p removed never
    come out, and the rest come out as often as their probability."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(11)) * 2
    p = SamplingParams(temperature=0.8, min_p=0.02)
    probs = filter_logits(logits, [p])[0].softmax(-1)
    assert 0 < int((probs == 0).sum()) < 50
    rows = [Request(i, [1], p, generator=torch.Generator().manual_seed(i)) for i in range(100)]
    draws = [sample(logits.expand(len(rows), -1).clone(), rows) for _ in range(100)]
    counts = torch.bincount(torch.cat(draws), minlength=50)
    assert counts[probs == 0].sum() == 0
    assert 0.5 * (counts / 10000 - probs).abs().sum() < 0.04


def test_draws_follow_transformers_over_random_settings_and_masked_rows():
    """Random settings (temperature, top-k, top-p, min-p, some beyond the vocabulary) over rows with most
    tokens masked to -inf (as a grammar masks them) or none: no token outside transformers' kept set ever
    comes out, and the draws' total variation against its distribution (float64) stays within sampling
    noise. Logits are continuous: at exact ties the kept set differs by design (top-k keeps exactly k,
    ties to the lower index, where transformers keeps every token tied with the k-th)."""
    rng = torch.Generator().manual_seed(3)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    n = 1000
    for case in range(14):
        vocab = pick([37, 500, 3000])
        logits = torch.randn(vocab, generator=rng) * pick([0.5, 2.0, 8.0])
        if case % 2:
            keep = torch.randperm(vocab, generator=rng)[: max(1, int(vocab * pick([0.01, 0.3])))]
            masked = torch.full_like(logits, float("-inf"))
            masked[keep] = logits[keep]
            logits = masked
        p = SamplingParams(
            temperature=pick([0.2, 0.7, 1.0, 1.5]),
            top_k=pick([0, 0, 5, 50, 5000]),
            top_p=pick([1.0, 0.9, 0.5, 0.99]),
            min_p=pick([0.0, 0.05]),
        )
        probs = reference(logits.double(), p).softmax(-1)
        rows = [
            Request(i, [1], p, generator=torch.Generator().manual_seed(1000 * case + i)) for i in range(n)
        ]
        drawn = sample(logits.expand(n, -1).contiguous(), rows)
        counts = torch.bincount(drawn, minlength=vocab).double()
        assert counts[probs == 0].sum() == 0, (case, p)
        noise = 0.5 * (probs * (1 - probs) / n).sqrt().sum() * (2 / torch.pi) ** 0.5
        assert 0.5 * (counts / n - probs).abs().sum() < 3 * noise + 0.01, (case, p)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_k": 2.7}, "top_k must be an integer, got 2.7"),
        ({"seed": 1.5}, "seed must be an integer or None, got 1.5"),
        ({"max_tokens": True}, "max_tokens must be an integer, got True"),
        ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ({"top_p": None}, "top_p must be a number, got None"),
        ({"stop": 5}, "stop must be a list or a string, got 5"),
        ({"stop": ["a", 3]}, "stop must hold strings, got ('a', 3)"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids must hold integers, got (1.0,)"),
        ({"adapter": 3}, "adapter must be a string or None, got 3"),
        ({"ignore_eos": 1}, "ignore_eos must be True or False, got 1"),
        # "no" was taken as true (the stop string kept), None as false
        ({"include_stop_str_in_output": "no"}, "include_stop_str_in_output must be True or False, got 'no'"),
        ({"include_stop_str_in_output": None}, "include_stop_str_in_output must be True or False, got None"),
    ],
)
def test_sampling_params_refuse_a_wrong_type_by_name(fields, message):
    """A float top_k or seed used to pass and fail inside the engine's kernels, mid-step."""
    from qwenkit.engine.sampling import SamplingParamsError

    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(**fields)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": float("inf")}, "temperature must be finite, got inf"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be finite, got inf"),
        ({"seed": 2**64}, f"seed must fit in 64 bits ({-(2**63)}..{2**64 - 1}), got {2**64}"),
        ({"seed": -(2**63) - 1}, f"seed must fit in 64 bits ({-(2**63)}..{2**64 - 1}), got {-(2**63) - 1}"),
        # pairs naming a token twice: the batched add kept one of the values, which one undefined
        ({"logit_bias": ((5, 1.0), (7, 2.0), (5, -3.0))}, "logit_bias names token 5 twice"),
    ],
)
def test_sampling_params_refuse_what_the_engine_cannot_run(fields, message):
    """temperature=inf failed inside the sampler's kernel ("internal error", a logged traceback) and a
    seed past 64 bits inside torch ("Overflow when unpacking long long"), both mid-request."""
    from qwenkit.engine.sampling import SamplingParamsError

    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(**fields)
    assert str(raised.value) == message
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1 and SamplingParams(seed=-(2**63)).seed == -(2**63)


def test_sampling_params_take_one_stop_string_or_a_list():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a b", "c"], stop_token_ids=[7]) == SamplingParams(
        stop=("a b", "c"), stop_token_ids=(7,)
    )
    assert SamplingParams(temperature=1).temperature == 1  # an int where a float goes is a number


def test_none_for_stop_stop_token_ids_or_logit_bias_is_none_as_vllms_defaults():
    """vLLM's SamplingParams default these to None, so code written for it passes None; it was refused
    ("stop must be a list or a string, got None")."""
    given = SamplingParams(max_tokens=5, stop=None, stop_token_ids=None, logit_bias=None)
    assert given == SamplingParams(max_tokens=5)
    assert (given.stop, given.stop_token_ids, given.logit_bias) == ((), (), ())


def test_logit_bias_becomes_tensors_once_a_request():
    """A request's logit_bias is added as its pairs say, from tensors built at its first step and kept:
    rebuilt from the Python pairs at every step, a bias over the whole vocabulary (a way to allow only a
    few tokens) took 0.5 s a step, and every request in the batch waited for it."""
    bias = tuple((t, 2.0 if t % 3 else -100.0) for t in range(V))
    rows = [Request(0, [1], SamplingParams(logit_bias=bias)), Request(1, [1], SamplingParams())]
    logits = torch.randn(2, V)
    want = logits.clone()
    want[0] += torch.tensor([2.0 if t % 3 else -100.0 for t in range(V)])
    first = sampler.apply_logit_bias(logits.clone(), rows)
    built = rows[0].logit_bias
    assert torch.equal(first, want) and torch.equal(sampler.apply_logit_bias(logits.clone(), rows), want)
    assert rows[0].logit_bias is built and rows[1].logit_bias is None


def test_a_copy_of_sampling_params_does_not_check_the_logit_bias_again(monkeypatch):
    """A copy (``dataclasses.replace``: the server makes one per choice of n) hands back the checked pairs,
    which are not walked again: they were, 0.3 s for a bias over the whole vocabulary at each copy (and its
    repr written into an unused message), while the server's event loop waited (/health too)."""
    from dataclasses import replace

    from qwenkit.engine import sampling

    params = SamplingParams(logit_bias={t: (t % 5) - 2 for t in range(V)})  # ints, read as floats
    assert params.logit_bias[:3] == ((0, -2.0), (1, -1.0), (2, 0.0))
    walked = []  # the values _is_int is asked about: every field's integers, and each pair's token id
    monkeypatch.setattr(sampling, "_is_int", lambda v: walked.append(v) or type(v) is int)
    copy = replace(params, seed=5)
    assert (copy.logit_bias, copy.seed) == (params.logit_bias, 5) and len(walked) < 20
    with pytest.raises(sampling.SamplingParamsError, match="logit_bias names token 2 twice"):
        replace(params, logit_bias=((2, 1.0), (2, 3.0)))


@pytest.mark.parametrize(
    ("bias", "kept"),
    [
        ({7: 1, 5: -2.5}, ((5, -2.5), (7, 1.0))),  # a dict, sorted; ints made floats
        ([[5, 1], (7, 2.0)], ((5, 1.0), (7, 2.0))),  # lists and tuples as pairs
        (((5, 100.0), (6, -100.0)), ((5, 100.0), (6, -100.0))),  # the ends of the range
    ],
)
def test_logit_bias_checked_in_bulk_is_kept_as_the_walk_keeps_it(bias, kept):
    """The common bias is checked in calls over all pairs at once (pair by pair, the whole vocabulary
    took 0.2 s of the server's event loop); what it keeps is what the walk kept."""
    params = SamplingParams(logit_bias=bias)
    assert params.logit_bias == kept and all(type(v) is float for _, v in params.logit_bias)


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        (((5, 1.0), (5, 2.0)), "logit_bias names token 5 twice"),
        (((5, 101.0),), "logit_bias values must be in [-100, 100], got 101.0 for token 5"),
        (((5, float("nan")),), "logit_bias values must be in [-100, 100], got nan for token 5"),
        (((True, 1.0),), "logit_bias must map token ids to numbers, got ((True, 1.0),)"),
        (((5, 1.0, 2.0),), "logit_bias must map token ids to numbers, got ((5, 1.0, 2.0),)"),
    ],
)
def test_logit_bias_the_bulk_check_refuses_is_named_by_the_walk(bias, message):
    from qwenkit.engine.sampling import SamplingParamsError

    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(logit_bias=bias)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        # an int past a float's range: float() raised OverflowError before the range check
        (
            {5: 10**400},
            "logit_bias values must be in [-100, 100], got an integer past a float's range for token 5",
        ),
        (
            {5: -(10**400)},
            "logit_bias values must be in [-100, 100], got an integer past a float's range for token 5",
        ),
        # keys of two kinds: sorting the dict raised TypeError before the walk could name them
        ({5: 1.0, "6": 2.0}, "logit_bias must map token ids to numbers, got {5: 1.0, '6': 2.0}"),
        # a whole vocabulary's bias with one bad value: one short line naming it, not its repr's 20 KB
        (
            {**{i: 1.0 for i in range(2000)}, 5: "x"},
            "logit_bias must map token ids to numbers, got "
            + repr({**{i: 1.0 for i in range(40)}, 5: "x"})[:200]
            + "... (2000 entries; (5, 'x') is not)",
        ),
    ],
)
def test_logit_bias_that_python_cannot_sort_or_convert_is_a_sampling_params_error(bias, message):
    """The README's promise: a SamplingParams field out of range or of the wrong type raises one
    SamplingParamsError naming it, not a bare OverflowError or TypeError from inside the check."""
    from qwenkit.engine.sampling import SamplingParamsError

    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(logit_bias=bias)
    assert str(raised.value) == message


def test_params_without_a_bias_leave_the_checked_bias_for_its_copies(monkeypatch):
    """Params with no logit_bias (any other request's, made meanwhile in another worker thread) took the
    place of the checked bias, so the next copy of a whole-vocabulary bias (a choice of n, the tool plan's
    stop strings, on the server's event loop) checked all its pairs again."""
    from dataclasses import replace

    from qwenkit.engine import sampling

    params = SamplingParams(logit_bias={t: 1.0 for t in range(V)})
    SamplingParams()  # another request's, with no bias
    checked = []
    monkeypatch.setattr(sampling, "_in_bulk", lambda bias: checked.append(len(bias)))
    copy = replace(params, seed=5)
    assert (copy.logit_bias, copy.seed, checked) == (params.logit_bias, 5, [])


def test_top_k_minus_one_is_off_as_vllm_and_the_server_take_it():
    """``top_k=-1`` (vLLM's "off", which the server's requests take) was refused by the Python API and
    ``--top-k -1``; it is kept as 0, so it filters exactly as top-k off does. Below -1 is refused."""
    from qwenkit.engine.sampling import SamplingParamsError

    off = SamplingParams(temperature=0.8, top_k=-1, top_p=0.9)
    assert off.top_k == 0 and off == SamplingParams(temperature=0.8, top_k=0, top_p=0.9)
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(2)) * 3
    assert torch.equal(
        filter_logits(logits, [off]), filter_logits(logits, [SamplingParams(temperature=0.8, top_p=0.9)])
    )
    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(top_k=-2)
    assert str(raised.value) == "top_k must be >= -1 (0 or -1 disables it), got -2"


@pytest.mark.parametrize(
    "probs, p, kept",
    [
        # top-p on the whole distribution, then min-p (transformers'): 0.4 + 0.3 < 0.75 keeps token 2.
        # min-p first, then top-p on what it left (vLLM's) would keep only tokens 0 and 1 (4/9 + 3/9 >= 0.75)
        ([0.4, 0.3, 0.2, 0.05, 0.05], SamplingParams(temperature=1.0, top_p=0.75, min_p=0.2), [0, 1, 2]),
        (
            [0.4, 0.3, 0.2, 0.05, 0.05],
            SamplingParams(temperature=1.0, top_k=4, top_p=0.75, min_p=0.2),
            [0, 1, 2],
        ),
        # min-p after temperature (both's): at temperature 2 token 2 holds sqrt(0.2 / 0.5) = 0.63 of the best
        ([0.5, 0.3, 0.2], SamplingParams(temperature=2.0, min_p=0.5), [0, 1, 2]),
        ([0.5, 0.3, 0.2], SamplingParams(temperature=0.5, min_p=0.5), [0]),  # 0.36 and 0.16 of the best
    ],
)
def test_min_p_comes_after_temperature_top_k_and_top_p_as_in_transformers(probs, p, kept):
    """min-p's place in the order, pinned where it changes the kept set, for the filters and for the
    draws (the kernels' cumulative and nucleus draws included): each kept token comes out about as often
    as transformers' distribution says, the others never."""
    logits = torch.tensor([probs]).log()
    want = reference(logits[0], p).softmax(-1)
    assert torch.nonzero(want).flatten().tolist() == kept
    assert torch.allclose(filter_logits(logits, [p])[0].softmax(-1), want, atol=1e-6)
    rows = [Request(i, [1], p, generator=torch.Generator().manual_seed(i)) for i in range(200)]
    draws = torch.cat([sample(logits.expand(len(rows), -1).clone(), rows) for _ in range(30)])
    share = torch.bincount(draws, minlength=len(probs)) / len(draws)
    assert torch.nonzero(share).flatten().tolist() == kept
    assert (share - want).abs().max() < 0.03
