"""Sampling parameters: what a request asks of the sampler (``sampler.py`` applies them, batched)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import itemgetter

from qwenkit.errors import QwenkitError


class SamplingParamsError(QwenkitError, ValueError):
    """A sampling parameter is out of range."""


class PromptTooLongError(SamplingParamsError):
    """A prompt is past the context window (or an embedding model's max_seq_length): the server's
    ``context_length_exceeded``, on every route."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, vLLM's and the server's "off", kept as 0) -> off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # Qwen/transformers multiplicative form over prompt + output
    presence_penalty: float = 0.0  # OpenAI additive forms over the output so far
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # return each token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (for evaluation)
    stop: tuple[str, ...] = field(default=())  # stop strings: applied by the text layer, not the engine
    include_stop_str_in_output: bool = False  # the text ends with the stop string that ended it (vLLM's)
    # (token id, value) pairs added to the logits before penalties and sampling (OpenAI's logit_bias:
    # -100 bans a token, +100 all but forces it); a dict is accepted and kept as sorted pairs
    logit_bias: tuple[tuple[int, float], ...] = ()
    # A grammar the output must match (the grammar engine's own text, e.g. llguidance's); compiled by the
    # engine's ``grammar_compiler`` into a per-request token mask. A string keeps the params hashable.
    grammar: str | None = None
    # The served LoRA adapter this request runs through, by name (``model.served_adapters``); None: the
    # engine's default (the base model, or the one adapter loaded with ``--adapter``).
    adapter: str | None = None
    # vLLM's: eos and stop_token_ids cannot be sampled, and no stop string is found, until this many tokens
    min_tokens: int = 0
    # An embedding request: the prompt is computed and its last token's final-norm hidden state comes
    # back (``StepOutput.embedding``) instead of logits; nothing is generated, so max_tokens is 0.
    embed: bool = False
    # A scoring request (a reranker's yes/no): the logits of these tokens at the position after the
    # prompt come back (``StepOutput.token_logits``); nothing is generated, so max_tokens is 0.
    score_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self._check_types()
        if self.top_k == -1:  # vLLM's "off", which the server takes too: --top-k -1 was refused
            object.__setattr__(self, "top_k", 0)
        checks = [
            (isinstance(self.embed, bool), f"embed must be true or false, got {self.embed!r}"),
            (
                self.max_tokens >= 1
                or (
                    self.max_tokens == 0
                    and (self.prompt_logprobs is not None or self.embed is True or bool(self.score_token_ids))
                ),
                f"max_tokens must be >= 1 (0 only with prompt_logprobs, embed or score_token_ids), "
                f"got {self.max_tokens}",
            ),
            (
                not self.score_token_ids or (self.max_tokens == 0 and self.embed is False),
                "a scoring request (score_token_ids) generates nothing: max_tokens must be 0, embed false",
            ),
            (
                self.embed is False or (self.max_tokens == 0 and self.prompt_logprobs is None),
                "an embedding request (embed) generates nothing and scores nothing: max_tokens must be 0 "
                "and prompt_logprobs None",
            ),
            (
                0 <= self.min_tokens <= max(self.max_tokens, 0),
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
            ),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            # inf would pass every range check and divide the logits to zeros inside the sampler's kernel
            (math.isfinite(self.temperature), f"temperature must be finite, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= -1 (0 or -1 disables it), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (
                math.isfinite(self.repetition_penalty),
                f"repetition_penalty must be finite, got {self.repetition_penalty}",
            ),
            (
                self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
                f"seed must fit in 64 bits ({SEED_RANGE[0]}..{SEED_RANGE[1]}), got {self.seed}",
            ),
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

    def _check_logit_bias(self) -> None:
        """Pairs of a token id and a number in [-100, 100], one a token, kept as a tuple (a dict sorted). The
        last non-empty tuple that passed is not walked again: copies of params (``dataclasses.replace``, one
        per choice of n in the server) hand it back, and a bias over the whole vocabulary took 0.3 s to walk
        (and to write into a message no one read) at each, while the server's event loop waited."""
        if self.logit_bias is _checked_bias[0]:  # immutable, so it passes again
            return
        bias = self.logit_bias
        if isinstance(bias, dict):
            try:
                bias = sorted(bias.items())
            except TypeError:  # keys of two kinds (5 and "6"): the walk below names them
                bias = list(bias.items())
        pairs = _in_bulk(bias)
        if pairs is not None:
            object.__setattr__(self, "logit_bias", pairs)
            _checked_bias[0] = pairs
            return

        def bad(pair: object) -> bool:
            return not (
                isinstance(pair, list | tuple) and len(pair) == 2 and _is_int(pair[0]) and _is_number(pair[1])
            )

        if not isinstance(bias, list | tuple) or any(bad(pair) for pair in bias):
            shown = repr(self.logit_bias)
            if len(shown) > 200:  # a whole vocabulary's bias: one line, not megabytes
                first = (
                    next((pair for pair in bias if bad(pair)), None)
                    if isinstance(bias, list | tuple)
                    else None
                )
                shown = f"{shown[:200]}... ({len(bias)} entries" + (f"; {first!r} is not)" if first else ")")
            raise SamplingParamsError(f"logit_bias must map token ids to numbers, got {shown}")
        tokens, values = [int(t) for t, _ in bias], [v for _, v in bias]
        if len(set(tokens)) < len(tokens):
            seen: set[int] = set()
            for token in tokens:  # one value a token: which of two would apply is not defined
                if token in seen:
                    raise SamplingParamsError(f"logit_bias names token {token} twice")
                seen.add(token)
        # the range before float(): an int past a float's range (10**400) raised OverflowError there
        bad = next(((t, v) for t, v in zip(tokens, values, strict=True) if not -100 <= v <= 100), None)
        if bad is not None:
            raise SamplingParamsError(
                f"logit_bias values must be in [-100, 100], got {_shown_number(bad[1])} for token {bad[0]}"
            )
        pairs = tuple(zip(tokens, map(float, values), strict=True))
        object.__setattr__(self, "logit_bias", pairs)
        if pairs:  # no bias (most params) leaves the checked one in place for its copies
            _checked_bias[0] = pairs

    def _check_types(self) -> None:
        """Each field's type, before any range check compares it: a float ``top_k`` or ``seed`` would
        otherwise pass here and fail inside the engine's kernels, mid-step. ``stop`` (like vLLM's) may be
        one string or a list; it is kept as a tuple, so the params stay hashable. None for ``stop``,
        ``stop_token_ids`` or ``logit_bias`` is none, as vLLM's defaults (code written for it passes it)."""
        for name in ("stop", "stop_token_ids", "logit_bias"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, ())
        for name in ("stop", "stop_token_ids", "score_token_ids"):
            value = getattr(self, name)
            if isinstance(value, str) and name == "stop":
                value = (value,)
            if not isinstance(value, list | tuple):
                raise SamplingParamsError(
                    f"{name} must be a list{' or a string' if name == 'stop' else ''}, got {value!r}"
                )
            object.__setattr__(self, name, tuple(value))
        self._check_logit_bias()
        if not all(isinstance(s, str) for s in self.stop):
            raise SamplingParamsError(f"stop must hold strings, got {self.stop!r}")
        if "" in self.stop:  # it would be found at once and end every request empty (vLLM refuses it too)
            raise SamplingParamsError("stop cannot contain an empty string")
        for name in ("stop_token_ids", "score_token_ids"):
            if not all(_is_int(t) for t in getattr(self, name)):
                raise SamplingParamsError(f"{name} must hold integers, got {getattr(self, name)!r}")
        for name, optional in INTEGER_FIELDS.items():
            value = getattr(self, name)
            if not (_is_int(value) or (optional and value is None)):
                raise SamplingParamsError(
                    f"{name} must be an integer{' or None' if optional else ''}, got {value!r}"
                )
        for name in NUMBER_FIELDS:
            value = getattr(self, name)
            if not _is_number(value):
                raise SamplingParamsError(f"{name} must be a number, got {value!r}")
        for name in ("grammar", "adapter"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SamplingParamsError(f"{name} must be a string or None, got {value!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or so close to it that dividing by it would overflow) means argmax."""
        return self.temperature < GREEDY_BELOW


GREEDY_BELOW = 1e-5
# The seeds torch.Generator.manual_seed takes; past them it fails in the engine's thread, mid-request.
SEED_RANGE = (-(2**63), 2**64 - 1)
# name -> whether None is allowed
INTEGER_FIELDS = {
    "max_tokens": False,
    "min_tokens": False,
    "top_k": False,
    "seed": True,
    "logprobs": True,
    "prompt_logprobs": True,
}
NUMBER_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


# the logit_bias that passed SamplingParams' checks last (see _check_logit_bias)
_checked_bias: list[tuple[tuple[int, float], ...]] = [()]


def _in_bulk(bias: object) -> tuple[tuple[int, float], ...] | None:
    """The common logit_bias (pairs of an int and a number in range, one a token) checked in bulk, as
    (int, float) pairs; None for anything else, left to the walk that names what is wrong. Pair by pair, a
    bias over the whole vocabulary took 0.2 s of the server's event loop."""
    if not bias or not isinstance(bias, list | tuple):
        return None
    shapes = set(map(type, bias))
    if not shapes <= {tuple, list} or set(map(len, bias)) != {2}:
        return None
    tokens, values = list(map(itemgetter(0), bias)), list(map(itemgetter(1), bias))
    kinds = set(map(type, values))
    if set(map(type, tokens)) != {int} or not kinds <= {int, float}:
        return None
    if len(set(tokens)) < len(tokens) or min(values) < -100 or max(values) > 100:
        return None
    if any(map(math.isnan, values)):  # after the range: a huge int is no float to ask
        return None
    if type(bias) is tuple and shapes == {tuple} and kinds == {float}:
        return bias  # as it would be rebuilt (the server's pairs): no copy of 151,936 pairs
    return tuple(zip(tokens, map(float, values), strict=True))


def _shown_number(value: float) -> str:
    """A number for a message: as a float, or said in words where it is an int no float holds."""
    try:
        return str(float(value))
    except OverflowError:
        return "an integer past a float's range"


def _is_int(value: object) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)
