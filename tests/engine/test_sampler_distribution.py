"""Draws follow, in frequency, the distribution their settings define, computed independently.

The target distribution comes from transformers' own logits processors in generate()'s order
(temperature, top-k, top-p, min-p; the repetition penalty), OpenAI's formula for the presence and
frequency penalties, and the logit bias added first (as the README documents). Samples go through the
engine's own step (``Engine._sample``: bias, penalties, then ``sample``), many rows a call, and a G
test (bins with few expected draws pooled) must not reject at p < 1e-6; tokens the target excludes must
never come out. Seeds are fixed, so each test gives the same answer on every run.

Where top-p cuts through tied tokens, transformers keeps whichever of them its sort leaves last; the
sampler keeps the lower ids (its documented rule), so the target moves each tie's kept share to the
tie's lowest ids.
"""

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
from qwenkit.engine.engine import Engine, StepOutput
from qwenkit.engine.request import Request
from qwenkit.engine.sampler import sample
from qwenkit.engine.sampling import SamplingParams
from qwenkit.engine.token_counts import TokenCounts

P_MIN = 1e-6  # a correct sampler fails one case in a million; every run draws the same samples anyway


@pytest.fixture(autouse=True, params=["kernels", "torch"])
def row_passes(request, monkeypatch):
    """Every test twice: the sampler's row passes on the CPU kernels, and on torch's ops (a GPU's)."""
    from qwenkit import kernels

    if request.param == "kernels" and not kernels.available():
        pytest.skip("needs the CPU kernels")
    if request.param == "torch":
        monkeypatch.setattr(sampler, "on_kernels", lambda logits: False)
    # small tensors: torch's threads only wait for each other (on a busy 2-core machine, 20x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield request.param
    torch.set_num_threads(threads)


def _rows(seed: int, v: int, scale: float) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * scale


PEAKED = _rows(1, 32, 4.0)
FLAT = _rows(2, 48, 0.2)
SPREAD = _rows(3, 64, 1.5)
BF16 = (_rows(4, 40, 3.0)).bfloat16()  # bf16 rounding leaves ties
TIED = torch.tensor([2.0, 1.0, 3.0, 1.0, 3.0, 0.5, 1.0, 3.0, -1.0, 1.0, 0.5, 2.0, -2.0, 1.0, 0.0, 3.0])
# 8 tokens of probability exactly 1/8 (the rest e^-40: nothing in float32): top-p 0.5 cuts exactly at
# the cumulative sum of four of them
EXACT = torch.full((16,), -40.0)
EXACT[[1, 2, 4, 6, 9, 11, 12, 15]] = 0.0
WIDE = _rows(5, 300, 0.3)  # a nucleus wider than the first window of a top-p row (sampler.NUCLEUS_START)


def target(logits: torch.Tensor, p: SamplingParams, prompt=(), out=()) -> torch.Tensor:
    """The float64 probabilities (V,) a request with these settings and history must draw from."""
    x = logits.float().clone()[None]
    for token, value in p.logit_bias:
        x[0, token] += value
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([[*prompt, *out]]), x)
    if out:  # OpenAI's: logit - count * frequency_penalty - (count > 0) * presence_penalty
        counts = torch.bincount(torch.tensor(out), minlength=x.shape[1]).float()
        x = x - (counts * p.frequency_penalty + (counts > 0).float() * p.presence_penalty)
    if p.greedy:
        return torch.nn.functional.one_hot(x[0].argmax(), x.shape[1]).double()
    ids = torch.zeros(1, 1, dtype=torch.long)
    x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1.0:
        x = _ties_to_lower_ids(TopPLogitsWarper(p.top_p)(ids, x.clone()), x)
    if p.min_p:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return x[0].double().softmax(-1)


def _ties_to_lower_ids(kept: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """transformers' top-p result with each tie's kept tokens moved to the tie's lowest ids."""
    out = before.clone()
    for value in before[0].unique():
        tie = (before[0] == value).nonzero()[:, 0]
        n = int(torch.isfinite(kept[0, tie]).sum())
        out[0, tie[n:]] = float("-inf")
    return out


def draw(cases: list[tuple], n: int, seed: int = 0, per_case: int = 2000) -> list[torch.Tensor]:
    """Counts (V,) of n draws for each case (logits, params, prompt, output), all cases' rows interleaved
    in each step's batch: row j is case j % len(cases). Each case is one request (its generator draws
    once per row), and every step goes through the engine's own order: bias, penalties, sample."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampler, "_uniform", _predrawn(n, lambda g, k: torch.rand(k, generator=g).unbind()))
        mp.setattr(
            sampler,
            "_key",
            _predrawn(n, lambda g, k: torch.randint(-(2**62), 2**62, (k,), generator=g).tolist()),
        )
        return _draw(cases, n, seed, per_case)


def _predrawn(n: int, make):
    """A stand-in for ``sampler._uniform`` or ``_key`` that hands out values drawn from the request's
    generator n at a time: one call a row took 7 us, most of a test's time."""
    streams: dict[int, object] = {}

    def next_value(request: Request):
        if id(request) not in streams:
            streams[id(request)] = iter(make(request.generator, n))
        return next(streams[id(request)])

    return next_value


class _Scheduler:
    def remove(self, request: Request) -> None:
        pass


def _engine() -> Engine:
    """An engine with only what ``Engine._sample`` reads (no model: the logits are given)."""
    engine = Engine.__new__(Engine)
    engine.eos_token_ids, engine.max_seq_len, engine.dtype = (), 1 << 30, torch.float32
    engine.scheduler = _Scheduler()
    return engine


def _history(r: Request, prompt: tuple, out: tuple) -> None:
    """The request as the engine holds it after ``out``, before this step (each step starts there)."""
    r.output_ids, r.finish_reason = list(out), None
    p = r.params
    r.seen = TokenCounts([*prompt, *out]) if p.repetition_penalty != 1.0 else None
    r.output_counts = (
        TokenCounts(list(out), counted=True) if p.presence_penalty or p.frequency_penalty else None
    )


def _draw(cases: list[tuple], n: int, seed: int, per_case: int) -> list[torch.Tensor]:
    engine = _engine()
    requests = []
    for i, (_, p, prompt, _) in enumerate(cases):
        r = Request(i, list(prompt) or [0], p)
        if not p.greedy:
            r.generator = torch.Generator().manual_seed(seed * 1000 + i)
        requests.append(r)
    V = max(c[0].shape[0] for c in cases)
    rows = torch.stack([torch.nn.functional.pad(c[0], (0, V - c[0].shape[0]), value=-1e4) for c in cases])
    logits = rows.repeat(per_case, 1)
    to_sample = [(requests[j % len(cases)], j) for j in range(logits.shape[0])]
    counts = torch.zeros(len(cases), V, dtype=torch.long)
    for _ in range(n // per_case):
        for r, (_, _, prompt, out) in zip(requests, cases, strict=True):
            _history(r, prompt, out)
        by_id = {r.id: StepOutput(r.id, []) for r in requests}
        engine._sample(to_sample, logits.clone(), by_id)
        for i, r in enumerate(requests):
            counts[i] += torch.bincount(torch.tensor(by_id[r.id].new_token_ids), minlength=V)
    return [c[: case[0].shape[0]] for c, case in zip(counts, cases, strict=True)]


def g_test_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of a G test of counts against probs (> 0 everywhere given), bins expecting fewer than 5
    draws pooled into one."""
    n = int(counts.sum())
    expected = probs * n
    small = expected < 5
    observed = counts.double()
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    if observed.numel() < 2:
        return 1.0
    g = 2 * float(torch.where(observed > 0, observed * (observed / expected).log(), 0.0).sum())
    df = torch.tensor((observed.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(g / 2, dtype=torch.float64)))


def check(cases: list[tuple], n: int = 10000, seed: int = 0) -> None:
    """Every case's draws follow its target: never a token it excludes, and a G test that holds."""
    for (logits, p, prompt, out), counts in zip(cases, draw(cases, n, seed), strict=True):
        probs = target(logits, p, prompt, out)
        excluded = probs == 0
        assert int(counts[excluded].sum()) == 0, (p, counts[excluded].nonzero()[:, 0].tolist())
        pvalue = g_test_p(counts[~excluded], probs[~excluded])
        assert pvalue > P_MIN, (p, pvalue, counts.tolist(), (probs * n).round().tolist())


def case(logits: torch.Tensor, prompt=(), out=(), **settings) -> tuple:
    return (logits, SamplingParams(**settings), tuple(prompt), tuple(out))


TEMPERATURES = [0.3, 1.0, 1.7]
LOGITS = {"peaked": PEAKED, "flat": FLAT, "spread": SPREAD, "bf16": BF16, "tied": TIED}


@pytest.mark.parametrize("name", list(LOGITS))
def test_temperature_alone(name):
    check([case(LOGITS[name], temperature=t) for t in TEMPERATURES])


def test_temperature_alone_with_every_row_alike():
    """One setting in every row (the batch's uniform paths)."""
    check([case(SPREAD, temperature=0.3)])


def test_top_k_keeps_the_k_best_and_every_tie_with_the_kth():
    """k = 2 in TIED keeps its four tokens tied at 3.0; k = 5 cuts through the 2.0s and keeps both, in
    bf16 rows too."""
    check(
        [
            case(SPREAD, temperature=1.0, top_k=1),
            case(PEAKED, temperature=1.7, top_k=2),
            case(TIED, temperature=1.0, top_k=2),
            case(TIED, temperature=1.5, top_k=5),
            case(TIED, temperature=0.7, top_k=7),
            case(BF16, temperature=1.3, top_k=6),
            case(FLAT, temperature=1.0, top_k=10),
        ]
    )


def test_top_k_alone_with_every_row_alike():
    check([case(TIED, temperature=1.0, top_k=5)])


TOP_PS = [0.1, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("name", ["spread", "flat", "bf16", "tied", "exact", "wide"])
def test_top_p_alone(name):
    """EXACT's cumulative sums hit 0.5 exactly after four of its eight tied tokens: the nucleus holds
    those four and no fifth (an off-by-one at the cut keeps five)."""
    logits = {**LOGITS, "exact": EXACT, "wide": WIDE}[name]
    top_ps = [0.5, 0.9] if name == "wide" else TOP_PS  # wide: the window grows (slower on torch's path)
    check(
        [case(logits, temperature=1.0, top_p=p) for p in top_ps] + [case(logits, temperature=0.6, top_p=0.5)]
    )


def test_top_p_cut_exactly_at_a_cumulative_sum_keeps_nothing_past_it():
    for p, kept in ((0.125, 1), (0.25, 2), (0.5, 4), (0.75, 6), (0.875, 7)):
        counts = draw([case(EXACT, temperature=1.0, top_p=p)], 4000)[0]
        assert counts.nonzero()[:, 0].tolist() == [1, 2, 4, 6, 9, 11, 12, 15][:kept], p


def test_tied_best_tokens_are_drawn_alike():
    """Tokens tied for the best come out equally often, however sharp the temperature or tight the
    filter that keeps only them, and a top-k past the vocabulary is no filter."""
    check(
        [
            case(TIED, temperature=1e-4),
            case(TIED, temperature=1.0, min_p=1.0),
            case(TIED, temperature=0.5, top_k=4),
            case(TIED, temperature=1.0, top_k=40),
            case(BF16, temperature=1.0, top_k=40),
        ],
    )


def test_min_p_follows_temperature():
    """min-p compares probabilities after the temperature: at 0.5 it drops more than at 1.5."""
    check(
        [
            case(SPREAD, temperature=0.5, min_p=0.1),
            case(SPREAD, temperature=1.5, min_p=0.1),
            case(PEAKED, temperature=1.0, min_p=0.05),
            case(BF16, temperature=0.8, min_p=0.3),
            case(TIED, temperature=1.0, min_p=0.35),
        ]
    )


def test_combinations_in_generate_order():
    """Temperature, then top-k, top-p, min-p (min-p last, as transformers and the README put it)."""
    check(
        [
            case(SPREAD, temperature=0.7, top_k=20, top_p=0.8),  # Qwen's chat defaults
            case(SPREAD, temperature=1.3, top_k=10, top_p=0.6, min_p=0.2),
            case(FLAT, temperature=0.3, top_k=30, top_p=0.5, min_p=0.5),
            case(TIED, temperature=1.0, top_k=6, top_p=0.7),
            case(BF16, temperature=1.7, top_p=0.9, min_p=0.1),
            case(EXACT, temperature=1.0, top_k=6, top_p=0.5),
            case(PEAKED, temperature=1.2, top_k=5, min_p=0.01),
        ]
    )


# a history of tokens with positive and negative logits in MIXED (the repetition penalty divides the
# first and multiplies the second); tokens 5 and 7 repeat in the output
MIXED = torch.tensor([0.5, 1.0, -0.5, 2.0, 0.0, -1.0, 1.5, 0.8, -2.0, 0.3, -0.7, 1.2, 0.0, -1.5, 2.5, 0.1])
PROMPT, OUTPUT = (3, 5, 5, 9, 13, 2), (5, 7, 7, 7, 13, 1)


def test_penalties_over_a_history():
    """Repetition penalty over prompt and output (divides positive logits, multiplies negative ones);
    presence and frequency over the output alone."""
    check(
        [
            case(MIXED, PROMPT, OUTPUT, temperature=1.0, repetition_penalty=2.0),
            case(MIXED, PROMPT, OUTPUT, temperature=1.0, repetition_penalty=0.7),
            case(MIXED, PROMPT, OUTPUT, temperature=1.0, presence_penalty=1.0, frequency_penalty=0.4),
            case(FLAT, PROMPT, OUTPUT, temperature=0.5, presence_penalty=-1.5),
            case(
                TIED, PROMPT[:3], OUTPUT[:4], temperature=1.0, frequency_penalty=2.0, repetition_penalty=1.2
            ),
            case(
                BF16, PROMPT, OUTPUT, temperature=0.8, top_k=8, repetition_penalty=1.3, presence_penalty=0.5
            ),
        ]
    )


def test_logit_bias_comes_before_the_penalties():
    check(
        [
            case(SPREAD, temperature=1.0, logit_bias={3: 2.5, 5: -100, 40: 1.0}),
            case(
                MIXED, PROMPT, OUTPUT, temperature=1.0, repetition_penalty=2.0, logit_bias={5: 3.0, 7: -4.0}
            ),
            case(TIED, temperature=1.0, top_k=3, logit_bias={0: 1.0, 14: 10.0}),
            case(
                FLAT, PROMPT, OUTPUT, temperature=0.7, top_p=0.5, frequency_penalty=1.0, logit_bias={7: 5.0}
            ),
        ]
    )


def test_a_batch_with_every_row_its_own_settings():
    """Rows of different logits, settings and kinds side by side: each follows its own target."""
    check(
        [
            case(PEAKED, temperature=1.7),
            case(SPREAD, temperature=0.7, top_k=20, top_p=0.8),
            case(FLAT, temperature=1.0, top_p=0.5),
            case(TIED, temperature=1.0, top_k=2),
            case(SPREAD, temperature=0.4, top_k=3),
            case(EXACT, temperature=1.0, top_p=0.5),
            case(BF16, temperature=1.0, min_p=0.2),
            case(SPREAD, PROMPT, OUTPUT, temperature=1.0, repetition_penalty=1.3, top_k=12),
            case(TIED, temperature=0.0),
        ],
    )


@pytest.mark.parametrize("logits", [TIED, BF16, EXACT], ids=["tied", "bf16", "exact"])
def test_greedy_takes_the_lowest_id_of_a_tied_best(logits):
    """Temperature 0 takes the argmax, the lowest id where several tie (torch.argmax's rule)."""
    best = int((logits == logits.max()).nonzero()[0, 0])
    rows = [case(logits, temperature=0.0), case(logits, temperature=1.0), case(logits, temperature=1e-6)]
    counts = draw(rows, 2000)
    assert counts[0].nonzero()[:, 0].tolist() == [best] and counts[2].nonzero()[:, 0].tolist() == [best]


def test_a_seeded_request_draws_the_same_tokens_in_any_batch():
    """A request's tokens depend on its seed alone, not on the rows beside it (the README's promise)."""
    mine = [
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.8, seed=12),
        SamplingParams(temperature=1.0, top_p=0.9, seed=13),
        SamplingParams(temperature=0.9, min_p=0.1, seed=14),
    ]
    others = [
        SamplingParams(temperature=1.3, top_k=3),
        SamplingParams(temperature=0.5, top_p=0.9),
        SamplingParams(temperature=0.0),
    ]

    def tokens(params: SamplingParams, beside: list[SamplingParams], logits: torch.Tensor) -> list[int]:
        r = Request(0, [1], params, generator=torch.Generator().manual_seed(params.seed))
        out = []
        for step in range(30):
            rs = [
                Request(1 + i, [1], p, generator=torch.Generator().manual_seed(step))
                for i, p in enumerate(beside)
            ]
            batch = [*rs[:1], r, *rs[1:]]
            rows = torch.stack([logits] * len(batch))
            out.append(int(sample(rows, batch)[min(1, len(rs))]))
        return out

    for p in mine:
        for logits in (SPREAD, BF16.float()):
            alone = tokens(p, [], logits)
            assert len(set(alone)) > 2
            for beside in (others[:1], others, others[1:] * 3):
                assert tokens(p, beside, logits) == alone, (p, beside)
