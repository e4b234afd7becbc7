"""Per-request token constraints (grammars) as the sampler sees them: a bitmask of allowed tokens.

The engine knows no grammar engine: ``SamplingParams.grammar`` is opaque text, and whoever enables
grammars (``qwenkit.tools.grammar``) installs a compiler that turns it into a ``TokenConstraint``. The
bitmask layout is the one grammar engines share (llguidance, xgrammar): int32 words, bit ``t % 32`` of
word ``t // 32`` set when token ``t`` is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class TokenConstraint(Protocol):
    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into ``row`` (int32, contiguous, CPU, ceil(V/32) words)."""

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False if the grammar rejects it."""

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the request can stop)."""


GrammarCompiler = Callable[[str], TokenConstraint]


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_from_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, W) int32 words -> (R, V) bool: which tokens each row may sample."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # (R, W, 32): bit j of word w is token 32w + j
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_constraints(logits: torch.Tensor, constraints: list[TokenConstraint | None]) -> torch.Tensor:
    """Set disallowed tokens to -inf in the constrained rows only; other rows are left untouched."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    V = logits.shape[1]
    bitmask = torch.zeros(len(rows), bitmask_words(V), dtype=torch.int32)
    for j, i in enumerate(rows):
        constraints[i].fill_bitmask(bitmask[j])
    allowed = allowed_from_bitmask(bitmask.to(logits.device), V)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits
