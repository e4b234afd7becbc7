"""Decide what runs in the next step. Pure Python, testable without a model.

Each request is described by two numbers: tokens computed (K/V in the cache) and tokens known (prompt +
output). There are no prefill and decode modes: a step gives every running request the tokens it has
left to compute (one, for a request that is decoding), within a per-step token budget, so a long prompt
is taken in chunks and never stalls the others. Running requests are served first; waiting ones join
when there are free batch rows and KV blocks for them. When the pool runs dry mid-generation, the newest
running request is preempted: its blocks are freed and it is recomputed later (its prefix blocks are
usually still cached), never corrupted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwenkit.engine.blocks import BlockManager, block_hashes
from qwenkit.engine.request import Request


@dataclass
class Schedule:
    rows: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens to compute)
    preempted: list[Request] = field(default_factory=list)

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

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

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
        taken: set[int] = set()  # ids of requests this step computes, or preempted by it
        for request in order:
            if budget <= 0:
                break
            if id(request) in taken:  # preempted while an earlier row grew
                continue
            n = min(_left(request), budget, share)
            while not self._grow(request, request.num_computed + n):
                # the newest request not in this step gives way (the growing one itself, at the last)
                victim = next((r for r in reversed(self.running) if id(r) not in taken), request)
                self._preempt(victim)
                out.preempted.append(victim)
                taken.add(id(victim))
                if victim is request:
                    break
            else:
                out.rows.append((request, n))
                taken.add(id(request))
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
            self.running.append(request)
            out.rows.append((request, n))
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
        request.num_cached_blocks = full

    # ---- internals ---------------------------------------------------------------------------------

    def _usable_blocks(self, request: Request) -> int:
        """Full blocks a new request may take from the cache: at least one token is left to compute
        (its logits give the next token); a request that wants prompt log-probabilities takes none."""
        if not self.prefix_caching or request.params.prompt_logprobs is not None:
            return 0
        return (request.num_tokens - 1) // self.blocks.block_size

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
        found = self.blocks.match_prefix(self._hashes(request, usable)) if usable else []
        size = self.blocks.block_size
        if request.num_preemptions == 0 and self.prefix_caching:
            self.blocks.record_lookup(request.num_tokens, len(found) * size)
            request.num_cached_tokens = len(found) * size
        request.block_table = found
        request.num_cached_blocks = len(found)
        request.num_computed = len(found) * size

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
        for h in hashes:
            if h not in self.blocks.cached:
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
        self.blocks.free(request.block_table)
        request.block_table = []
        request.num_cached_blocks = 0


def _left(request: Request) -> int:
    """Tokens the request has yet to compute: one while it decodes, more while it takes its prompt."""
    return request.num_tokens - request.num_computed
