"""The block manager: which KV blocks are free, who holds each one, and which hold a known prefix.

Pure Python (no tensors), so it is tested without a model. The KV pool is cut into fixed-size blocks;
a sequence holds a list of them (its block table). A block that is full is identified by a hash of its
tokens and of everything before it (plus a key for anything else that changes its K/V, such as Qwen
v1's NTK alpha), so a later request with the same prefix reuses it instead of recomputing. Blocks no
one holds stay cached in least-recently-freed order until the pool needs them.

A cached block may also keep the log-probabilities of its tokens (a request that asked for its prompt's
computed them), so a later scoring request with the same prefix reads them instead of recomputing the
block: they depend on the same tokens and key as its K/V.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any


def block_hashes(token_ids: Sequence[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """The chained hash of every full block of ``token_ids`` (a partial last block has none).

    ``parent`` is the hash of the block before the first one, or for a sequence's first block a key
    for whatever besides the tokens changes its K/V.
    """
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        chunk = array("q", token_ids[start : start + block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding that prefix
        # hash -> (alternatives per token, its tokens' log-probabilities), while the hash is cached
        self.logprobs: dict[bytes, tuple[int, list[Any]]] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # evict from front
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running sequences (cached but unheld blocks count as free)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, hashes: Sequence[bytes], logprobs_top: int | None = None) -> list[int]:
        """Take a reference on the cached blocks of the longest known prefix; return them. With
        ``logprobs_top``, the prefix ends at the first block not keeping its tokens' log-probabilities
        with at least that many alternatives."""
        found: list[int] = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None or (logprobs_top is not None and not self.has_logprobs(h, logprobs_top)):
                break
            found.append(block)
        for block in found:
            self._take(block)
        return found

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += queried_tokens
        self.prefix_hits += hit_tokens

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks (evicting the least recently freed cached ones), or None if too few."""
        if n > self.num_free:
            return None
        blocks = []
        for _ in range(n):
            block, _ = self.free_queue.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block. Tail blocks go first, so they are evicted first."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None

    def cache_block(self, block: int, block_hash: bytes) -> None:
        """Publish a full block under its prefix hash (a duplicate computed in parallel stays private)."""
        if self.block_hash[block] is None and block_hash not in self.cached:
            self.block_hash[block] = block_hash
            self.cached[block_hash] = block

    def keep_logprobs(self, block_hash: bytes, top: int, entries: list[Any]) -> None:
        """Keep a cached block's per-token log-probabilities (with ``top`` alternatives each)."""
        if block_hash in self.cached and not self.has_logprobs(block_hash, top):
            self.logprobs[block_hash] = (top, entries)

    def has_logprobs(self, block_hash: bytes, top: int) -> bool:
        kept = self.logprobs.get(block_hash)
        return kept is not None and kept[0] >= top

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.logprobs.pop(h, None)
            self.block_hash[block] = None
