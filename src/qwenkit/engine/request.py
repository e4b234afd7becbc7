"""A generation request and its state inside the engine."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

import torch

from qwenkit.engine.constraint import TokenConstraint
from qwenkit.engine.sampling import SamplingParams
from qwenkit.engine.token_counts import TokenCounts

FinishReason = Literal["stop", "length", "abort", "error"]
RequestId = Hashable


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model, and the top alternatives when asked for."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(eq=False)  # identity, not field-wise equality: the scheduler looks requests up by object
class Request:
    id: RequestId
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already published in the prefix cache
    copy_source: int | None = None  # a cached block to copy into its block table's next, at admission
    block_hashes: list[bytes] = field(default_factory=list)  # prefix hashes of full blocks, kept
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    finish_reason: FinishReason | None = None
    error: str | None = None
    ntk_alpha: float = 1.0
    adapter_slot: int = 0  # the served adapter its tokens run through (0: the base model)
    cache_key: bytes = b""  # mixed into block hashes: what besides the tokens changes the K/V
    generator: torch.Generator | None = None
    seen: TokenCounts | None = None  # prompt and output tokens, for the repetition penalty
    output_counts: TokenCounts | None = None  # output tokens, counted, for presence/frequency penalties
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    num_preemptions: int = 0
    scheduled_at: float | None = None  # perf_counter() time the scheduler first admitted it
    constraint: TokenConstraint | None = None  # the grammar's state, when params.grammar is set
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None = None  # params.logit_bias: ids, values

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``start..end - 1`` of the prompt and output together, without joining the whole
        sequence: a decode step asks each row for one token, and the join cost the step O(context) a row."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : end - p]
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
