"""The user-level API: load a model once, then generate for one prompt or many, or stream.

This is where text meets token ids: prompts are encoded, tokens are detokenized incrementally (never
half a UTF-8 character), and stop strings end a request. The engine below knows only token ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenkit.checkpoint import load_model, open_checkpoint
from qwenkit.checkpoint.gguf import GGUFCheckpoint
from qwenkit.checkpoint.loader import CheckpointSource
from qwenkit.config import ModelConfig
from qwenkit.engine import Engine, FinishReason, SamplingParams, TokenLogprob
from qwenkit.model import Transformer
from qwenkit.tokenizer import HFTokenizer, StreamingDetokenizer, Tokenizer, load_tokenizer

# Chat defaults for models that ship no generation_config.json: moderate sampling, as Qwen's chat models
# use (their exact published values vary by release).
FALLBACK_SAMPLING = {
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_tokens": 512,
}


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prefill_seconds: float = 0.0  # from submission to the first token
    decode_seconds: float = 0.0  # from the first token to the last


@dataclass
class Delta:
    """One streamed increment: new token ids and the text they completed. The last one carries the
    finish reason and the whole Completion (token ids, text, logprobs, timings)."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    completion: Completion | None = None


class _TextState:
    """Per-request text bookkeeping: incremental detokenizing and stop-string search."""

    def __init__(self, tokenizer: Tokenizer, completion: Completion, stop: Sequence[str]) -> None:
        self.detok = StreamingDetokenizer(tokenizer, skip_special=True)  # no <|im_end|> in replies
        self.completion = completion
        self.stop = tuple(s for s in stop if s)
        self.held = ""  # text withheld because it might be the start of a stop string
        self.start = time.perf_counter()
        self.first_token_at: float | None = None

    def feed(self, token_ids: list[int], finish: FinishReason | None) -> str:
        """Add tokens; return the text safe to emit now. A stop string found sets finish_reason "stop"."""
        now = time.perf_counter()
        if self.first_token_at is None and token_ids:
            self.first_token_at = now
        c = self.completion
        c.token_ids += token_ids
        text = self.held + "".join(self.detok.add(t) for t in token_ids)
        if finish is not None:
            text += self.detok.finalize()
        self.held = ""
        stopped = False
        if self.stop:
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, stopped = text[:cut], True
            elif finish is None:
                keep = _partial_stop_suffix(text, self.stop)
                text, self.held = text[: len(text) - keep], text[len(text) - keep :]
        c.text += text
        if finish is not None or stopped:
            c.finish_reason = "stop" if stopped else finish
            c.prefill_seconds = (self.first_token_at or now) - self.start
            c.decode_seconds = now - (self.first_token_at or now)
        return text


def _partial_stop_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def tokenizer_for(source: CheckpointSource | str | Path) -> Tokenizer:
    """The tokenizer that belongs to a checkpoint: its directory's files, or a GGUF's own metadata.

    A path may also be a tokenizer-only directory (tokenizer.json or qwen.tiktoken, no weights).
    """
    if isinstance(source, str | Path):
        if Path(source).suffix != ".gguf":
            return load_tokenizer(source)
        source = open_checkpoint(source)
    if isinstance(source, GGUFCheckpoint):
        return HFTokenizer(source.tokenizer, source.tokenizer_config, {})
    return load_tokenizer(source.path)


class LLM:
    """A loaded model with its tokenizer and engine."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        eos = tuple(sorted(set(model.config.eos_token_ids) | set(tokenizer.stop_token_ids)))
        self.engine = Engine(
            model,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            prefill_chunk=prefill_chunk,
            eos_token_ids=eos,
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "auto",
        device: str = "cpu",
        quantize: str | None = None,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        progress: bool = True,
        adapter: str | Path | None = None,
    ) -> LLM:
        source = open_checkpoint(path)
        tokenizer = tokenizer_for(source)
        model, _ = load_model(
            source,
            dtype=dtype,
            device=device,
            quantize=quantize,
            context=max_seq_len,
            batch=max_batch_size,
            progress=progress,
            adapter=adapter,
        )
        return cls(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len)

    @property
    def model_config(self) -> ModelConfig:
        return self.config

    def default_params(self, **overrides: object) -> SamplingParams:
        """Sampling defaults from generation_config.json, overridden by the caller's values.

        A model without a generation_config.json (a GGUF file, say) gets FALLBACK_SAMPLING's chat
        defaults rather than raw temperature-1 sampling, which small models answer badly.
        """
        found = dict(self.tokenizer.generation_defaults)
        defaults: dict[str, object] = dict(FALLBACK_SAMPLING) if not found else {}
        for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if key in found:
                defaults[key] = found[key]
        if "max_new_tokens" in found:
            defaults["max_tokens"] = found["max_new_tokens"]
        if found.get("do_sample") is False:
            defaults["temperature"] = 0.0
        return SamplingParams(**{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | None = None,
    ) -> list[Completion]:
        """Generate for many prompts together (continuous batching); results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = params or SamplingParams()
        states: dict[int, _TextState] = {}
        for prompt in prompts:
            ids = self._prompt_ids(prompt)
            rid = self.engine.add_request(ids, params)
            states[rid] = _TextState(self.tokenizer, Completion(ids), params.stop)
        for _ in self._run(states):
            pass
        return [state.completion for state in states.values()]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[Delta]:
        """Yield text as it is produced; the final Delta carries the finish reason.

        Closing the iterator early (or Ctrl-C) aborts the request and frees its cache slot.
        """
        params = params or SamplingParams()
        ids = self._prompt_ids(prompt)
        rid = self.engine.add_request(ids, params)
        with closing(self._run({rid: _TextState(self.tokenizer, Completion(ids), params.stop)})) as deltas:
            for _, delta in deltas:
                yield delta

    def _run(self, states: dict[int, _TextState]) -> Iterator[tuple[int, Delta]]:
        """Step the engine until every request in ``states`` ends; release any left when closed early."""
        pending = set(states)
        try:
            while pending:
                for out in self.engine.step():
                    state = states.get(out.request_id)
                    if state is None:
                        continue
                    text = state.feed(out.new_token_ids, out.finish_reason)
                    c = state.completion
                    c.logprobs += out.logprobs
                    if c.finish_reason:  # the engine's reason, or a stop string found in the text
                        pending.discard(out.request_id)
                        self.engine.release(out.request_id)
                    yield (
                        out.request_id,
                        Delta(out.new_token_ids, text, c.finish_reason, c if c.finish_reason else None),
                    )
        finally:
            for rid in pending:
                self.engine.release(rid)
