"""The generation engine: requests join, are prefilled in chunks, decode together, and leave.

One ``step()`` = schedule -> run the batch (one forward for prompt chunks, one for decoding rows) ->
sample -> update. Works on token ids only; text (and stop strings) belong to the layer above. The
server, the chat CLI, evaluation and profiling all drive this one engine.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from qwenkit.engine.kv_cache import SlotKVCache
from qwenkit.engine.request import FinishReason, Request, TokenLogprob
from qwenkit.engine.sampling import SamplingParams, SamplingParamsError, apply_penalties, sample_token
from qwenkit.engine.scheduler import Scheduler
from qwenkit.errors import NonFiniteLogitsError
from qwenkit.model import Transformer


@dataclass
class StepOutput:
    """What one request got in one step."""

    request_id: int
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob]


class Engine:
    def __init__(
        self,
        model: Transformer,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        eos_token_ids: tuple[int, ...] | None = None,
    ) -> None:
        self.model = model
        config = model.config
        self.max_seq_len = max_seq_len or config.max_context
        self.eos_token_ids = tuple(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        param = next(model.parameters())
        self.device, self.dtype = param.device, _activation_dtype(model)
        self.cache = SlotKVCache(
            num_layers=config.num_hidden_layers,
            num_slots=max_batch_size,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            max_len=self.max_seq_len,
            dtype=self.dtype,
            device=self.device,
        )
        self.scheduler = Scheduler(max_batch_size, prefill_chunk)
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self.steps = 0

    # ---- requests ----------------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        if not prompt_ids:
            raise SamplingParamsError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise SamplingParamsError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt_ids) >= self.max_seq_len:
            raise SamplingParamsError(
                f"the prompt has {len(prompt_ids)} tokens; the context window is {self.max_seq_len}"
            )
        request = Request(next(self._ids), list(prompt_ids), params)
        request.ntk_alpha = self.model.ntk_alpha(len(prompt_ids))
        if params.seed is not None:
            request.generator = torch.Generator(device="cpu").manual_seed(params.seed)
        elif not params.greedy:
            request.generator = torch.Generator(device="cpu").manual_seed(torch.seed() % 2**63)
        if params.repetition_penalty != 1.0:
            request.seen = torch.zeros(vocab, dtype=torch.bool)
            request.seen[torch.tensor(prompt_ids)] = True
        if params.presence_penalty or params.frequency_penalty:
            request.output_counts = torch.zeros(vocab, dtype=torch.int32)
        self.requests[request.id] = request
        self.scheduler.add(request)
        return request.id

    def abort(self, request_id: int) -> None:
        request = self.requests.get(request_id)
        if request is not None and not request.finished:
            self._finish(request, "abort")

    def release(self, request_id: int) -> None:
        """Abort the request if it is still running, free its slot, and forget it."""
        self.abort(request_id)
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- one step ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        for request in self.scheduler.admit(self.cache.free_slots):
            request.slot = self.cache.allocate()
        schedule = self.scheduler.schedule()
        outputs: dict[int, StepOutput] = {}
        if schedule.prefill:
            self._run(schedule.prefill, outputs)
        if schedule.decode:
            self._run([(r, 1) for r in schedule.decode], outputs)
        self.steps += 1
        return list(outputs.values())

    def _run(self, rows: list[tuple[Request, int]], outputs: dict[int, StepOutput]) -> None:
        T = max(n for _, n in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        positions = torch.zeros(len(rows), T, dtype=torch.long)
        for b, (request, n) in enumerate(rows):
            start = request.num_computed
            ids[b, :n] = torch.tensor(request.all_ids[start : start + n])
            positions[b] = torch.arange(start, start + T)  # padding continues the positions harmlessly
        view = self.cache.view([r.slot for r, _ in rows], [r.num_computed for r, _ in rows], T)
        last = torch.tensor([n - 1 for _, n in rows])
        logits = (
            self.model(
                ids.to(self.device),
                positions=positions.to(self.device),
                cache=view,
                ntk_alphas=[r.ntk_alpha for r, _ in rows],
                logits_index=last.to(self.device),
            )
            .float()
            .cpu()
        )  # (B, V)
        if not torch.isfinite(logits).all():
            raise NonFiniteLogitsError(_non_finite_message(self.dtype, self.steps))
        for b, (request, n) in enumerate(rows):
            request.num_computed += n
            if request.in_prefill or request.finished:
                continue
            token = self._sample(request, logits[b])
            out = outputs.setdefault(request.id, StepOutput(request.id, [], None, []))
            out.new_token_ids.append(token)
            out.logprobs.append(request.logprobs[-1])
            out.finish_reason = self._check_finished(request, token)

    def _sample(self, request: Request, row: torch.Tensor) -> int:
        params = request.params
        logprobs = torch.log_softmax(row, dim=-1)
        row = apply_penalties(row.clone(), params, request.seen, request.output_counts)
        token = sample_token(row, params, request.generator)
        top = []
        if params.logprobs:
            values, indices = torch.topk(logprobs, params.logprobs)
            top = list(zip(indices.tolist(), values.tolist(), strict=True))
        request.logprobs.append(TokenLogprob(token, float(logprobs[token]), top))
        request.output_ids.append(token)
        if request.seen is not None:
            request.seen[token] = True
        if request.output_counts is not None:
            request.output_counts[token] += 1
        return token

    def _check_finished(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            self._finish(request, "stop")
        elif len(request.output_ids) >= params.max_tokens or request.num_tokens >= self.max_seq_len:
            self._finish(request, "length")
        return request.finish_reason

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.finish_reason = reason
        self.scheduler.remove(request)
        if request.slot is not None:
            self.cache.free(request.slot)
            request.slot = None

    def pop_finished(self, request_id: int) -> Request:
        """Forget a finished request and hand back its final state."""
        return self.requests.pop(request_id)


def _activation_dtype(model: Transformer) -> torch.dtype:
    return model.model.norm.weight.dtype  # the embedding may be quantized (no float weight)


def _non_finite_message(dtype: torch.dtype, step: int) -> str:
    hint = (
        "float16 overflows in this model; use --dtype bfloat16 or float32"
        if dtype == torch.float16
        else "the checkpoint may be corrupt"
    )
    return f"the model produced NaN/inf logits at step {step} in {str(dtype).removeprefix('torch.')}: {hint}"
