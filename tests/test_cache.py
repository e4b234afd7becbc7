"""Cache: generation with the KV cache equals recomputing without it."""

from __future__ import annotations

import torch
from factories import hf_model, save_hf

from qwenkit.checkpoint import load_model
from qwenkit.engine.kv_cache import SlotKVCache


def test_cached_logits_equal_recomputed(tmp_path):
    model = load_model(save_hf(hf_model("qwen3"), tmp_path / "m"), dtype="float32")[0]
    cfg = model.config
    seqs = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in (30, 17)]
    cache = SlotKVCache(
        cfg.num_hidden_layers,
        4,
        cfg.num_key_value_heads,
        cfg.head_dim,
        128,
        torch.float32,
        "cpu",
        initial_len=16,
    )  # small start: storage must grow mid-sequence
    slots = [2, 0]  # non-contiguous slots exercise the gather path
    done = [0, 0]
    with torch.no_grad():
        # Feed both sequences in uneven chunks, batched together, then compare every chunk's logits.
        for chunk in (5, 9, 1, 1, 7, 1):
            rows = [(b, min(chunk, len(s) - done[b])) for b, s in enumerate(seqs) if done[b] < len(s)]
            T = max(n for _, n in rows)
            ids = torch.zeros(len(rows), T, dtype=torch.long)
            pos = torch.zeros(len(rows), T, dtype=torch.long)
            for i, (b, n) in enumerate(rows):
                ids[i, :n] = seqs[b][done[b] : done[b] + n]
                pos[i] = torch.arange(done[b], done[b] + T)
            view = cache.view([slots[b] for b, _ in rows], [done[b] for b, _ in rows], T)
            logits = model(ids, positions=pos, cache=view)
            for i, (b, n) in enumerate(rows):
                full = model(seqs[b][None, : done[b] + n])[0, done[b] : done[b] + n]
                assert (logits[i, :n] - full).abs().max() < 1e-4
                done[b] += n
    assert cache.capacity >= 30
