"""Decide what runs in the next step. Pure Python, testable without a model.

Each request is described by two numbers: tokens computed (K/V in the cache) and tokens known (prompt +
output). There are no prefill and decode modes: a step gives every running request the tokens it has
left to compute (one, for a request that is decoding), within a per-step token budget, so a long prompt
is taken in chunks and never stalls the others. Running requests are served first; waiting ones join
when there are free batch rows and KV blocks for them. When the pool runs dry mid-generation, the newest
running request is preempted: its blocks are freed and it is recomputed later (its prefix blocks are
usually still cached), never corrupted.

A request that wants its prompt's log-probabilities (evaluation's scoring) reuses cached blocks that kept
theirs. The first token after such a prefix is predicted from the prefix's last position, so that one
position is computed again, into a copy of its block: a cached block is never written while others may
read it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from qwenkit.engine.blocks import BlockManager, block_hashes
from qwenkit.engine.request import Request, TokenLogprob


@dataclass
class Schedule:
    rows: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens to compute)
    preempted: list[Request] = field(default_factory=list)
    # (source, destination) blocks to copy before the step's forward writes anything
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.rows


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_batch: int,
        token_budget: int = 512,
        prefix_caching: bool = True,
    ) -> None:
        self.blocks = blocks
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.prefix_caching = prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out (finished or aborted) and release its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    def schedule(self) -> Schedule:
        out = Schedule()
        budget = self.token_budget
        # Running requests first: decoding ones (a token each), then those still taking their prompt,
        # oldest first. While another request waits for a row, a prompt takes at most half the budget,
        # so a short request arriving behind a long prompt starts within a step or two instead of after
        # the whole prompt (and no decoding request ever stalls behind a prefill).
        share = self.token_budget
        if self.waiting and len(self.running) < self.max_batch:
            share = max(1, self.token_budget // 2)
        order = [r for r in self.running if _left(r) <= 1] + [r for r in self.running if _left(r) > 1]
        preempted: set[int] = set()  # ids of requests this step preempted
        for request in order:
            if budget <= 0:
                break
            if id(request) in preempted:  # preempted while an earlier row grew
                continue
            n = min(_left(request), budget, share)
            while not self._grow(request, request.num_computed + n):
                # The newest running request gives way (the growing one itself, at the last), even one
                # given a row already: decoding rows go first, and sparing them preempted an older
                # request's prompt over and over, so under steady traffic it never finished.
                victim = self.running[-1]
                row = next((i for i, (r, _) in enumerate(out.rows) if r is victim), None)
                if row is not None:
                    budget += out.rows.pop(row)[1]
                self._preempt(victim)
                out.preempted.append(victim)
                preempted.add(id(victim))
                if victim is request:
                    break
            else:
                out.rows.append((request, n))
                budget -= n
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _admit(self, out: Schedule, budget: int) -> None:
        """Start waiting requests while rows, budget and blocks last.

        A request whose next prefix block is being computed right now by a running request waits for
        it instead of computing it again: copies of one prompt (``n > 1``) and concurrent requests with
        one system prompt share its KV.
        """
        pending = self._pending_hashes()
        held_back: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            if pending and self._next_block_pending(request, pending):  # wait to share it
                held_back.append(request)
                continue
            self._reuse_prefix(request)
            n = min(request.num_tokens - request.num_computed, budget)
            if not self._grow(request, request.num_computed + n):
                self._release(request)
                request.num_computed = 0
                self.waiting.appendleft(request)
                break
            if request.num_preemptions == 0 and self.prefix_caching:
                # counted once, when admitted: a request that waited for blocks looked up again next step
                self.blocks.record_lookup(request.num_tokens, request.num_computed)
            self.running.append(request)
            if request.scheduled_at is None:  # the end of its queue time (a preempted one's came before)
                request.scheduled_at = time.perf_counter()
            out.rows.append((request, n))
            if request.copy_source is not None:  # into the first block _grow gave it
                out.copies.append((request.copy_source, request.block_table[request.num_cached_blocks]))
                request.copy_source = None
            budget -= n
            pending |= self._unpublished(request)
        self.waiting.extendleft(reversed(held_back))

    def on_computed(self, request: Request) -> None:
        """Publish the request's newly full blocks in the prefix cache (after their K/V were written)."""
        if not self.prefix_caching:
            return
        full = request.num_computed // self.blocks.block_size
        if full <= request.num_cached_blocks:
            return
        hashes = self._hashes(request, full)
        for index in range(request.num_cached_blocks, full):
            self.blocks.cache_block(request.block_table[index], hashes[index])
        top, size = request.params.prompt_logprobs, self.blocks.block_size
        if top is not None:  # the engine has recorded the log-probabilities of the computed positions
            for index in range(request.num_cached_blocks, min(full, len(request.prompt_logprobs) // size)):
                entries = request.prompt_logprobs[index * size : (index + 1) * size]
                self.blocks.keep_logprobs(hashes[index], top, entries)
        request.num_cached_blocks = full

    # ---- internals ---------------------------------------------------------------------------------

    def _usable_blocks(self, request: Request) -> int:
        """Full blocks a new request may take from the cache: at least one token is left to compute
        (its logits give the next token)."""
        if not self.prefix_caching:
            return 0
        return (request.num_tokens - 1) // self.blocks.block_size

    @staticmethod
    def _logprobs_top(request: Request) -> int | None:
        """The alternatives per token a reused block must have kept, while the request still wants
        log-probabilities of prompt tokens; None when it needs none."""
        if len(request.prompt_logprobs) >= len(request.prompt_ids):
            return None
        return request.params.prompt_logprobs

    def _hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """Prefix hashes of the request's first ``num_blocks`` blocks, computed once and kept."""
        have = request.block_hashes
        if len(have) < num_blocks:
            size = self.blocks.block_size
            have += block_hashes(
                request.token_ids(len(have) * size, num_blocks * size),
                size,
                have[-1] if have else request.cache_key,
            )
        return have[:num_blocks]

    def _reuse_prefix(self, request: Request) -> None:
        """Start a new (or preempted) request on the cached blocks of its longest known prefix."""
        if request.block_table:
            return
        usable = self._usable_blocks(request)
        top = self._logprobs_top(request)
        hashes = self._hashes(request, usable)
        found = self.blocks.match_prefix(hashes, top) if usable else []
        size = self.blocks.block_size
        published, computed = len(found), len(found) * size
        if found and top is not None:
            if len(request.prompt_logprobs) < computed:  # one per token of the reused blocks
                request.prompt_logprobs = self._kept_logprobs(hashes[: len(found)], top)
            # The last block is copied: its last position is computed again, into the copy. Its source
            # is let go at once (it stays cached, last in line for eviction), so reusing needs no more
            # blocks than computing: even if this step hands it out again, or as the copy itself, its
            # K/V are intact until the forward, which makes the copies before it writes anything.
            request.copy_source = found.pop()
            self.blocks.free([request.copy_source])
            published, computed = published - 1, computed - 1
        if request.num_preemptions == 0 and self.prefix_caching:
            request.num_cached_tokens = computed
        request.block_table = found
        request.num_cached_blocks = published
        request.num_computed = computed

    def _kept_logprobs(self, hashes: list[bytes], top: int) -> list[TokenLogprob | None]:
        """The log-probabilities cached blocks kept for their tokens, cut to ``top`` alternatives."""
        entries: list[TokenLogprob | None] = []
        for h in hashes:
            _, kept = self.blocks.logprobs[h]
            entries += [e if e is None else TokenLogprob(e.token_id, e.logprob, e.top[:top]) for e in kept]
        return entries

    def _pending_hashes(self) -> set[bytes]:
        """Hashes of prefix blocks running requests are computing but have not published yet."""
        pending: set[bytes] = set()
        for request in self.running:
            pending |= self._unpublished(request)
        return pending

    def _unpublished(self, request: Request) -> set[bytes]:
        if not self.prefix_caching:
            return set()
        usable = (request.num_tokens - 1) // self.blocks.block_size
        if request.num_cached_blocks >= usable:
            return set()
        return set(self._hashes(request, usable)[request.num_cached_blocks :])

    def _next_block_pending(self, request: Request, pending: set[bytes]) -> bool:
        hashes = self._hashes(request, self._usable_blocks(request))
        top = self._logprobs_top(request)
        for h in hashes:
            if h not in self.blocks.cached or (top is not None and not self.blocks.has_logprobs(h, top)):
                return h in pending
        return False

    def _grow(self, request: Request, num_tokens: int) -> bool:
        need = self.blocks.blocks_needed(num_tokens) - len(request.block_table)
        if need <= 0:
            return True
        fresh = self.blocks.allocate(need)
        if fresh is None:
            return False
        request.block_table += fresh
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        request.copy_source = None  # admission rolled back: no copy to make
        self.blocks.free(request.block_table)
        request.block_table = []
        request.num_cached_blocks = 0


def _left(request: Request) -> int:
    """Tokens the request has yet to compute: one while it decodes, more while it takes its prompt."""
    return request.num_tokens - request.num_computed
