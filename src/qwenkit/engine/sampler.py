"""Batched sampling on the logits' own device: one call turns a step's (R, V) logits into R tokens.

Order (as transformers applies them): penalties on raw logits, then temperature, top-k, top-p, min-p,
then a draw. Top-k runs first so top-p sorts only the k candidates (Qwen's defaults set both); the full
vocabulary is sorted only for a row that sets top-p without top-k. The draw is an exponential race
(argmax of p / E with E ~ Exp(1), the same distribution as a categorical draw) with noise from each
request's own generator, laid out by the row's own candidates: a request's tokens never depend on what
else is in the batch. Log-probabilities (of the raw model distribution, as OpenAI reports them) are
computed only for rows that ask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwenkit import kernels
from qwenkit.engine.request import Request, TokenLogprob
from qwenkit.engine.sampling import SamplingParams


def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Repetition penalty over every token seen (prompt + output); presence/frequency over the output."""
    rep = [i for i, r in enumerate(requests) if r.seen is not None]
    if rep:
        dev = logits.device
        seen = torch.stack([requests[i].seen for i in rep])  # (Rp, V)
        penalty = torch.tensor([requests[i].params.repetition_penalty for i in rep], device=dev)[:, None]
        rows = logits[rep]
        penalized = torch.where(rows > 0, rows / penalty, rows * penalty)
        logits[rep] = torch.where(seen, penalized, rows)
    add = [i for i, r in enumerate(requests) if r.output_counts is not None]
    if add:
        dev = logits.device
        counts = torch.stack([requests[i].output_counts for i in add]).to(logits.dtype)  # (Ra, V)
        freq = torch.tensor([requests[i].params.frequency_penalty for i in add], device=dev)[:, None]
        pres = torch.tensor([requests[i].params.presence_penalty for i in add], device=dev)[:, None]
        logits[add] -= freq * counts + pres * (counts > 0).to(logits.dtype)
    return logits


def filter_candidates(
    logits: torch.Tensor, params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, top-k, top-p, min-p for each row.

    Returns candidate logits (R, K) with removed tokens at -inf, and their vocabulary ids (R, K) in
    descending order, or None when no row needed sorting (then the K columns are the vocabulary).
    """
    _R, V = logits.shape
    dev = logits.device
    logits = logits / torch.tensor([p.temperature for p in params], device=dev)[:, None]
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_p = [p.top_p for p in params]
    ids = None
    if min(ks) < V or min(top_p) < 1.0:
        logits, ids = torch.topk(logits, max(ks), dim=-1)  # sorted, descending
        if min(ks) < max(ks):
            beyond = (
                torch.arange(logits.shape[1], device=dev)[None, :] >= torch.tensor(ks, device=dev)[:, None]
            )
            logits = logits.masked_fill(beyond, float("-inf"))
        if min(top_p) < 1.0:
            probs = logits.softmax(-1)
            before = probs.cumsum(-1) - probs  # probability of the more likely candidates
            p = torch.tensor(top_p, device=dev)[:, None]
            logits = logits.masked_fill((before >= p) & (p < 1.0), float("-inf"))
    min_p = [p.min_p for p in params]
    if max(min_p) > 0:
        probs = logits.softmax(-1)
        floor = torch.tensor(min_p, device=dev)[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits, ids


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``filter_candidates`` laid back over the whole vocabulary (R, V): for tests and inspection."""
    candidates, ids = filter_candidates(logits, params)
    if ids is None:
        return candidates
    full = torch.full_like(logits, float("-inf"))
    return full.scatter(1, ids, candidates)


def _race_noise(request: Request, width: int, vocab: int, ids: torch.Tensor | None) -> torch.Tensor:
    """Exp(1) noise for one row's candidates, laid out by what the row alone defines: rank order for
    its top-k, vocabulary order otherwise (gathered into the batch's sorted order when there is one)."""
    gen = request.generator  # every sampled request has one, on the logits' device
    k = request.params.top_k
    if 0 < k < vocab:
        noise = torch.ones(width, device=gen.device)
        noise[:k].exponential_(generator=gen)
        return noise
    by_token = torch.empty(vocab, device=gen.device).exponential_(generator=gen)
    return by_token if ids is None else by_token[ids]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)``; on the CPU kernels where they load (torch's is a scalar pass per row: 1 ms
    for a 16-row step over a 152k vocabulary)."""
    if (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.dim() == 2
        and kernels.available()
    ):
        return kernels.argmax(logits)
    return logits.argmax(-1)


def sample(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Tokens (R,) for rows of already penalized float32 logits; greedy rows take the argmax."""
    tokens = greedy(logits)
    drawn = [i for i, r in enumerate(requests) if not r.params.greedy]
    if not drawn:
        return tokens
    rows = [requests[i] for i in drawn]
    candidates, ids = filter_candidates(logits[drawn], [r.params for r in rows])
    V = logits.shape[1]
    noise = torch.stack(
        [_race_noise(r, candidates.shape[1], V, None if ids is None else ids[j]) for j, r in enumerate(rows)]
    )
    choice = greedy(candidates.softmax(-1) / noise)[:, None]  # (Rd, 1)
    picked = choice if ids is None else ids.gather(1, choice)
    tokens[drawn] = picked[:, 0]
    return tokens


def token_logprobs(
    raw_logits: torch.Tensor, tokens: torch.Tensor, top_n: Sequence[int]
) -> list[TokenLogprob]:
    """The log-probability of ``tokens`` (R,) under raw logits (R, V), with the top_n[i] best per row."""
    logprobs = torch.log_softmax(raw_logits, dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    most = max(top_n, default=0)
    top_values, top_ids = logprobs.topk(most, dim=-1) if most else (None, None)
    out = []
    token_list = tokens.tolist()
    values = top_values.tolist() if top_values is not None else None
    idx = top_ids.tolist() if top_ids is not None else None
    for i, (token, lp) in enumerate(zip(token_list, chosen, strict=True)):
        top = list(zip(idx[i][: top_n[i]], values[i][: top_n[i]], strict=True)) if top_n[i] else []
        out.append(TokenLogprob(token, lp, top))
    return out
