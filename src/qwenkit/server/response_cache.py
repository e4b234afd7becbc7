"""A bounded LRU of finished completions for repeated identical deterministic requests.

Only requests whose output is fixed by their input are cached: greedy, or sampled with a seed. The key
is the prompt's token ids plus every sampling parameter, so any difference is a miss.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import astuple

from qwenkit.engine import SamplingParams
from qwenkit.generate import Completion


class ResponseCache:
    def __init__(self, max_entries: int = 512) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Completion] = OrderedDict()
        # adapter name -> how many times its weights changed: a key holds the count when it was made,
        # so an answer that finishes on old weights after a change is stored where no one looks
        self._changes: dict[str | None, int] = {}

    @staticmethod
    def caches(params: SamplingParams) -> bool:
        """Whether answers under ``params`` are fixed by their input, so stored and reused."""
        return params.greedy or params.seed is not None

    def key(self, prompt_ids: list[int], params: SamplingParams) -> tuple | None:
        if not self.caches(params):
            return None
        weights = (params.adapter, self._changes.get(params.adapter, 0))
        return (weights, tuple(prompt_ids), astuple(params))

    def forget(self, adapter: str) -> None:
        """Adapter ``adapter``'s weights changed: drop its answers, and never store one made before."""
        self._changes[adapter] = self._changes.get(adapter, 0) + 1
        for key in [k for k in self._entries if k[0][0] == adapter]:
            del self._entries[key]

    def get(self, key: tuple | None) -> Completion | None:
        if key is None or key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return copy.deepcopy(self._entries[key])

    def put(self, key: tuple | None, completion: Completion) -> None:
        if key is None or self.max_entries <= 0 or completion.finish_reason not in ("stop", "length"):
            return
        self._entries[key] = copy.deepcopy(completion)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
