"""Running the choices of one request: each choice is one request submitted to the LLM's driver, all of
them read as one merged stream with ``async for``, under the request's deadline and the server's drain.
A client that disconnects, or a request past ``--request-timeout``, is aborted at once (its KV blocks are
freed at the next step). Also the pieces every route streams with: server-sent events and the errors
that travel in a stream once its 200 went out.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from qwenkit.engine import SamplingParams, SamplingParamsError
from qwenkit.generate import Completion, Delta, TextStream
from qwenkit.server.errors import APIError, error_body, log_failure, model_not_found
from qwenkit.server.logprobs import PromptEcho
from qwenkit.server.schemas import ChatCompletionRequest, CompletionRequest
from qwenkit.server.state import ServerState

_TICK = object()  # queued by Run.deltas' timer: time to check the deadlines
# the first words of a refusal of a request (Engine.validate, the text layer's), and the field it is about
_ENGINE_FIELDS = {
    "prompt": "prompt",
    "stop token": "stop_token_ids",
    "stop string": "stop",
    "logit_bias": "logit_bias",
}


@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream | None = None
    cached: Completion | None = None
    cache_key: tuple | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    result: Completion | None = None
    echo: PromptEcho | None = None  # /v1/completions with `echo`: what the choice's text starts with
    generated: int = 0  # tokens streamed so far (held-back text's too)

    def usage_so_far(self) -> dict:
        """This choice's usage at this point of its stream (``continuous_usage_stats``), as vLLM's."""
        prompt = len(self.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.generated,
            "total_tokens": prompt + self.generated,
        }


def check_capacity(state: ServerState, submitted: int, prompts: int, n: int, unit: str = "choices") -> None:
    """The 400 of a request whose ``submitted`` choices (``prompts`` prompts of ``n`` each; ``unit``
    "inputs" or "documents": an embedding or rerank request's ``submitted`` ones) this server can never
    take at once, however long the client waits: not a 429 to retry."""
    rows, queue = state.llm.engine.scheduler.max_batch, state.config.max_queue
    if submitted > rows + queue:
        if unit in ("inputs", "documents"):  # an embedding request's inputs, a rerank request's documents
            asked, param = f"{submitted} {unit}", "input" if unit == "inputs" else "documents"
        elif prompts == 1:
            asked, param = f"n={submitted} choices", "n"
        else:
            asked, param = f"{prompts} prompts of n={n} choices each", "prompt"
        raise APIError(
            400,
            f"{asked} can never be taken by this server: it runs {rows} rows and queues {queue} "
            f"more (--max-batch, --max-queue); ask for at most {rows + queue} {unit} in one request",
            param,
            "invalid_value",
        )


def check_queue(state: ServerState, submitted: int) -> None:
    """The 429 (with Retry-After) of ``submitted`` more requests that would leave more than --max-queue
    waiting for a batch row."""
    if submitted and state.waiting_estimate(submitted) > state.config.max_queue:
        raise APIError(
            429,
            f"the server is busy: more than {state.config.max_queue} requests are waiting",
            None,
            "queue_full",
            {"Retry-After": "1"},
        )


@dataclass
class Run:
    """All choices of one HTTP request, submitted together, read as one merged stream."""

    state: ServerState
    choices: list[Choice]
    # the HTTP request's x-request-id: its choices' engine ids (``<id>/<index>`` for several), so the
    # engine's log line of a failed step names the requests it failed as their clients know them
    name: str | None = None
    arrived: float = field(default_factory=time.perf_counter)

    def start(self) -> None:
        llm, loop = self.state.llm, asyncio.get_running_loop()
        cache = self.state.response_cache
        for choice in self.choices:
            if cache is not None:
                choice.cache_key = cache.key(choice.prompt_ids, choice.params)
                choice.cached = cache.get(choice.cache_key)
        submitted = sum(choice.cached is None for choice in self.choices)  # a cached answer waits for nothing
        prompts = len({id(choice.prompt_ids) for choice in self.choices})
        check_capacity(self.state, submitted, prompts, len(self.choices) // max(prompts, 1))
        check_queue(self.state, submitted)
        try:
            for choice in self.choices:
                if choice.cached is None:
                    name = self._engine_name(choice)
                    choice.stream = llm.submit(choice.prompt_ids, choice.params, loop=loop, name=name)
                    self.state.active += 1
        except SamplingParamsError as e:
            self.abort()
            raise self.adapter_gone() or APIError(
                400, str(e), self._param(str(e), choice), "invalid_value"
            ) from None

    def _engine_name(self, choice: Choice) -> str | None:
        if self.name is None or len(self.choices) == 1:
            return self.name
        return f"{self.name}/{choice.index}"

    def adapter_gone(self) -> APIError | None:
        """vLLM's 404 for a model not served, where this run's adapter was unloaded after its "model" was
        checked (the engine refuses it as it is submitted or added; it was a 400 or a failed generation's
        500); None where the adapter is served."""
        name = self.choices[0].params.adapter  # one "model" per request
        bank = self.state.llm.engine.adapters
        if name is None or (bank is not None and name in bank.served):
            return None
        return model_not_found(name, ": its adapter was unloaded as this request started")

    def failure(self, completion: Completion) -> APIError:
        """The error of a choice the engine failed: the model gone where the engine refused it as it
        added it (it never had a step), else a failed generation."""
        never_ran = completion.queue_seconds is None and not completion.token_ids
        return (never_ran and self.adapter_gone()) or generation_failed(completion)

    def _param(self, message: str, choice: Choice) -> str | None:
        """The request field an engine refusal names ("prompt token id 7 is outside ..."); with several
        prompts, which one (prompt.1)."""
        param = next(
            (field for words, field in _ENGINE_FIELDS.items() if message.startswith(words + " ")), None
        )
        prompts = list({id(c.prompt_ids): c.prompt_ids for c in self.choices}.values())
        if param == "prompt" and len(prompts) > 1:
            return f"prompt.{next(i for i, p in enumerate(prompts) if p is choice.prompt_ids)}"
        return param

    def abort(self) -> None:
        """Stop every unfinished choice (client gone, timeout, error); their KV blocks are freed."""
        for choice in self.choices:
            if choice.stream is not None:
                # the tokens it made before it was stopped were generated all the same (and streamed);
                # its prompt counts once computed, as vLLM's (one stopped while it waited computed none)
                generated = len(choice.stream.completion.token_ids)
                queued = choice.stream.completion.queue_seconds
                choice.stream.abort()
                choice.stream = None
                self.state.active -= 1
                prompt = len(choice.prompt_ids) if generated else 0
                ttft = None if choice.first_token_at is None else choice.first_token_at - self.arrived
                self.state.metrics.finished(
                    "abort", prompt, generated, ttft, time.perf_counter() - self.arrived, queued=queued
                )

    async def deltas(self) -> AsyncIterator[tuple[Choice, Delta]]:
        """Every choice's Deltas as they come, until all have finished (or the deadline passes)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                if choice.cached is not None:
                    c = choice.cached
                    self.state.metrics.response_cache_hits.inc()
                    delta = Delta(c.token_ids, c.text, c.finish_reason, c, c.logprobs, c.prompt_logprobs)
                    await queue.put((choice, delta))
                    return
                async for delta in choice.stream:
                    await queue.put((choice, delta))
            except Exception as exc:  # surfaced to the reader below
                await queue.put((choice, exc))

        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        remaining = len(self.choices)
        timeout = self.state.config.request_timeout
        deadline = None if timeout is None else self.arrived + timeout
        # The deadlines are checked at a tick the loop queues behind the deltas (one timer a second,
        # not a wait_for task for every token).
        loop, tick = asyncio.get_running_loop(), None

        def arm() -> None:
            nonlocal tick
            wait = self._wait(deadline)
            tick = None if wait is None else loop.call_later(wait, queue.put_nowait, (None, _TICK))

        arm()
        try:
            while remaining:
                choice, item = await queue.get()
                if item is _TICK:
                    now = time.perf_counter()
                    drain = self.state.drain_deadline
                    if drain is not None and now >= drain:
                        raise APIError(
                            503,
                            "the server is shutting down and stopped this request at the end of its "
                            "grace period (--graceful-timeout)",
                            None,
                            "server_shutdown",
                            {"Retry-After": "5"},  # as a draining server's 503: another replica, later
                        )
                    if deadline is not None and now >= deadline:
                        raise APIError(
                            408,
                            f"the request took longer than --request-timeout ({timeout:g} s) and was stopped",
                            None,
                            "timeout",
                            {"x-should-retry": "false"},  # the openai clients would run it twice more
                        )
                    arm()
                    continue
                if isinstance(item, Exception):
                    raise item
                if item.token_ids:
                    now = time.perf_counter()
                    if choice.first_token_at is None:
                        choice.first_token_at = now
                    elif choice.cached is None:  # a cached answer comes whole: no token was timed
                        self.state.metrics.itl.observe(now - choice.last_token_at)
                    choice.last_token_at = now
                choice.generated += len(item.token_ids)
                if item.finish_reason is not None:
                    remaining -= 1
                    self._finished(choice, item.completion)
                yield choice, item
        finally:
            if tick is not None:
                tick.cancel()
            for task in tasks:
                task.cancel()
            self.abort()

    def _wait(self, deadline: float | None) -> float | None:
        """Seconds until the nearest deadline (request timeout or the drain's). Until a drain starts, at
        most 1 s, so a SIGTERM that arrives during a long wait (a long prefill) is noticed in time."""
        ends = [d for d in (deadline, self.state.drain_deadline) if d is not None]
        wait = max(min(ends) - time.perf_counter(), 0) if ends else None
        if self.state.draining:
            return wait
        return 1.0 if wait is None else min(wait, 1.0)

    def _finished(self, choice: Choice, completion: Completion) -> None:
        choice.result = completion
        if choice.stream is not None:
            self.state.active -= 1
            choice.stream = None  # finished: nothing left to abort
            if self.state.response_cache is not None:
                self.state.response_cache.put(choice.cache_key, completion)
        now = time.perf_counter()
        ttft = None if choice.first_token_at is None else choice.first_token_at - self.arrived
        # a step that failed before the first token failed the prompt's computation: none of it counts
        # (as one stopped while it waited, in abort)
        failed_early = completion.finish_reason == "error" and not completion.token_ids
        self.state.metrics.finished(
            completion.finish_reason,
            0 if failed_early else len(completion.prompt_ids),
            len(completion.token_ids),
            ttft,
            now - self.arrived,
            from_cache=choice.cached is not None,
            queued=completion.queue_seconds,
        )

    def usage(self) -> dict:
        results = [c.result for c in self.choices if c.result is not None]
        # each prompt once, by its first choice: the one that computed it (its copies, n > 1, read it
        # from the prefix cache, which says nothing of what was cached when the request came)
        prompts = {id(c.prompt_ids): c for c in reversed(self.choices)}.values()
        prompt_tokens = sum(len(c.prompt_ids) for c in prompts)
        completion_tokens = sum(len(r.token_ids) for r in results)
        cached = sum(
            len(c.prompt_ids) if c.cached is not None else (c.result.num_cached_tokens if c.result else 0)
            for c in prompts
        )
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


async def collect(run: Run, request: Request) -> None:
    """Read a run to the end, aborting it if the client goes away first."""

    async def consume() -> None:
        async for _choice, delta in run.deltas():
            if delta.finish_reason == "error":
                raise run.failure(delta.completion)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    consumer, watcher = asyncio.create_task(consume()), asyncio.create_task(watch())
    done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if consumer not in done:
        consumer.cancel()
        run.abort()
        raise APIError(499, "the client closed the request", None, "client_closed")
    consumer.result()


def generation_failed(completion: Completion) -> APIError:
    """A choice the engine failed (a step raised): the same error whole or streamed."""
    return APIError(500, completion.error or "generation failed", None, "generation_error")


class IndexOrder:
    """A stream's chunks, each choice's first going out only after every choice before it has sent one.

    The openai SDK's ``.stream()`` helper appends a choice it has not seen to its list, then finds it
    there by index; a choice answered from the response cache is whole before the others start, and
    its chunks came first. Later chunks of a choice already opened go out at once."""

    def __init__(self) -> None:
        self.opened = 0  # choices 0..opened-1 have sent a chunk
        self.held: dict[int, list[str]] = {}  # the chunks of choices waiting for an earlier one

    def send(self, index: int, text: str) -> list[str]:
        """What may go out now, ``text`` of choice ``index`` included where it may."""
        if index < self.opened:
            return [text]
        self.held.setdefault(index, []).append(text)
        ready = []
        while self.opened in self.held:
            ready += self.held.pop(self.opened)
            self.opened += 1
        return ready

    def rest(self) -> list[str]:
        """Every chunk still held, in index order: a choice that failed never sends one, and the ones
        after it go out at the end."""
        return [text for index in sorted(self.held) for text in self.held.pop(index)]


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def streaming_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def chunk_usage(run: Run, body: ChatCompletionRequest | CompletionRequest):
    """A stream chunk's ``usage``: absent without ``include_usage``, null with it (the totals come in
    a last chunk), the choice's usage so far with ``continuous_usage_stats``."""
    if not body.include_usage:
        return lambda index: {}
    if not body.continuous_usage:
        return lambda index: {"usage": None}
    by_index = {c.index: c for c in run.choices}
    return lambda index: {"usage": by_index[index].usage_so_far()}


def stream_error(exc: Exception, request: Request) -> str:
    """The event of an error after the stream's 200 went out, logged as the same error of a whole answer
    is (:func:`~qwenkit.server.errors.log_failure`)."""
    log_failure(request, exc)
    if isinstance(exc, APIError):
        return sse(error_body(exc.status, exc.message, exc.param, exc.code))
    return sse(error_body(500, f"internal error: {type(exc).__name__}"))
