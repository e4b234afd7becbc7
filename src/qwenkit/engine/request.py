"""A generation request and its state inside the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from qwenkit.engine.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model, and the top alternatives when asked for."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    slot: int | None = None
    finish_reason: FinishReason | None = None
    ntk_alpha: float = 1.0
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # bool (V,), for the repetition penalty
    output_counts: torch.Tensor | None = None  # int (V,), for presence/frequency penalties
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """Still computing the prompt (the last prompt token's logits give the first output token)."""
        return self.num_computed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
