"""One engine forward as plain data (``ForwardCall``) and running it over a KV pool.

The engine decides what a step computes (which tokens, at which positions, in which KV blocks); this
module only runs it. Keeping the decision as plain lists lets another process replay the very same
forward on its own shard of the model and its own pool of the same layout (``lockstep``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwenkit.engine.kv_cache import PagedKVCache, StepAttention
from qwenkit.engine.sampler import on_kernels
from qwenkit.model import Transformer
from qwenkit.model.adapter_bank import LoRAPair


@dataclass
class ForwardCall:
    ids: list[int]  # the step's new tokens, all rows side by side (decoding rows first)
    positions: list[int]
    ntk_alphas: list[float] | None  # per token, or None when every alpha is 1
    logits_index: list[int]  # which tokens get logits
    decode_rows: list[tuple[list[int], int]]  # (block table, position) of one-token rows
    chunk_rows: list[tuple[list[int], int, int]]  # (block table, start, length) of the other rows
    adapter_slots: list[int] | None = None  # per token, with served adapters
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination), first
    hidden_index: list[int] = field(default_factory=list)  # which tokens' final-norm hidden states (embed)


@dataclass
class AdapterWrite:
    """An adapter the leader's engine wrote into ``slot`` between two steps, its pairs whole (each
    follower takes its own slices), for the other ranks to write into theirs before the next forward."""

    slot: int
    name: str
    pairs: dict[str, LoRAPair]


def run_forward(model: Transformer, cache: PagedKVCache, call: ForwardCall) -> torch.Tensor:
    """Write the step's K/V into the pool and return the logits (K, V) at ``call.logits_index``: float32,
    or the model's bfloat16 ones where the CPU kernels' row passes read them (``sampler.on_kernels``; the
    sampler widens what torch must see)."""
    return run_forward_with_hidden(model, cache, call)[0]


def run_forward_with_hidden(
    model: Transformer, cache: PagedKVCache, call: ForwardCall
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``run_forward``, and the final-norm hidden states (H, hidden) at ``call.hidden_index`` (embed
    requests), float32, or None where it is empty."""
    dev = cache.device
    cache.copy_blocks(call.block_copies)
    attention = StepAttention(cache, call.decode_rows, call.chunk_rows)
    # every token's logits, in order (a decode step): no index op (torch's runs on OpenMP at 16 rows)
    every = call.logits_index == list(range(len(call.ids)))
    hidden_index = None
    if call.hidden_index:
        every = False
        hidden_index = torch.tensor(call.hidden_index, dtype=torch.long, device=dev)
    out = model(
        torch.tensor([call.ids], dtype=torch.long, device=dev),
        positions=torch.tensor([call.positions], dtype=torch.long, device=dev),
        cache=attention,
        ntk_alphas=torch.tensor([call.ntk_alphas]) if call.ntk_alphas is not None else None,
        logits_index=None if every else torch.tensor(call.logits_index, dtype=torch.long, device=dev),
        adapter_slots=call.adapter_slots,
        hidden_index=hidden_index,
    )
    logits, hidden = out if hidden_index is not None else (out, None)
    logits = logits[0] if every else logits  # (1, N, V) -> (N, V)
    return (logits if on_kernels(logits) else logits.float()), (None if hidden is None else hidden.float())
