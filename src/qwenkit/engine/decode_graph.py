"""The decode step with static shapes, replayed as a CUDA graph.

A decode-only step (every row computes one token) is launch-bound on a GPU: about 1.5k small kernels
per step for a 7B model, each paying launch overhead that the GPU work of batch-1 decode cannot hide.
Capturing the step once per shape and replaying it removes that overhead; capture needs every tensor
the step reads to live at a fixed address and every shape to be fixed. So the step's inputs go into
one persistent buffer written in place each step, and attention reads a fixed number of KV blocks per
row (a context bucket: a power of two of blocks), masked by the row's position. Rows are padded up to a
batch bucket with dummy rows that write and read only a dummy KV block no sequence owns.

``static_decode_forward`` is the whole step as a plain function of those buffers, so on the CPU it runs
eagerly and is tested against the engine's ordinary path; ``DecodeGraphs`` runs it eagerly or captures
and replays it, one graph per (batch bucket, context bucket), on first use.

Notation: Bb rows in the batch bucket, nb blocks in the context bucket, S = nb * block_size keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qwenkit.engine.kv_cache import PagedKVCache
from qwenkit.model import Transformer
from qwenkit.model.moe import MoEMLP
from qwenkit.model.transformer import is_headless

log = logging.getLogger(__name__)

MIN_CONTEXT_TOKENS = 256  # the smallest context bucket: shorter ones save little and cost a capture
# Columns of the packed input buffer before the block table.
TOKEN, POSITION, SLOT, TABLE = 0, 1, 2, 3


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n``."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"{n} is larger than the largest bucket ({buckets[-1]})")


def context_blocks(length: int, block_size: int, max_blocks: int) -> int:
    """Blocks a row of ``length`` tokens reads: a power of two of at least MIN_CONTEXT_TOKENS, at most
    ``max_blocks``."""
    need = max(-(-length // block_size), -(-MIN_CONTEXT_TOKENS // block_size))
    blocks = 1
    while blocks < need:
        blocks *= 2
    return min(blocks, max_blocks)


class StaticDecodeAttention:
    """``qwenkit.model.KVCache`` for a decode step whose shapes depend only on the buckets.

    Every row reads all S slots of its bucket's blocks; keys after the row's position are masked, and
    their slots are pointed at the row's first slot (which always holds K/V), because a masked key
    still meets its value in weights @ V and the pool is uninitialized memory (0 * NaN is NaN).
    """

    def __init__(self, cache: PagedKVCache, packed: torch.Tensor) -> None:
        """packed: (Bb, TABLE + nb) long: token, position, slot to write, then the block table."""
        self.cache = cache
        size = cache.block_size
        tables = packed[:, TABLE:]
        positions = packed[:, POSITION]
        self.slot_mapping = packed[:, SLOT]  # (Bb,)
        offsets = torch.arange(size, device=packed.device)
        slots = (tables[:, :, None] * size + offsets).flatten(1)  # (Bb, S)
        keys = torch.arange(slots.shape[1], device=packed.device)
        visible = keys[None, :] <= positions[:, None]  # (Bb, S)
        self.gather = torch.where(visible, slots, slots[:, :1])
        # Additive, made once per step (a boolean mask is converted in every layer): (Bb, 1, 1, S),
        # broadcast over KV heads and query groups.
        hidden = torch.zeros(visible.shape, dtype=cache.k[0].dtype, device=packed.device)
        self.mask = hidden.masked_fill(~visible, float("-inf"))[:, None, None, :]

    def decode_pools(self) -> None:
        """Never: the static-shape step runs the modules (the shapes a CUDA graph captures)."""
        return None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (Bb, H, 1, D), k/v (Bb, Hkv, 1, D) -> (Bb, H, 1, D)."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc.index_copy_(0, self.slot_mapping, k[:, :, 0].to(kc.dtype))  # (Bb, Hkv, D)
        vc.index_copy_(0, self.slot_mapping, v[:, :, 0].to(vc.dtype))
        rows, heads, _, dim = q.shape
        kv_heads = k.shape[1]
        keys = kc[self.gather].transpose(1, 2)  # (Bb, Hkv, S, D)
        values = vc[self.gather].transpose(1, 2)
        # Grouped-query attention with one query per row: the G query heads that share a KV head are
        # the G "query positions" of that head, so K/V are read once, never repeated per query head.
        grouped = q.reshape(rows, kv_heads, heads // kv_heads, dim)  # (Bb, Hkv, G, D)
        mask = self.mask if self.mask.dtype == q.dtype else self.mask.to(q.dtype)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
        return out.reshape(rows, heads, 1, dim)


def static_decode_forward(model: Transformer, cache: PagedKVCache, packed: torch.Tensor) -> torch.Tensor:
    """One decode step over the packed inputs (Bb, TABLE + nb): float32 logits (Bb, V).

    Only tensor operations with shapes fixed by ``packed``: no host syncs, no branches on values.
    """
    ids = packed[:, TOKEN : TOKEN + 1]  # (Bb, 1)
    positions = packed[:, POSITION : POSITION + 1]
    attention = StaticDecodeAttention(cache, packed)
    return model(ids, positions=positions, cache=attention)[:, 0].float()


def supports_static_decode(model: Transformer) -> str | None:
    """Why this model cannot take the static decode path, or None if it can."""
    if any(isinstance(m, MoEMLP) for m in model.modules()):
        return "mixture-of-experts layers pick experts on the host"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "tensor-parallel ranks exchange activations between processes"
    if getattr(model, "adapters", None) is not None:
        return "served LoRA adapters group each step's tokens by adapter on the host"
    if is_headless(model):
        return "the model has no output head to run"
    return None


class DecodeGraphs:
    """Runs decode-only steps through ``static_decode_forward``: captured as CUDA graphs (``capture``)
    or eagerly (the CPU, and tests)."""

    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        max_batch: int,
        max_seq_len: int,
        dummy_block: int,
        capture: bool,
    ) -> None:
        self.model, self.cache, self.capture = model, cache, capture
        self.block_size = cache.block_size
        self.max_blocks = -(-max_seq_len // self.block_size)
        self.batch_buckets = batch_buckets(max_batch)
        self.dummy_block = dummy_block
        self.packed = torch.zeros(
            (self.batch_buckets[-1], TABLE + self.max_blocks), dtype=torch.long, device=cache.device
        )
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._stream = None
        self.disabled: str | None = None  # why capture failed, once it has
        self.shapes_run: set[tuple[int, int]] = set()  # (batch bucket, context blocks) seen

    def accepts(self, num_rows: int, alphas: Sequence[float]) -> bool:
        return self.disabled is None and num_rows <= self.batch_buckets[-1] and all(a == 1.0 for a in alphas)

    def run(self, rows: Sequence[tuple[int, int, Sequence[int]]]) -> torch.Tensor:
        """rows: (token id, position, block table) per decoding row -> float32 logits (len(rows), V).

        The result may be a view of graph memory: use it before the next ``run``."""
        width = bucket_for(len(rows), self.batch_buckets)
        blocks = context_blocks(max(pos for _, pos, _ in rows) + 1, self.block_size, self.max_blocks)
        view = self.packed[:width, : TABLE + blocks]
        key = (width, blocks)
        self.shapes_run.add(key)
        if self.capture and key not in self.graphs:
            self._capture(key, view)
        view.copy_(self._host_rows(rows, width, blocks), non_blocking=True)
        if self.capture and key in self.graphs:
            graph, logits = self.graphs[key]
            graph.replay()
        else:
            logits = static_decode_forward(self.model, self.cache, view)
        return logits[: len(rows)]

    def _host_rows(
        self, rows: Sequence[tuple[int, int, Sequence[int]]], width: int, blocks: int
    ) -> torch.Tensor:
        size, dummy = self.block_size, self.dummy_block
        packed = []
        for token, pos, table in rows:
            table = list(table[:blocks])
            slot = table[pos // size] * size + pos % size
            packed.append([token, pos, slot, *table, *[dummy] * (blocks - len(table))])
        pad = [0, 0, dummy * size] + [dummy] * blocks  # token 0 at position 0 in the dummy block
        packed += [pad] * (width - len(rows))
        return torch.tensor(packed, dtype=torch.long)

    def _capture(self, key: tuple[int, int], view: torch.Tensor) -> None:
        """Capture the step for one bucket pair over dummy rows (their writes go to the dummy block).
        A failure disables capture for this engine, with one warning; steps then run eagerly."""
        width, blocks = key
        view.copy_(self._host_rows([], width, blocks))
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
                self._stream = torch.cuda.Stream(device=self.cache.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.cache.device))
            with torch.cuda.stream(self._stream):  # warm-up: lazy initialisation outside the capture
                static_decode_forward(self.model, self.cache, view)
            torch.cuda.current_stream(self.cache.device).wait_stream(self._stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"
            ):
                logits = static_decode_forward(self.model, self.cache, view)
        except Exception as e:  # any failure to capture falls back to the eager step
            self.disabled = f"{type(e).__name__}: {e}"
            self.capture = False
            log.warning("CUDA graph capture failed, decoding without graphs: %s", self.disabled)
            return
        self.graphs[key] = (graph, logits)
