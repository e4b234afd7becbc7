"""The paged KV pool and the attention a step runs over it.

Storage per layer: K and V of shape (num_blocks * block_size, Hkv, D), one row per token slot; a
sequence's tokens live in the blocks of its block table, wherever those are. A step's batch is flat:
all rows' new tokens side by side (no padding through the linear layers). ``StepAttention`` is what the
model sees (``qwenkit.model.KVCache``): it writes the step's k/v into their slots and attends, decoding
rows together (one query each, keys gathered and masked to each row's length) and each prompt chunk on
its own (plain causal attention when the chunk starts the sequence, gathered keys otherwise). With
qwenkit's CPU kernels and a bf16 pool, decoding rows read their keys in place in one kernel call
(``kernels.decode_attention``) instead of a gathered copy and SDPA, and so do prompt chunks where AMX
runs (``kernels.prefill_attention``: no copy, no mask; 1.2-2.2x the SDPA path a layer).

Notation: N new tokens this step, Bd decoding rows, S keys visible, H / Hkv query / KV heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.model.attention import DecodePools


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        # torch.empty: on the CPU, pages are only backed by memory once a block is first written.
        self.k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy every layer's K/V of block ``source`` into block ``destination``, for each pair."""
        if not pairs:
            return
        size = self.block_size
        offsets = torch.arange(size, device=self.device)
        source = (torch.tensor([s for s, _ in pairs], device=self.device)[:, None] * size + offsets).flatten()
        target = (torch.tensor([d for _, d in pairs], device=self.device)[:, None] * size + offsets).flatten()
        for pool in self.k + self.v:
            pool[target] = pool[source]

    def slots(self, block_tables: list[list[int]], length: int) -> torch.Tensor:
        """Slot index of every position [0, length) of each sequence: (rows, length). Positions past a
        sequence's blocks point at its last block (callers mask them)."""
        width = -(-length // self.block_size)
        padded = [t[:width] + [t[-1]] * (width - len(t)) for t in block_tables]
        tables = torch.tensor(padded, device=self.device)  # (rows, blocks)
        offsets = torch.arange(self.block_size, device=self.device)
        return (tables[:, :, None] * self.block_size + offsets).flatten(1)[:, :length]


@dataclass
class _ChunkRow:
    offset: int  # where the row's tokens start in the step's flat batch
    length: int
    start: int  # the position of its first token
    slots: torch.Tensor  # (start + length,) slot of every key the row sees
    mask: torch.Tensor | None = None  # SDPA's (1, 1, length, S) additive mask, made on first use
    _positions: torch.Tensor | None = None

    def positions(self) -> torch.Tensor:
        """The positions of the row's tokens (made on first use, kept for the step's other layers)."""
        if self._positions is None:
            self._positions = torch.arange(self.start, self.start + self.length, device=self.slots.device)
        return self._positions


# decode_attention keeps every (query, 128-key block, KV head)'s partial softmax until it combines them:
# queries go in groups whose partials stay under this (a 7B shape's 512 queries at 32k keys would want ~2 GB)
PARTIALS_BYTES = 64 << 20


def kernel_attention_runs(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether :func:`chunk_attention` and ``kernels.decode_attention`` take K/V of this dtype, device and
    head size (bf16 on the CPU with qwenkit's kernels); elsewhere torch's SDPA attends."""
    return dtype == torch.bfloat16 and device.type == "cpu" and head_dim % 16 == 0 and kernels.available()


def chunk_attention(
    queries: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    slots: torch.Tensor,
    start: int,
    scale: float,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a run of n queries (n, H, D) at positions start .. start + n - 1 over the keys
    at ``slots`` (start + n,) of the pools (where :func:`kernel_attention_runs`): as tiles on AMX
    (``kernels.prefill_attention``), elsewhere each query as a decoding row (one gather row, shared). A
    query's arithmetic depends on its position and keys alone, so how a prompt is cut into runs, and what
    runs beside it, never changes its bits (torch's SDPA rounds a query's result by the call's query
    count). ``positions``: the queries' positions, where the caller keeps them between layers."""
    n, heads, dim = queries.shape
    if kernels.prefill_attention_runs(dim):
        return kernels.prefill_attention(queries, kc, vc, slots, start, scale)
    if positions is None:
        positions = torch.arange(start, start + n, device=slots.device)
    per_query = heads * (dim + 2) * 4 * (-(-(start + n) // 128))
    group = max(1, PARTIALS_BYTES // per_query)
    gather = slots[None].expand(n, -1)
    parts = [
        kernels.decode_attention(
            queries[i : i + group], kc, vc, gather[i : i + group], positions[i : i + group], scale
        )
        for i in range(0, n, group)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class StepAttention:
    """Implements ``qwenkit.model.KVCache`` for one step; built once, used by every layer."""

    def __init__(
        self,
        cache: PagedKVCache,
        decode_rows: list[tuple[list[int], int]],
        chunk_rows: list[tuple[list[int], int, int]],
    ) -> None:
        """decode_rows: (block table, position) of rows with one new token, which come first in the
        flat batch; chunk_rows: (block table, start, length) of rows with several, in batch order."""
        self.cache = cache
        dev = cache.device
        writes: list[torch.Tensor] = []  # slots the step's new tokens go to, in batch order
        self.num_decode = len(decode_rows)
        self.decode_gather: torch.Tensor | None = None
        self.decode_mask: torch.Tensor | None = None
        self._ragged = False
        if decode_rows:
            pos_list = [pos for _, pos in decode_rows]
            span = max(pos_list) + 1
            gather = cache.slots([table for table, _ in decode_rows], span)  # (Bd, S)
            size = cache.block_size
            new_slots = [table[pos // size] * size + pos % size for table, pos in decode_rows]
            positions, decode_slots = torch.tensor([pos_list, new_slots], device=dev)  # one tensor made
            writes.append(decode_slots)
            self.decode_gather = gather  # the kernels read a row's keys 0..its position alone
            self.decode_positions = positions
            self._ragged = min(pos_list) != span - 1  # SDPA's rows need a mask (``_sdpa_decode``)
        self.chunks: list[_ChunkRow] = []
        offset = self.num_decode
        for table, start, n in chunk_rows:
            row_slots = cache.slots([table], start + n)[0]
            writes.append(row_slots[start:])
            self.chunks.append(_ChunkRow(offset, n, start, row_slots))
            offset += n
        self.slot_mapping = torch.cat(writes) if len(writes) > 1 else writes[0]  # (N,)
        # Decoding rows read their keys in place, in one kernel call per layer (qwenkit's CPU kernels);
        # prompt chunks too: on AMX as tiles (kernels.prefill_attention), elsewhere each query as a
        # decoding row (kernels.decode_attention). Either way a query's arithmetic depends only on its
        # position and keys, never on how the prompt was cut into steps or what else a step holds
        # (torch's SDPA, which the other paths use, rounds a query's result by the call's query count).
        # On the Zen 4 (2 cores, 2026-12-06) the decoding-row form also ran the bundled model's 512- and
        # 2,048-token prompts 5-15% faster than SDPA.
        pool = cache.k[0]
        self.fast_decode = kernel_attention_runs(pool.dtype, pool.device, pool.shape[-1])

    def decode_pools(self) -> DecodePools | None:
        """The pools and this step's slots, gather table and positions when every row of the step decodes
        one token on the fast kernels, few enough for ``kernels.decode_layers`` to run whole layers; else
        None (each layer then writes the step's K/V itself, in ``attend``)."""
        if self.chunks or not self.fast_decode or self.num_decode > kernels.SMALL_OP_ROWS:
            return None
        return DecodePools(
            self.cache.k, self.cache.v, self.slot_mapping, self.decode_gather, self.decode_positions
        )

    def _sdpa_decode(self) -> None:
        """Once a step, for SDPA's decoding rows at different positions: the mask of the keys each row
        sees, and its gather padded past them. Made on first use: the kernels need neither, and over a
        long context the (rows, keys) mask and padding were a step's biggest tensors."""
        if not self._ragged or self.decode_mask is not None:
            return
        gather, positions = self.decode_gather, self.decode_positions
        visible = (
            torch.arange(gather.shape[1], device=gather.device)[None, :] <= positions[:, None]
        )  # (Bd, S)
        self.decode_mask = visible[:, None, None, :]  # (Bd, 1, 1, S)
        # A masked key still meets its value in (weights @ V): 0 * NaN is NaN, and the pool is
        # uninitialized memory. Padding reads the row's own first slot, which always holds K/V.
        self.decode_gather = torch.where(visible, gather, gather[:, :1])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, Hkv, N, D) for the step's tokens -> attention output (1, H, N, D)."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc.index_copy_(0, self.slot_mapping, k[0].transpose(0, 1).to(kc.dtype))  # (N, Hkv, D)
        vc.index_copy_(0, self.slot_mapping, v[0].transpose(0, 1).to(vc.dtype))
        gqa = q.shape[1] != k.shape[1]
        parts: list[torch.Tensor] = []  # each (H, n, D)
        if self.num_decode and self.fast_decode and q.dtype == torch.bfloat16:
            qd = q[0, :, : self.num_decode].transpose(0, 1)  # (Bd, H, D)
            scale = q.shape[-1] ** -0.5
            out = kernels.decode_attention(qd, kc, vc, self.decode_gather, self.decode_positions, scale)
            parts.append(out.transpose(0, 1))  # (H, Bd, D)
        elif self.num_decode:
            self._sdpa_decode()
            qd = q[0, :, : self.num_decode].transpose(0, 1)[:, :, None]  # (Bd, H, 1, D)
            keys = kc[self.decode_gather].transpose(1, 2)  # (Bd, Hkv, S, D)
            values = vc[self.decode_gather].transpose(1, 2)
            out = F.scaled_dot_product_attention(
                qd, keys, values, attn_mask=self.decode_mask, enable_gqa=gqa
            )  # (Bd, H, 1, D)
            parts.append(out[:, :, 0].transpose(0, 1))
        for row in self.chunks:
            qr = q[:, :, row.offset : row.offset + row.length]  # (1, H, n, D)
            if self.fast_decode and q.dtype == torch.bfloat16 and not q.requires_grad:
                scale, queries = q.shape[-1] ** -0.5, qr[0].transpose(0, 1)  # (n, H, D)
                out = chunk_attention(queries, kc, vc, row.slots, row.start, scale, row.positions())
                parts.append(out.transpose(0, 1))  # (H, n, D)
                continue
            if row.start == 0:
                kr = k[:, :, row.offset : row.offset + row.length]
                vr = v[:, :, row.offset : row.offset + row.length]
                out = F.scaled_dot_product_attention(qr, kr, vr, is_causal=row.length > 1, enable_gqa=gqa)
            else:
                if row.mask is None:  # additive, made once a step (SDPA converts a bool mask every call)
                    keys = torch.arange(row.start + row.length, device=q.device)
                    hidden = keys[None, :] > keys[row.start :, None]
                    row.mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device)
                    row.mask = row.mask.masked_fill_(hidden, float("-inf"))[None, None]
                kr = kc[row.slots].transpose(0, 1)[None]  # (1, Hkv, S, D)
                vr = vc[row.slots].transpose(0, 1)[None]
                out = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=row.mask, enable_gqa=gqa)
            parts.append(out[0])
        return torch.cat(parts, dim=1)[None] if len(parts) > 1 else parts[0][None]
