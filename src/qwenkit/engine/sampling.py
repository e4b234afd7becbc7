"""Sampling parameters: what a request asks of the sampler (``sampler.py`` applies them, batched)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenkit.errors import QwenkitError


class SamplingParamsError(QwenkitError, ValueError):
    """A sampling parameter is out of range."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # Qwen/transformers multiplicative form over prompt + output
    presence_penalty: float = 0.0  # OpenAI additive forms over the output so far
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # return each token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (for evaluation); no prefix cache
    stop: tuple[str, ...] = field(default=())  # stop strings: applied by the text layer, not the engine
    # A grammar the output must match (the grammar engine's own text, e.g. llguidance's); compiled by the
    # engine's ``grammar_compiler`` into a per-request token mask. A string keeps the params hashable.
    grammar: str | None = None
    # The served LoRA adapter this request runs through, by name (``model.served_adapters``); None: the
    # engine's default (the base model, or the one adapter loaded with ``--adapter``).
    adapter: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (
                self.max_tokens >= 1 or (self.max_tokens == 0 and self.prompt_logprobs is not None),
                f"max_tokens must be >= 1 (0 only with prompt_logprobs), got {self.max_tokens}",
            ),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= 20,
                f"logprobs must be in [0, 20], got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingParamsError(message)

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or so close to it that dividing by it would overflow) means argmax."""
        return self.temperature < GREEDY_BELOW


GREEDY_BELOW = 1e-5
