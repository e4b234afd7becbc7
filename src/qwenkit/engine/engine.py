"""The generation engine: one ``step()`` = schedule -> one forward over a flat batch -> sample -> update.

Requests join the running batch at the next step and leave when done; prompts are computed in chunks
beside decoding rows; the KV cache is a pool of blocks shared by prefix. Works on token ids only: text
and stop strings belong to the layer above. Exactly one thread steps an engine (see ``driver.py``);
every front end drives the same engine.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qwenkit.engine.blocks import BlockManager
from qwenkit.engine.constraint import GrammarCompiler, apply_constraints
from qwenkit.engine.decode_graph import DecodeGraphs, supports_static_decode
from qwenkit.engine.forward import AdapterWrite, ForwardCall, run_forward_with_hidden
from qwenkit.engine.kv_cache import PagedKVCache
from qwenkit.engine.request import FinishReason, Request, RequestId, TokenLogprob
from qwenkit.engine.sampler import (
    apply_logit_bias,
    apply_penalties,
    as_float,
    finite_rows,
    sample,
    token_logprobs,
)
from qwenkit.engine.sampling import PromptTooLongError, SamplingParams, SamplingParamsError
from qwenkit.engine.scheduler import Scheduler
from qwenkit.engine.token_counts import TokenCounts
from qwenkit.model import Transformer
from qwenkit.model.adapter_bank import AdapterBank, LoRAPair
from qwenkit.model.score_head import RANK_ONLY, score_head
from qwenkit.model.served_adapters import add_adapter, remove_adapter
from qwenkit.model.transformer import HEADLESS, is_headless

BLOCK_SIZE = 16


@dataclass
class StepOutput:
    """What one request got in one step. The last output of a request has a finish reason; after it
    the engine forgets the request."""

    request_id: RequestId
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, with the first output
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # why the request failed (finish_reason "error")
    scheduled_at: float | None = None  # perf_counter() time it was first scheduled (a computed one's)
    # an embed request's final-norm hidden state of its last prompt token: (hidden,) float32 on the CPU
    embedding: torch.Tensor | None = None
    # a scoring request's logits of its ``score_token_ids`` after its last prompt token (float32)
    token_logits: list[float] | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_usage: float  # fraction of KV blocks held
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int
    preemptions: int


def _check_sizes(
    max_batch_size: object, max_seq_len: object, prefill_chunk: object, kv_cache_tokens: object
) -> None:
    """SamplingParamsError naming a size of the wrong type or below 1: a str failed in the pool's
    arithmetic, max_batch_size 0 was reported as a KV cache of 0 tokens, and prefill_chunk 0 left every
    request waiting for ever."""

    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for name, value, optional in (
        ("max_batch_size", max_batch_size, False),
        ("prefill_chunk", prefill_chunk, False),
        ("max_seq_len", max_seq_len, True),
        ("kv_cache_tokens", kv_cache_tokens, True),
    ):
        if optional and value is None:
            continue
        if not is_int(value):
            raise SamplingParamsError(
                f"{name} must be an integer{' or None' if optional else ''}, got {value!r}"
            )
        if not optional and value < 1:
            raise SamplingParamsError(f"{name} must be at least 1, got {value!r}")


class Engine:
    def __init__(
        self,
        model: Transformer,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        eos_token_ids: Sequence[int] | None = None,
        kv_cache_tokens: int | None = None,
        prefix_caching: bool = True,
        block_size: int = BLOCK_SIZE,
        cuda_graphs: bool | None = None,
    ) -> None:
        """prefill_chunk: tokens computed per step over all rows (the token budget).
        kv_cache_tokens: the pool's size in tokens (default: every row at ``max_seq_len``).
        cuda_graphs: run decode-only steps as CUDA graphs (``decode_graph.py``); None: on when the model
        is on a CUDA device. True on the CPU runs the same static-shape step without capture."""
        _check_sizes(max_batch_size, max_seq_len, prefill_chunk, kv_cache_tokens)
        self.model = model
        config = model.config
        self.vocab_size = config.vocab_size
        self.max_seq_len = max_seq_len or config.max_context
        self.eos_token_ids = frozenset(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.device, self.dtype = next(model.parameters()).device, _activation_dtype(model)
        # the LoRA adapters the model serves (``model.served_adapters``); ``add_adapter`` changes them
        self.adapters: AdapterBank | None = getattr(model, "adapters", None)
        # a reranker's GGUF: scoring requests read its rows of "yes" and "no" at the hidden state
        self.score_head = score_head(model)
        pool_tokens = kv_cache_tokens or max_batch_size * self.max_seq_len
        if pool_tokens < self.max_seq_len:
            raise SamplingParamsError(
                f"the KV cache holds {pool_tokens} tokens, less than one sequence of the "
                f"{self.max_seq_len}-token context: give it more memory or lower the maximum model length"
            )
        num_blocks = -(-pool_tokens // block_size)
        self.cache = PagedKVCache(
            config.num_hidden_layers,
            num_blocks + 1,  # the last block is never handed out: padded decode rows write there
            block_size,
            config.num_key_value_heads,
            config.head_dim,
            self.dtype,
            self.device,
        )
        self.blocks = BlockManager(num_blocks, block_size)
        self.decode_graphs: DecodeGraphs | None = None
        on_cuda = self.device.type == "cuda"
        if (on_cuda if cuda_graphs is None else cuda_graphs) and supports_static_decode(model) is None:
            self.decode_graphs = DecodeGraphs(
                model, self.cache, max_batch_size, self.max_seq_len, dummy_block=num_blocks, capture=on_cuda
            )
        self.scheduler = Scheduler(self.blocks, max_batch_size, prefill_chunk, prefix_caching)
        self.requests: dict[RequestId, Request] = {}
        self._aborted: list[StepOutput] = []
        self._next_id = 0
        self.steps = 0
        self.preemptions = 0
        # Turns SamplingParams.grammar into a per-request token mask; installed by whoever enables
        # constrained decoding (qwenkit.tools.grammar), so the engine needs no grammar library.
        self.grammar_compiler: GrammarCompiler | None = None
        # Called with every forward before it runs: a tensor-parallel leader sends it to the other
        # ranks, which run the same forward on their shards (``lockstep``).
        self.before_forward: Callable[[ForwardCall], None] | None = None
        # a tensor-parallel leader sends every adapter written between steps out too
        self.adapter_written: Callable[[AdapterWrite], None] | None = None

    # ---- requests ----------------------------------------------------------------------------------

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise SamplingParamsError if this request cannot run. Reads only fixed state: any thread."""
        if not isinstance(params, SamplingParams):  # a dict of them failed mid-check on a missing attribute
            raise SamplingParamsError(f"params must be a SamplingParams, got {params!r:.60}")
        if isinstance(prompt_ids, str | bytes) or not isinstance(prompt_ids, Sequence):
            raise SamplingParamsError(f"prompt_ids must be a list of token ids, got {prompt_ids!r:.60}")
        # 1.5 or True would pass the vocabulary check and run as another token (int(1.5) == int(True))
        bad = [t for t in prompt_ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if bad:
            raise SamplingParamsError(f"prompt token ids must be integers, got {bad[0]!r}")
        if not prompt_ids:
            raise SamplingParamsError("the prompt is empty: give at least one token")
        if self.score_head is not None:
            _check_scores(self.score_head.token_ids, params)
        elif is_headless(self.model) and not params.embed:
            raise SamplingParamsError(HEADLESS)
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise SamplingParamsError(
                f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        if len(prompt_ids) > self.max_seq_len and params.max_tokens == 0:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; the context window is {self.max_seq_len}"
            )
        # scoring a prompt (max_tokens 0, prompt_logprobs) generates nothing: it may fill the window
        if len(prompt_ids) >= self.max_seq_len and params.max_tokens != 0:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; the context window is {self.max_seq_len}, and a "
                f"prompt may take at most {self.max_seq_len - 1} to leave room for a token to be generated"
            )
        for what, ids in (("stop", params.stop_token_ids), ("score", params.score_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise SamplingParamsError(
                    f"{what} token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
        tokens = [t for t, _ in params.logit_bias]  # in bulk; the walk below only finds the one to name
        if tokens and (min(tokens) < 0 or max(tokens) >= self.vocab_size):
            bad = [t for t in tokens if not 0 <= t < self.vocab_size]
            raise SamplingParamsError(
                f"logit_bias token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        if params.grammar is not None and self.grammar_compiler is None:
            raise SamplingParamsError("constrained decoding (a grammar) is not enabled on this engine")
        self._adapter_slot(params.adapter)

    def _adapter_slot(self, name: str | None) -> int:
        """The served adapter slot of a request naming adapter ``name`` (None: the default)."""
        bank = self.adapters
        if bank is None:
            if name is not None:
                raise SamplingParamsError(
                    f"adapter {name!r} was asked for, but this model serves no adapters"
                )
            return 0
        try:
            return bank.slot(name)
        except KeyError:
            served = ", ".join(bank.served) or "none"
            raise SamplingParamsError(f"adapter {name!r} is not served here (served: {served})") from None

    def add_adapter(
        self,
        name: str,
        pairs: dict[str, LoRAPair],
        replace: bool = False,
        whole: dict[str, LoRAPair] | None = None,
    ) -> int:
        """Serve LoRA adapter ``name`` from the next step on (``served_adapters.add_adapter``): between
        steps only (the driver's thread); returns its slot. With ``replace`` its new weights take the
        name, and requests already running on the old ones finish on them. ``whole``: the pairs before
        this rank's slicing (tensor parallel), which ``adapter_written`` sends to the other ranks."""
        busy = {request.adapter_slot for request in self.requests.values()}
        slot = add_adapter(self.model, name, pairs, busy, replace)
        if self.adapter_written is not None:
            self.adapter_written(AdapterWrite(slot, name, whole if whole is not None else pairs))
        self.adapters = self.model.adapters
        if self.decode_graphs is not None and supports_static_decode(self.model) is not None:
            self.decode_graphs = None  # captured without the side paths
        return slot

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter ``name``: new requests naming it are refused, those running finish."""
        remove_adapter(self.model, name)

    def add_request(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None, request_id: RequestId = None
    ) -> RequestId:
        """Queue a request; it joins the batch at the next step. Returns its id (``request_id`` or a
        new integer)."""
        params = params or SamplingParams()
        self.validate(prompt_ids, params)
        if request_id is None:
            request_id, self._next_id = self._next_id, self._next_id + 1
        if request_id in self.requests:
            raise SamplingParamsError(f"request id {request_id!r} is already in use")
        request = Request(request_id, list(prompt_ids), params)
        request.ntk_alpha = self.model.ntk_alpha(len(prompt_ids))
        request.adapter_slot = self._adapter_slot(params.adapter)
        keys = [f"ntk={request.ntk_alpha}"] if request.ntk_alpha != 1.0 else []
        if request.adapter_slot:  # an adapter's K/V are not the base model's
            keys.append(f"adapter={self.adapters.key(request.adapter_slot)}")
        request.cache_key = ",".join(keys).encode()
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            request.generator = torch.Generator(device=self.device).manual_seed(seed)
        if params.repetition_penalty != 1.0:
            request.seen = TokenCounts(request.prompt_ids, self.device)
        if params.presence_penalty or params.frequency_penalty:
            request.output_counts = TokenCounts(device=self.device, counted=True)
        if params.grammar is not None:
            request.constraint = self.grammar_compiler(params.grammar)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def abort(self, request_id: RequestId) -> None:
        """Stop a request now and free its KV blocks; its final output (``abort``) comes next step."""
        request = self.requests.get(request_id)
        if request is not None and not request.finished:
            self._finish(request, "abort")
            self._aborted.append(StepOutput(request_id, [], "abort"))

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_usage=self.blocks.usage,
            prefix_queries=self.blocks.prefix_queries,
            prefix_hits=self.blocks.prefix_hits,
            preemptions=self.preemptions,
        )

    # ---- one step ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs, self._aborted = self._aborted, []
        for request in outputs:
            self.requests.pop(request.request_id, None)
        schedule = self.scheduler.schedule()
        self.preemptions += len(schedule.preempted)
        if schedule.empty:
            return outputs
        rows = [rn for rn in schedule.rows if rn[1] == 1] + [rn for rn in schedule.rows if rn[1] > 1]
        graphs = self.decode_graphs
        if (
            graphs is not None
            and self.before_forward is None  # a tensor-parallel leader sends every forward out
            and rows[-1][1] == 1
            and not any(r.params.embed for r, _ in rows)  # a one-token embed request wants its hidden state
            and graphs.accepts(len(rows), [r.ntk_alpha for r, _ in rows])
        ):
            self.cache.copy_blocks(schedule.copies)
            logits, where = self._forward_static(rows)
            embeddings: dict[int, torch.Tensor] = {}
        else:
            logits, where, embeddings = self._forward(rows, schedule.copies)
        by_id: dict[RequestId, StepOutput] = {}
        to_sample: list[tuple[Request, int]] = []  # (request, row of logits)
        for request, n in rows:
            start = request.num_computed
            request.num_computed += n
            first, count = where[id(request)]
            if request.params.prompt_logprobs is not None:  # before publishing: blocks keep them
                self._record_prompt_logprobs(request, start, logits[first : first + count])
            self.scheduler.on_computed(request)
            if request.num_computed < request.num_tokens:
                continue  # more of the prompt (or of a preempted request's tokens) to compute
            out = by_id[request.id] = StepOutput(
                request.id, [], num_cached_tokens=request.num_cached_tokens, scheduled_at=request.scheduled_at
            )
            if not request.output_ids and request.params.prompt_logprobs is not None:
                out.prompt_logprobs = request.prompt_logprobs
            out.embedding = embeddings.get(id(request))
            if out.embedding is not None and not bool(out.embedding.isfinite().all()):  # fp16 overflow
                out.finish_reason, out.error = "error", _non_finite_message(self.dtype, "hidden state")
                out.embedding = None  # never a vector of NaN (invalid JSON, a silent wrong answer)
                self._finish(request, "error")
            elif request.params.score_token_ids:
                scored = logits[first + count - 1] if self.score_head is None else out.embedding
                out.embedding = None
                self._score(request, scored, out)
            elif request.params.max_tokens == 0:
                self._finish(request, "length")
                out.finish_reason = "length"
            else:
                to_sample.append((request, first + count - 1))
        if to_sample:
            self._sample(to_sample, logits, by_id)
        for out in by_id.values():
            if out.finish_reason is not None:
                self.requests.pop(out.request_id, None)
        self.steps += 1
        return outputs + list(by_id.values())

    def _forward(
        self, rows: list[tuple[Request, int]], copies: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, dict[int, tuple[int, int]], dict[int, torch.Tensor]]:
        """Copy the blocks ``copies`` names, then run the model over the rows' new tokens (decoding rows
        first); return the logits rows asked for, per request (first logits row, count), and the hidden
        state of each embed request whose prompt this step completes."""
        ids: list[int] = []
        positions: list[int] = []
        alphas: list[float] = []
        slots: list[int] = []
        logits_index: list[int] = []
        hidden_index: list[int] = []
        embedded: list[int] = []  # id() of the request of each hidden_index entry
        where: dict[int, tuple[int, int]] = {}
        decode_rows, chunk_rows = [], []
        for request, n in rows:
            start, end = request.num_computed, request.num_computed + n
            offset = len(ids)
            ids += request.token_ids(start, end)
            positions += range(start, end)
            alphas += [request.ntk_alpha] * n
            slots += [request.adapter_slot] * n
            if n == 1:
                decode_rows.append((request.block_table, start))
            else:
                chunk_rows.append((request.block_table, start, n))
            wants_prompt = request.params.prompt_logprobs is not None and start < len(request.prompt_ids)
            first = offset if wants_prompt else offset + n - 1
            if request.params.embed or self.score_head is not None:  # the last hidden state, never logits
                where[id(request)] = (len(logits_index), 0)
                if end == request.num_tokens:
                    hidden_index.append(offset + n - 1)
                    embedded.append(id(request))
            elif wants_prompt or end == request.num_tokens:
                where[id(request)] = (len(logits_index), offset + n - first)
                logits_index += range(first, offset + n)
            else:
                where[id(request)] = (len(logits_index), 0)
        call = ForwardCall(
            ids,
            positions,
            alphas if any(a != 1.0 for a in alphas) else None,
            logits_index,
            decode_rows,
            chunk_rows,
            slots if self.adapters is not None else None,
            copies,
            hidden_index,
        )
        if self.before_forward is not None:
            self.before_forward(call)
        logits, hidden = run_forward_with_hidden(self.model, self.cache, call)  # (K, V), (H, hidden)
        rows_of = dict(zip(embedded, hidden.cpu(), strict=True)) if hidden is not None else {}
        return logits, where, rows_of

    def _forward_static(
        self, rows: list[tuple[Request, int]]
    ) -> tuple[torch.Tensor, dict[int, tuple[int, int]]]:
        """``_forward`` for a step of decoding rows only, through ``DecodeGraphs``: logits for every row."""
        inputs: list[tuple[int, int, list[int]]] = []
        where: dict[int, tuple[int, int]] = {}
        for i, (request, _) in enumerate(rows):
            start = request.num_computed
            inputs.append((request.token_ids(start, start + 1)[0], start, request.block_table))
            wants_prompt = request.params.prompt_logprobs is not None and start < len(request.prompt_ids)
            where[id(request)] = (i, int(wants_prompt or start + 1 == request.num_tokens))
        return self.decode_graphs.run(inputs), where

    def _record_prompt_logprobs(self, request: Request, start: int, logits: torch.Tensor) -> None:
        """Log-probabilities of prompt tokens start+1 .. from the logits at positions start .."""
        prompt = request.prompt_ids
        if not request.prompt_logprobs:
            request.prompt_logprobs.append(None)  # the first token has no context to be predicted from
        positions = range(start, min(start + logits.shape[0], len(prompt) - 1))
        todo = [p for p in positions if p + 1 >= len(request.prompt_logprobs)]  # skip recomputed ones
        if not todo:
            return
        rows = logits[[p - start for p in todo]]
        targets = torch.tensor([prompt[p + 1] for p in todo], device=rows.device)
        n = request.params.prompt_logprobs or 0
        request.prompt_logprobs += token_logprobs(rows, targets, [n] * len(todo))

    def _score(self, request: Request, row: torch.Tensor, out: StepOutput) -> None:
        """End scoring request ``request`` with the logits of its ``score_token_ids`` in ``row`` (the
        logits after its last prompt token; a reranker GGUF's hidden state there, for its score head);
        an error where the row holds NaN/inf, never such a score."""
        columns = list(request.params.score_token_ids)
        if self.score_head is not None:
            row, columns = self.score_head(row), self.score_head.columns(request.params.score_token_ids)
        if not finite_rows(row[None])[0]:
            out.finish_reason, out.error = "error", _non_finite_message(self.dtype)
            self._finish(request, "error")
            return
        out.token_logits = as_float(row[columns]).tolist()
        self._finish(request, "length")
        out.finish_reason = "length"

    def _sample(
        self, to_sample: list[tuple[Request, int]], logits: torch.Tensor, by_id: dict[RequestId, StepOutput]
    ) -> None:
        rows = [row for _, row in to_sample]
        raw = logits if rows == list(range(logits.shape[0])) else logits[rows]  # (R, V), no copy if all
        finite = finite_rows(raw)
        for (request, _), ok in zip(to_sample, finite, strict=True):
            if not ok:
                out = by_id[request.id]
                out.finish_reason, out.error = "error", _non_finite_message(self.dtype)
                self._finish(request, "error")
        keep = [i for i, ok in enumerate(finite) if ok]
        if not keep:
            return
        requests = [to_sample[i][0] for i in keep]
        raw = raw[keep] if len(keep) < len(finite) else raw
        penalized = any(r.seen is not None or r.output_counts is not None for r in requests)
        constrained = any(r.constraint is not None for r in requests)
        biased = any(r.params.logit_bias for r in requests)
        floored = any(len(r.output_ids) < r.params.min_tokens for r in requests)
        wanted = [r.params.logprobs is not None for r in requests]
        logits = raw
        # they write into float32 logits; raw stays for the logprobs
        if penalized or constrained or biased or floored:
            logits = as_float(raw)
            logits = logits.clone() if logits is raw and any(wanted) else logits
        if biased:
            logits = apply_logit_bias(logits, requests)
        if floored:
            logits = self._ban_endings(logits, requests)
        if penalized:
            logits = apply_penalties(logits, requests)
        if constrained:
            logits = apply_constraints(logits, [r.constraint for r in requests])
        tokens = sample(logits, requests)
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        if any(wanted):
            rows = [i for i, w in enumerate(wanted) if w]
            found = token_logprobs(raw[rows], tokens[rows], [requests[i].params.logprobs or 0 for i in rows])
            for i, lp in zip(rows, found, strict=True):
                logprobs[i] = lp
        for request, token, lp in zip(requests, tokens.tolist(), logprobs, strict=True):
            request.output_ids.append(token)
            if request.seen is not None:
                request.seen.add(token)
            if request.output_counts is not None:
                request.output_counts.add(token)
            out = by_id[request.id]
            out.new_token_ids.append(token)
            if lp is not None:
                out.logprobs.append(lp)
            # The grammar first: one completed by the last token max_tokens allows is whole, a "stop";
            # a stop token it does not take (a dead end, where the grammar allows nothing) is no answer
            if request.constraint is not None:
                if not request.constraint.accept(token):
                    out.error = f"the grammar rejected token {token}"
                    self._finish(request, "error")
                elif request.constraint.finished and not self._is_stop_token(request, token):
                    self._finish(request, "stop")  # the grammar is complete: nothing more may follow
            if request.finish_reason is None:
                self._check_finished(request, token)
            out.finish_reason = request.finish_reason

    def _ban_endings(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Rows short of their ``min_tokens``: the tokens that would end them (stop_token_ids, and eos
        unless ignore_eos) cannot be sampled, as vLLM's min_tokens."""
        for row, request in enumerate(requests):
            params = request.params
            if len(request.output_ids) < params.min_tokens:
                ending = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
                ids = [t for t in sorted(ending) if t < logits.shape[-1]]
                logits[row, ids] = float("-inf")
        return logits

    def _is_stop_token(self, request: Request, token: int) -> bool:
        params = request.params
        return token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)

    def _check_finished(self, request: Request, token: int) -> None:
        params = request.params
        if self._is_stop_token(request, token):
            self._finish(request, "stop")
        elif len(request.output_ids) >= params.max_tokens or request.num_tokens >= self.max_seq_len:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.finish_reason = reason
        self.scheduler.remove(request)


def _activation_dtype(model: Transformer) -> torch.dtype:
    return model.model.norm.weight.dtype  # the embedding may be quantized (no float weight)


def _non_finite_message(dtype: torch.dtype, what: str = "logits") -> str:
    hint = (
        "float16 overflows in this model; use --dtype bfloat16 or float32"
        if dtype == torch.float16
        else "the checkpoint may be corrupt"
    )
    return f"the model produced NaN/inf {what} in {str(dtype).removeprefix('torch.')}: {hint}"


def _check_scores(token_ids: tuple[int, ...], params: SamplingParams) -> None:
    """A reranker GGUF's model (``score_head``) answers scoring requests of its labels' tokens alone."""
    if not params.score_token_ids:
        raise SamplingParamsError(RANK_ONLY)
    other = [t for t in params.score_token_ids if t not in token_ids]
    if other:
        raise SamplingParamsError(
            f"score token id {other[0]} is none of this reranker's (its score head holds {list(token_ids)})"
        )
