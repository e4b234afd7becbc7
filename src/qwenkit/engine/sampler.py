"""Batched sampling on the logits' own device: one call turns a step's (R, V) logits into R tokens.

Order (as transformers applies them): penalties on raw logits, then temperature, top-k, top-p, min-p,
then a draw. The penalties touch only the tokens a request has seen. Nothing sorts the whole vocabulary
(unless a top-p nucleus spans most of it): top-k takes the k best (``topk``, ties to the lower id, so a
row's candidates never depend on the widest k in its step) and every token tied with the k-th (as
transformers and vLLM keep them), so top-p sorts only those (Qwen's defaults set both), and a row that
sets top-p alone (as OpenAI clients do) finds its nucleus from a histogram of its probabilities on the
CPU kernels (``kernels.sample_top_p``), or else takes a window of the best that grows until it holds the
nucleus. A row that keeps the whole vocabulary draws by its
cumulative probabilities (one uniform); a ranked row by an exponential race over its candidates (argmax
of p / E with E ~ Exp(1), the same distribution as a categorical draw), each candidate's noise tied to
its token id, not its rank. The randomness comes from each request's own generator, laid out by token
id: a request's tokens never depend on what else is in the batch, nor on rank swaps of near-equal
logits, which float rounding can cause between batch shapes. Log-probabilities (of the raw model
distribution, as OpenAI reports them) are computed only for rows that ask.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from operator import itemgetter

import torch
from torch.nn.utils.rnn import pad_sequence

from qwenkit import kernels
from qwenkit.engine.request import Request, TokenLogprob
from qwenkit.engine.sampling import SamplingParams
from qwenkit.engine.token_counts import TokenCounts


def _seen_rows(
    histories: Sequence[TokenCounts], device: torch.device, counted: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(R, S) ids of each row's seen tokens (and their counts), rows padded with their own first id
    (and its count): a padded position rewrites its row's first token with the same value."""
    ids = pad_sequence([h.ids for h in histories], batch_first=True, padding_value=-1).to(device)
    pad = ids < 0
    ids = torch.where(pad, ids[:, :1], ids)
    if not counted:
        return ids, None
    counts = pad_sequence([h.counts for h in histories], batch_first=True).to(device)
    return ids, torch.where(pad, counts[:, :1], counts)


def apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Each request's ``logit_bias`` added to its row (before penalties, as OpenAI applies it). Its pairs
    become tensors once, at the request's first step: a bias over the whole vocabulary took 0.5 s to
    convert, which every step of the batch waited for. Its columns go through typed arrays, not
    ``zip(*pairs)`` and ``torch.tensor(list)``: the first alone held the interpreter (and with it the
    server's event loop) for 0.1 s."""
    for row, request in enumerate(requests):
        if request.params.logit_bias:
            if request.logit_bias is None:
                pairs = request.params.logit_bias  # (int, float) pairs: SamplingParams made them so
                ids = torch.frombuffer(array("q", map(itemgetter(0), pairs)), dtype=torch.int64)
                values = torch.frombuffer(array("d", map(itemgetter(1), pairs)), dtype=torch.float64)
                request.logit_bias = ids.to(logits.device), values.to(logits.device, logits.dtype)
            index, values = request.logit_bias
            logits[row, index] += values
    return logits


def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Repetition penalty over every token seen (prompt + output); presence/frequency over the output.
    Only the seen tokens' logits are read and written (``TokenCounts``), per row as transformers'
    ``RepetitionPenaltyLogitsProcessor`` and OpenAI's additive penalties compute them."""
    dev = logits.device
    rep = [i for i, r in enumerate(requests) if r.seen is not None and len(r.seen)]
    if rep:
        ids, _ = _seen_rows([requests[i].seen for i in rep], dev, counted=False)
        rows = torch.tensor(rep, device=dev)[:, None]
        penalty = torch.tensor([requests[i].params.repetition_penalty for i in rep], device=dev)[:, None]
        values = logits[rows, ids]
        logits[rows, ids] = torch.where(values > 0, values / penalty, values * penalty)
    add = [i for i, r in enumerate(requests) if r.output_counts is not None and len(r.output_counts)]
    if add:
        ids, counts = _seen_rows([requests[i].output_counts for i in add], dev, counted=True)
        rows = torch.tensor(add, device=dev)[:, None]
        freq = torch.tensor([requests[i].params.frequency_penalty for i in add], device=dev)[:, None]
        pres = torch.tensor([requests[i].params.presence_penalty for i in add], device=dev)[:, None]
        counts = counts.to(logits.dtype)
        logits[rows, ids] = logits[rows, ids] - (freq * counts + pres * (counts > 0).to(logits.dtype))
    return logits


def on_kernels(logits: torch.Tensor) -> bool:
    """Whether the CPU kernels' row passes take these logits (float32 or bf16 (R, V) on a CPU where they
    load). They read bf16 logits as they come from the model's head, so an all-greedy step (and a
    sampled one drawn on the kernels) never copies the step's logits to float32."""
    kinds = (torch.float32, torch.bfloat16)
    return logits.device.type == "cpu" and logits.dtype in kinds and logits.dim() == 2 and kernels.available()


def as_float(logits: torch.Tensor) -> torch.Tensor:
    """The logits in float32 for torch's ops (penalties, masks, log-probabilities, top-k windows): bf16
    ones widened on the kernels' threads (torch's copy runs on OpenMP, whose worker then spins for
    milliseconds beside the kernels' workers); float32 ones as they are."""
    if logits.dtype == torch.float32:
        return logits
    return kernels.widen(logits) if on_kernels(logits) else logits.float()


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row of the logits holds no inf or NaN: on the CPU kernels where they load (torch's
    sum runs on OpenMP, see ``kernels.finite_rows``), else one float32 sum a row (NaN and inf both
    survive it)."""
    if on_kernels(logits):
        return kernels.finite_rows(logits).tolist()
    return torch.isfinite(as_float(logits).sum(-1)).tolist()


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)``; on the CPU kernels where they load (torch's is a scalar pass per row: 1 ms
    for a 16-row step over a 152k vocabulary)."""
    return kernels.argmax(logits) if on_kernels(logits) else logits.argmax(-1)


# Up to this k the kernels' top-k beats torch's (16 rows of a 49k vocabulary: 0.12 against 0.59 ms at
# k = 64, 2.2 against 3.7 ms at 1,024, but 8.1 against 5.3 ms at 4,096).
KERNEL_TOPK_MAX = 1024


def _topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(logits, k)``, sorted descending, ties to the lower id: on the kernels for k up to
    ``KERNEL_TOPK_MAX``, else ``ranked_topk``."""
    if k <= KERNEL_TOPK_MAX and on_kernels(logits):
        return kernels.topk(logits, k)
    return ranked_topk(logits, k)


def ranked_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of ``x`` (R, V) and their ids, sorted descending, ties to the lower id
    (as ``kernels.topk``). torch's topk orders tied values by k and the tensor's shape, so a request's
    top-k candidates and top log-probabilities changed with what the rest of its step asked for (ties are
    common in bf16 logits). One topk over int64 keys (the value's bits, ordered as the floats are, then
    the id reversed): every key is distinct, so the result is the row's alone."""
    bits = (x.float() + 0.0).view(torch.int32).long()  # + 0.0: -0.0 becomes 0.0, its equal
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: larger bits, smaller value
    reversed_ids = torch.arange(x.shape[-1] - 1, -1, -1, device=x.device)
    keys = (ordered << 32) | reversed_ids  # (R, V) int64
    ids = x.shape[-1] - 1 - (keys.topk(k, dim=-1).values & 0xFFFFFFFF)
    return x.gather(-1, ids), ids


def _logsumexp(logits: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """(R,) log of each row's sum of e^(logit / its temperature)."""
    if on_kernels(logits):
        return kernels.logsumexp(logits, [1.0 / t for t in temperatures])
    return torch.logsumexp(logits / torch.tensor(temperatures, device=logits.device)[:, None], dim=-1)


# Up to this many values ``_softmax`` runs on the calling thread alone.
SERIAL_SOFTMAX_MAX = 1 << 15


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """``x.softmax(-1)``, on the calling thread alone for a ranked step's few candidates (up to
    ``SERIAL_SOFTMAX_MAX`` values). torch's softmax starts an OpenMP region at any size, and in the
    engine's driver thread each region waited for a sleeping worker to wake (see ``worker_pool.h``),
    which then spun beside the kernels' workers: Qwen's defaults at 16 rows, ``sample`` in a driver
    thread took 0.53-0.70 ms with its two softmaxes there, 0.48 on this thread (2026-12-07, 2 cores). A
    row's result does not depend on the threads (rows are split among them)."""
    threads = torch.get_num_threads()
    if x.numel() > SERIAL_SOFTMAX_MAX or threads == 1:
        return x.softmax(-1)
    torch.set_num_threads(1)
    try:
        return x.softmax(-1)
    finally:
        torch.set_num_threads(threads)


# Candidates a top-p row without top-k starts from (``_grow`` widens it for a row that needs more).
NUCLEUS_START = 64


def ranked(p: SamplingParams, vocab: int) -> bool:
    """Whether a row keeps only its best candidates (top-k or top-p), not the whole vocabulary."""
    return 0 < p.top_k < vocab or p.top_p < 1.0


def filter_candidates(
    logits: torch.Tensor, params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, top-k, top-p, min-p for rows that are all ``ranked`` or all not.

    Returns candidate logits (R, K) with removed tokens at -inf, and their vocabulary ids (R, K) in
    descending order, or None for rows that are not ranked (then the K columns are the vocabulary).
    Ranked rows never sort the vocabulary: ``topk`` of the raw logits (temperature keeps the order),
    k the largest top-k (wider where ties with a row's k-th best run past it), or for a top-p row
    without one a window that grows until it holds the row's nucleus, its probabilities normalized over
    the whole vocabulary (``logsumexp``).
    """
    V = logits.shape[1]
    dev = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    kinds = {ranked(p, V) for p in params}
    if len(kinds) > 1:
        raise ValueError("filter_candidates takes rows that are all ranked (top-k/top-p) or all not")
    if kinds != {True}:
        return _min_p(logits / temperature, params), None
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    open_rows = [i for i, k in enumerate(ks) if k == V]  # top-p alone: the nucleus sets the width
    width = min(V, max([k for k in ks if k < V] + ([NUCLEUS_START] if open_rows else [])))
    values, ids, width = _top_k_window(logits, ks, width)
    candidates = values / temperature
    if min(ks) < width:  # top-k keeps every token tied with its k-th best (transformers', vLLM's)
        # one k in every row (Qwen's defaults): a column, not a gather, and no mask of top-k rows
        if len(set(ks)) == 1:
            kth = values[:, ks[0] - 1 : ks[0]]
        else:
            kth = values.gather(1, torch.tensor([min(k, width) - 1 for k in ks], device=dev)[:, None])
        beyond = values < kth
        if open_rows:
            beyond &= torch.tensor([k < V for k in ks], device=dev)[:, None]
        candidates = candidates.masked_fill(beyond, float("-inf"))
    if open_rows:  # shares of the whole vocabulary; rows whose window misses mass get a wider one
        total = _logsumexp(logits[open_rows], [params[i].temperature for i in open_rows])[:, None]
        short = [j for j, m in enumerate(_missing(candidates[open_rows], total, top_p[open_rows])) if m > 0]
        if short and width < V:
            rows = [open_rows[j] for j in short]
            wider, wider_ids = _grow(logits[rows], temperature[rows], total[short], top_p[rows], width)
            pad = wider.shape[1] - width
            candidates = torch.cat([candidates, candidates.new_full((len(params), pad), float("-inf"))], 1)
            ids = torch.cat([ids, ids[:, :1].expand(-1, pad)], 1)  # at -inf: never drawn
            candidates[rows], ids[rows] = wider, wider_ids
            width = candidates.shape[1]
    nucleus = [p < 1.0 for p in top_p[:, 0].tolist()]  # as float32 holds them
    if any(nucleus):
        probs = _softmax(candidates)
        if open_rows:
            probs[open_rows] = (candidates[open_rows] - total).exp()
        before = probs.cumsum(-1) - probs  # probability of the more likely candidates
        beyond = before >= top_p
        if not all(nucleus):
            beyond &= top_p < 1.0
        candidates = candidates.masked_fill(beyond, float("-inf"))
    return _min_p(candidates, params), ids


def _top_k_window(
    logits: torch.Tensor, ks: Sequence[int], width: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``_topk(logits, width)``, widened (doubling) while a top-k row's tokens tied with its k-th best
    run past the window's last column, so the window holds them all; ties at -inf need no room (they are
    never drawn). Returns the values, their ids and the width."""
    V = logits.shape[1]
    top_k_rows = [i for i, k in enumerate(ks) if k < V]
    # A row whose k is the width has its k-th best in the last column, so the check below widens the
    # window unless that is -inf: asked for at once, the wider window saves the step a pass over the
    # vocabulary (Qwen's top_k 20 made every sampled step take two). A window is the first columns of a
    # wider one (``_topk`` orders ties by id), so its cut gives the same values and ids.
    ahead = width < V and any(ks[i] == width for i in top_k_rows)
    fetched = _topk(logits, min(V, 2 * width) if ahead else width)
    while True:
        if fetched[0].shape[1] < width:
            fetched = _topk(logits, width)
        values, ids = fetched
        if values.shape[1] > width:
            values, ids = values[:, :width].contiguous(), ids[:, :width].contiguous()
        if width == V or not top_k_rows:
            return values, ids, width
        if len(top_k_rows) == len(ks) and len(set(ks)) == 1:  # one k in every row: columns
            kth, last = values[:, ks[0] - 1], values[:, -1]
        else:
            rows = torch.tensor(top_k_rows, device=logits.device)
            kth = values[rows, torch.tensor([ks[i] - 1 for i in top_k_rows], device=logits.device)]
            last = values[rows, -1]
        if not bool(((last == kth) & (kth > float("-inf"))).any()):
            return values, ids, width
        width = min(V, 2 * width)


def _missing(candidates: torch.Tensor, total: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(R, 1) probability mass each row's top-p still needs beyond its candidates (0 when they hold it)."""
    return (top_p - (candidates - total).exp().sum(-1, keepdim=True)).clamp_min(0)


def _grow(
    logits: torch.Tensor, temperature: torch.Tensor, total: torch.Tensor, top_p: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p rows whose window of ``width`` missed part of their nucleus: windows 4x as wide, or twice
    the tokens the missing mass needs at the window's smallest share (every token past it holds at most
    that), until each row's holds its nucleus. Returns the candidates and their ids."""
    V = logits.shape[1]
    while True:
        values, ids = _topk(logits, width)
        candidates = values / temperature
        missing = _missing(candidates, total, top_p)
        if width == V or not bool(missing.any()):
            return candidates, ids
        smallest = (candidates[:, -1:] - total).exp().clamp_min(1e-30)
        more = int((missing / smallest).max().clamp_max(V))
        width = min(V, max(4 * width, width + 2 * more))


def _min_p(candidates: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Drop candidates below min_p times the row's most likely one."""
    min_p = [p.min_p for p in params]
    if max(min_p) == 0:
        return candidates
    probs = _softmax(candidates)
    floor = torch.tensor(min_p, device=candidates.device)[:, None] * probs.max(-1, keepdim=True).values
    return candidates.masked_fill(probs < floor, float("-inf"))


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``filter_candidates`` laid back over the whole vocabulary (R, V), any mix of rows: for tests and
    inspection."""
    full = torch.full_like(logits, float("-inf"))
    for rows in _by_kind(params, logits.shape[1]):
        candidates, ids = filter_candidates(logits[rows], [params[i] for i in rows])
        # amax: a widened window pads its ids with repeats (at -inf), which must not overwrite a token
        full[rows] = candidates if ids is None else full[rows].scatter_reduce(1, ids, candidates, "amax")
    return full


def _top_p_alone(p: SamplingParams, vocab: int) -> bool:
    """A ranked row by top-p alone: its candidates are its nucleus."""
    return ranked(p, vocab) and not 0 < p.top_k < vocab


def _by_kind(params: Sequence[SamplingParams], vocab: int) -> list[list[int]]:
    """Row indices split into rows with top-k, rows with top-p alone, and the others (empty groups left
    out): each group is drawn one way."""
    kinds = [lambda p: 0 < p.top_k < vocab, lambda p: _top_p_alone(p, vocab), lambda p: not ranked(p, vocab)]
    groups = [[i for i, p in enumerate(params) if kind(p)] for kind in kinds]
    return [g for g in groups if g]


def _uniform(request: Request) -> torch.Tensor:
    """One uniform in [0, 1) from the request's own generator (every sampled request has one)."""
    gen = request.generator
    return torch.rand((), generator=gen, device=gen.device)


def _key(request: Request) -> int:
    """A step's key for ``_keyed_exp``, one draw from the request's own generator."""
    gen = request.generator
    return int(torch.randint(-(2**62), 2**62, (1,), generator=gen, device=gen.device))


def _keyed_exp(key: int | torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) values -log(u), u uniform in (0, 1) from the splitmix64 mix of ``key + id * golden``: a
    counter-based stream, so a candidate's noise needs no draw for the rest of the vocabulary. ``key``: one
    int, or int64 (R, 1) keys for rows of ``ids`` (R, K)."""

    def shr(z: torch.Tensor, s: int) -> torch.Tensor:  # logical shift of int64 as uint64
        return (z >> s) & ((1 << (64 - s)) - 1)

    z = ids.to(torch.long) * _GOLDEN + key  # int64 arithmetic wraps, as splitmix64's uint64
    z = (z ^ shr(z, 30)) * _MIX1
    z = (z ^ shr(z, 27)) * _MIX2
    z = z ^ shr(z, 31)
    u = (shr(z, 11).double() + 0.5) * 2.0**-53
    return (-torch.log(u)).float()


# splitmix64's constants 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB as int64
_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def sample(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Tokens (R,) for rows of already penalized float32 logits; greedy rows take the argmax."""
    drawn = [i for i, r in enumerate(requests) if not r.params.greedy]
    if len(drawn) < len(requests):
        tokens = greedy(logits)
        if not drawn:
            return tokens
    else:  # every row draws: no argmax pass over the vocabulary for them
        tokens = torch.empty(len(requests), dtype=torch.long, device=logits.device)
    V = logits.shape[1]
    for group in _by_kind([requests[i].params for i in drawn], V):
        rows = [drawn[j] for j in group]
        mine = logits if len(rows) == logits.shape[0] else logits[rows]  # no copy when every row draws
        params = [requests[i].params for i in rows]
        if on_kernels(mine) and (not ranked(params[0], V) or _top_p_alone(params[0], V)):
            scales, min_ps = [1 / p.temperature for p in params], [p.min_p for p in params]
            if not ranked(params[0], V):  # the whole vocabulary, in one kernel
                u = [float(_uniform(requests[i])) for i in rows]
                tokens[rows] = kernels.sample_cdf(mine, scales, min_ps, u)
            else:  # the nucleus, in one kernel
                keys = [_key(requests[i]) for i in rows]
                tokens[rows] = kernels.sample_top_p(mine, scales, [p.top_p for p in params], min_ps, keys)
            continue
        candidates, ids = filter_candidates(as_float(mine), params)
        probs = _softmax(candidates)
        if ids is None:  # the whole vocabulary: one uniform per row against its cumulative probabilities
            u = torch.stack([_uniform(requests[i]) for i in rows])[:, None]
            cdf = probs.cumsum(-1)
            picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(V - 1)
        else:  # the candidates: an exponential race, each candidate's noise tied to its token id
            keys = torch.tensor([_key(requests[i]) for i in rows], device=ids.device)[:, None]
            picked = ids.gather(1, greedy(probs / _keyed_exp(keys, ids))[:, None])
        tokens[rows] = picked[:, 0]
    return tokens


def token_logprobs(
    raw_logits: torch.Tensor, tokens: torch.Tensor, top_n: Sequence[int]
) -> list[TokenLogprob]:
    """The log-probability of ``tokens`` (R,) under raw logits (R, V), with the top_n[i] best per row."""
    logprobs = torch.log_softmax(as_float(raw_logits), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    most = max(top_n, default=0)
    top_values, top_ids = None, None
    if most:  # the kernels' topk refuses NaN, which a prompt's rows (never checked) may hold
        finite = all(finite_rows(logprobs))
        top_values, top_ids = _topk(logprobs, most) if finite else ranked_topk(logprobs, most)
    out = []
    token_list = tokens.tolist()
    values = top_values.tolist() if top_values is not None else None
    idx = top_ids.tolist() if top_ids is not None else None
    for i, (token, lp) in enumerate(zip(token_list, chosen, strict=True)):
        top = list(zip(idx[i][: top_n[i]], values[i][: top_n[i]], strict=True)) if top_n[i] else []
        out.append(TokenLogprob(token, lp, top))
    return out
