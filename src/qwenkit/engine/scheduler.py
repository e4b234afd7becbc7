"""Decide what runs in the next step. Pure Python, testable without a model.

Each running request is described by two numbers: tokens computed (in the KV cache) and tokens known
(prompt + output). A request in decode has exactly one token to compute; one in prefill has the rest of
its prompt, taken in chunks of at most ``prefill_chunk`` tokens so a long prompt does not stall the
decoding of everyone else. New requests join as slots free up.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwenkit.engine.request import Request


@dataclass
class Schedule:
    prefill: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens this step)
    decode: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, max_batch: int, prefill_chunk: int, prefill_budget: int | None = None) -> None:
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget or prefill_chunk  # prompt tokens computed per step, all rows
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def admit(self, free_slots: int) -> list[Request]:
        """Move waiting requests to running while there are free slots; return those admitted."""
        admitted = []
        while self.waiting and free_slots > 0 and len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            self.running.append(request)
            admitted.append(request)
            free_slots -= 1
        return admitted

    def schedule(self) -> Schedule:
        out = Schedule()
        budget = self.prefill_budget
        for request in self.running:
            if request.in_prefill:
                if budget <= 0:
                    continue
                n = min(len(request.prompt_ids) - request.num_computed, self.prefill_chunk, budget)
                out.prefill.append((request, n))
                budget -= n
            else:
                out.decode.append(request)
        return out

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
