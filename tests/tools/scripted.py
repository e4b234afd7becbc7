"""A real model whose choices a test steers: the engine, detokenizer, server and parsers all run for real,
but after the prompt the logits favour a scripted reply (as if a trained Qwen had written it).

Random tiny models never choose to call a tool; this stands in for the trained model's decision while
every layer above the logits is exercised unchanged.
"""

from __future__ import annotations

import torch


class ScriptedModel(torch.nn.Module):
    """Wraps a Transformer; ``play(prompt_len, ids)`` makes the next request with that prompt length
    produce ``ids`` (then its end-of-turn token). Other requests get the model's own logits."""

    def __init__(self, inner: torch.nn.Module, end_id: int) -> None:
        super().__init__()
        self.inner, self.end_id = inner, end_id
        self.config, self.model = inner.config, inner.model
        self.script: tuple[int, list[int]] | None = None

    def play(self, prompt_len: int, ids: list[int]) -> None:
        self.script = (prompt_len, [*list(ids), self.end_id])

    def ntk_alpha(self, n: int) -> float:
        return self.inner.ntk_alpha(n)

    def forward(self, ids, *, positions, logits_index, **kwargs):
        logits = self.inner(ids, positions=positions, logits_index=logits_index, **kwargs)
        if self.script is not None:
            prompt_len, seq = self.script
            for row, pos in enumerate(positions[0, logits_index].tolist()):
                k = pos + 1 - prompt_len
                if 0 <= k < len(seq):
                    logits[row, seq[k]] = logits[row].max() + 50.0
        return logits
