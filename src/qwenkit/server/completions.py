"""``/v1/chat/completions`` and ``/v1/completions``: requests in, engine streams out, OpenAI shapes back.

Handlers never step the engine: each choice is one request submitted to the LLM's driver and read
with ``async for``. A client that disconnects, or a request past ``--request-timeout``, is aborted at
once (its KV blocks are freed at the next step). Streaming sends nothing before the first token: the
first chunk of a choice carries the role together with the first text (clients time TTFT from it, and
Qwen-Agent breaks on a role-only chunk).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from qwenkit.engine import SamplingParams, SamplingParamsError
from qwenkit.generate import LLM, Completion, Delta, TextStream
from qwenkit.server.errors import APIError, error_body
from qwenkit.server.logprobs import LegacyLogprobs, PromptEcho, chat_logprobs
from qwenkit.server.request_params import choice_params, refuse_unsupported, sampling_params
from qwenkit.server.schemas import ChatCompletionRequest, CompletionRequest
from qwenkit.server.state import ServerState
from qwenkit.server.tool_use import ToolParser, ToolPlan, plan_tools, react_functions
from qwenkit.tokenizer import TokenizerError
from qwenkit.tokenizer.base import check_unicode
from qwenkit.tools.calls import ToolSpecError
from qwenkit.tools.template_style import template_style

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Running choices


_TICK = object()  # queued by Run.deltas' timer: time to check the deadlines
# the first word of an engine's refusal of a request (Engine.validate), and the request field it is about
_ENGINE_FIELDS = {"prompt": "prompt", "stop": "stop_token_ids", "logit_bias": "logit_bias"}


@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream | None = None
    cached: Completion | None = None
    cache_key: tuple | None = None
    first_token_at: float | None = None
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


@dataclass
class Run:
    """All choices of one HTTP request, submitted together, read as one merged stream."""

    state: ServerState
    choices: list[Choice]
    arrived: float = field(default_factory=time.perf_counter)

    def start(self) -> None:
        llm, loop = self.state.llm, asyncio.get_running_loop()
        cache = self.state.response_cache
        for choice in self.choices:
            if cache is not None:
                choice.cache_key = cache.key(choice.prompt_ids, choice.params)
                choice.cached = cache.get(choice.cache_key)
        submitted = sum(choice.cached is None for choice in self.choices)  # a cached answer waits for nothing
        rows, queue = self.state.llm.engine.scheduler.max_batch, self.state.config.max_queue
        if submitted > rows + queue:  # never fits, however long the client waits: not a 429 to retry
            prompts = len({id(choice.prompt_ids) for choice in self.choices})
            n = len(self.choices) // prompts
            asked = f"n={submitted} choices" if prompts == 1 else f"{prompts} prompts of n={n} choices each"
            raise APIError(
                400,
                f"{asked} can never be taken by this server: it runs {rows} rows and queues {queue} "
                f"more (--max-batch, --max-queue); ask for at most {rows + queue} choices in one request",
                "n" if prompts == 1 else "prompt",
                "invalid_value",
            )
        if submitted and self.state.waiting_estimate(submitted) > self.state.config.max_queue:
            raise APIError(
                429,
                f"the server is busy: more than {self.state.config.max_queue} requests are waiting",
                None,
                "queue_full",
                {"Retry-After": "1"},
            )
        try:
            for choice in self.choices:
                if choice.cached is None:
                    choice.stream = llm.submit(choice.prompt_ids, choice.params, loop=loop)
                    self.state.active += 1
        except SamplingParamsError as e:
            self.abort()
            raise APIError(400, str(e), self._param(str(e), choice), "invalid_value") from None

    def _param(self, message: str, choice: Choice) -> str | None:
        """The request field an engine refusal names ("prompt token id 7 is outside ..."); with several
        prompts, which one (prompt.1)."""
        param = _ENGINE_FIELDS.get(message.split(" ", 1)[0])
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
                choice.stream.abort()
                choice.stream = None
                self.state.active -= 1
                prompt = len(choice.prompt_ids) if generated else 0
                ttft = None if choice.first_token_at is None else choice.first_token_at - self.arrived
                self.state.metrics.finished(
                    "abort", prompt, generated, ttft, time.perf_counter() - self.arrived
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
                if choice.first_token_at is None and item.token_ids:
                    choice.first_token_at = time.perf_counter()
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
        self.state.metrics.finished(
            completion.finish_reason,
            len(completion.prompt_ids),
            len(completion.token_ids),
            ttft,
            now - self.arrived,
            from_cache=choice.cached is not None,
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
                raise generation_failed(delta.completion)

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


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def streaming_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _usage_field(run: Run, body: ChatCompletionRequest | CompletionRequest):
    """A stream chunk's ``usage``: absent without ``include_usage``, null with it (the totals come in
    a last chunk), the choice's usage so far with ``continuous_usage_stats``."""
    if not body.include_usage:
        return lambda index: {}
    if not body.continuous_usage:
        return lambda index: {"usage": None}
    by_index = {c.index: c for c in run.choices}
    return lambda index: {"usage": by_index[index].usage_so_far()}


def stream_error(exc: Exception) -> str:
    if isinstance(exc, APIError):
        return sse(error_body(exc.status, exc.message, exc.param, exc.code))
    return sse(error_body(500, f"internal error: {type(exc).__name__}"))


# --------------------------------------------------------------------------------------------------
# Chat completions


def chat_prompt(llm: LLM, body: ChatCompletionRequest) -> list[int]:
    messages = [m.as_template_message() for m in body.messages]
    kwargs = dict(body.chat_template_kwargs or {})
    for key in ("enable_thinking",):  # also accepted at the top level, as some clients send it
        if key in (body.model_extra or {}):
            kwargs.setdefault(key, body.model_extra[key])
    style, functions = template_style(llm.tokenizer.chat_template), react_functions(llm, body)
    try:
        return style.prompt_ids(
            llm.tokenizer, messages, functions, body.tools, body.add_generation_prompt, **kwargs
        )
    except ToolSpecError as e:
        raise APIError(400, str(e), "messages") from None
    except Exception as e:  # the template's own raise_exception, or a malformed message
        reason = str(e).removeprefix("chat template failed: ")  # the tokenizer's words for the same thing
        raise APIError(
            400, f"messages: the chat template could not render them: {reason}", "messages"
        ) from None


@dataclass
class ChatRun:
    """A chat request's choices, submitted: what the chat route and the Responses route both read."""

    run: Run
    plan: ToolPlan
    hidden: frozenset[int]  # token ids whose text is not shown (eos, stop tokens)
    adapter: str | None


async def start_chat(state: ServerState, body: ChatCompletionRequest) -> ChatRun:
    """Render, check and submit a chat request (400s for what cannot run, before anything is submitted)."""
    llm = state.llm
    adapter = state.check_model(body.model)
    refuse_unsupported(body)
    prompt_ids = await asyncio.to_thread(chat_prompt, llm, body)
    plan = await asyncio.to_thread(plan_tools, llm, body, prompt_ids)
    extra = {
        "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
        "grammar": plan.grammar,
        "adapter": adapter,
    }
    params = sampling_params(llm, body, len(prompt_ids), None, **extra)
    if plan.stop:
        params = replace(params, stop=(*params.stop, *plan.stop))
    run = Run(state, [Choice(i, prompt_ids, p) for i, p in enumerate(choice_params(params, body.n))])
    run.start()
    return ChatRun(run, plan, llm.eos_token_ids | frozenset(params.stop_token_ids), adapter)


async def chat_completions(state: ServerState, body: ChatCompletionRequest, request: Request):
    llm = state.llm
    started = await start_chat(state, body)
    run, plan, hidden = started.run, started.plan, started.hidden
    created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    model = state.response_model(started.adapter)
    fingerprint = state.fingerprint_for(started.adapter)
    head = {"id": rid, "created": created, "model": model, "system_fingerprint": fingerprint}
    if body.stream:
        return streaming_response(_chat_events(run, head, body, hidden, plan))
    await collect(run, request)
    choices = []
    for c in run.choices:
        r = c.result
        message, finish = {"role": "assistant", "content": r.text, "tool_calls": None}, r.finish_reason
        if plan.parses:
            parser = plan.parser()
            parser.feed(r.text)
            parser.finish()
            parsed, finish = parser.message(), parser.finish_reason(r.finish_reason)
            _log_warnings(rid, c.index, parser)
            # null beside calls or reasoning, as OpenAI's and vLLM's (a stream sends no content then)
            message["content"] = parsed.content or (None if parsed.tool_calls or parsed.reasoning else "")
            message["tool_calls"] = [call.as_openai() for call in parsed.tool_calls] or None
            if plan.reasoning:
                message["reasoning_content"] = parsed.reasoning or None
        choice = {
            "index": c.index,
            "message": message,
            "logprobs": chat_logprobs(llm, r.logprobs, hidden) if body.logprobs else None,
            "finish_reason": finish,
        }
        choices.append(choice)
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": run.usage()})


def _log_warnings(rid: str, index: int, parser: ToolParser) -> None:
    for warning in parser.warnings:
        log.warning("%s choice %d: %s", rid, index, warning)


def _event_deltas(events: list, indices: dict[str, int]) -> list[dict]:
    """Parsed events as chat deltas: text as content/reasoning_content; a tool call as the OpenAI SDK
    accumulates it: its index, id, type and name once (with ``arguments: ""``), then each piece of its
    arguments as the model writes it (every delta has ``function``). ``indices``: each started call's
    index in this choice, by id (the next call gets the next index)."""
    deltas = []
    for e in events:
        if e.kind == "content":
            deltas.append({"content": e.text})
        elif e.kind == "reasoning":
            deltas.append({"reasoning_content": e.text})
        elif e.kind == "call_start":
            index = indices.setdefault(e.call.id, len(indices))
            head = {"index": index, "id": e.call.id, "type": "function"}
            deltas.append({"tool_calls": [{**head, "function": {"name": e.call.name, "arguments": ""}}]})
        elif e.kind == "call_args":
            deltas.append({"tool_calls": [{"index": indices[e.call.id], "function": {"arguments": e.text}}]})
    return deltas


async def _chat_events(
    run: Run, head: dict, body: ChatCompletionRequest, hidden: frozenset[int], plan: ToolPlan
):
    llm = run.state.llm
    usage_field = _usage_field(run, body)
    started: set[int] = set()
    parsers: dict[int, ToolParser] = {c.index: plan.parser() for c in run.choices} if plan.parses else {}
    call_indices: dict[int, dict[str, int]] = {i: {} for i in parsers}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **usage_field(index)})

    def said(index: int, message: dict) -> dict:
        if index not in started:
            started.add(index)
            return {"role": "assistant", **message}
        return message

    try:
        async for choice, delta in run.deltas():
            parser = parsers.get(choice.index)
            lps = chat_logprobs(llm, delta.logprobs, hidden) if body.logprobs else None
            if parser is None:
                if delta.text or (lps and delta.logprobs):  # held-back text's logprobs go out too
                    yield chunk(choice.index, said(choice.index, {"content": delta.text}), None, lps)
            else:
                events = parser.feed(delta.text)
                if delta.finish_reason is not None and delta.finish_reason != "error":
                    events += parser.finish()
                messages = _event_deltas(events, call_indices[choice.index])
                for i, message in enumerate(messages):
                    yield chunk(choice.index, said(choice.index, message), None, lps if i == 0 else None)
                if lps and delta.logprobs and not messages:  # logprobs of held-back text go out in order
                    yield chunk(choice.index, said(choice.index, {"content": ""}), None, lps)
            if delta.finish_reason is not None:
                if delta.finish_reason == "error":
                    yield stream_error(generation_failed(delta.completion))
                    continue
                if choice.index not in started:  # a choice with no text still says who spoke
                    started.add(choice.index)
                    yield chunk(choice.index, {"role": "assistant", "content": ""})
                finish = delta.finish_reason
                if parser is not None:
                    finish = parser.finish_reason(finish)
                    _log_warnings(head["id"], choice.index, parser)
                yield chunk(choice.index, {}, finish)
        if body.include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": run.usage()})
    except Exception as exc:  # after the 200 went out, errors travel in the stream
        yield stream_error(exc)
    yield sse("[DONE]")


# --------------------------------------------------------------------------------------------------
# Text completions


def fills_middle(llm: LLM, body: CompletionRequest) -> bool:
    """Whether the request is a fill-in-the-middle one (a text prompt and a ``suffix``, on a model with
    the FIM tokens); 400s for what cannot be one. An empty suffix on a model without them is a plain
    completion (nothing comes after it)."""
    if body.suffix is None or (body.suffix == "" and not llm.tokenizer.has_fim):
        return False
    if not llm.tokenizer.has_fim:
        raise APIError(
            400,
            "suffix (fill-in-the-middle) needs a model whose tokenizer has the tokens <|fim_prefix|>, "
            "<|fim_suffix|> and <|fim_middle|> (Qwen2.5-Coder, Qwen3-Coder); this model's has not",
            "suffix",
            "unsupported",
        )
    if body.echo:
        raise APIError(400, "echo is not supported with suffix", "echo", "unsupported")
    if not isinstance(body.prompts()[0], str):
        raise APIError(
            400,
            "suffix needs a text prompt (the code before the gap), not token ids",
            "suffix",
            "unsupported",
        )
    try:
        check_unicode(body.suffix, "the suffix")
    except TokenizerError as e:
        raise APIError(400, str(e), "suffix", "invalid_value") from None
    return True


async def completions(state: ServerState, body: CompletionRequest, request: Request):
    llm = state.llm
    adapter = state.check_model(body.model)
    refuse_unsupported(body)
    raw_prompts = body.prompts()
    fim = fills_middle(llm, body)

    def read(k: int, prompt: str | list[int]) -> tuple[list[int], PromptEcho | None]:
        try:
            ids = llm.tokenizer.encode_fim(prompt, body.suffix) if fim else llm.encode(prompt)
        except TokenizerError as e:  # text that is not valid Unicode (a lone surrogate)
            param = "prompt" if len(raw_prompts) == 1 else f"prompt.{k}"
            raise APIError(400, str(e), param, "invalid_value") from None
        return ids, PromptEcho.of(llm, prompt, ids) if body.echo else None  # echoed ids are decoded

    # in a worker thread, as chat's: a long prompt is read while the event loop answers others (/health)
    prompts = await asyncio.to_thread(lambda: [read(k, p) for k, p in enumerate(raw_prompts)])
    wants_logprobs = body.logprobs is not None
    choices: list[Choice] = []
    for k, (prompt_ids, echo) in enumerate(prompts):
        extra = {
            "logprobs": body.logprobs,
            "prompt_logprobs": body.logprobs if (body.echo and wants_logprobs) else None,
            "adapter": adapter,
        }
        try:
            params = sampling_params(llm, body, len(prompt_ids), 16, **extra)
        except APIError as e:
            if e.param == "prompt" and len(prompts) > 1:  # which of the batch's prompts is too long
                e.param = f"prompt.{k}"
            raise
        if fim:  # the middle ends where the model closes it (its FIM stop tokens)
            params = llm.fim_params(params)
        for p in choice_params(params, body.n):
            choices.append(Choice(len(choices), prompt_ids, p, echo=echo))
    run = Run(state, choices)
    run.start()
    created, rid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    model = state.response_model(adapter)
    fingerprint = state.fingerprint_for(adapter)
    head = {"id": rid, "created": created, "model": model, "system_fingerprint": fingerprint}
    if body.stream:
        return streaming_response(_completion_events(run, head, body))
    await collect(run, request)
    out = []
    for c in run.choices:
        r = c.result
        out.append(
            {
                "index": c.index,
                "text": (c.echo.text if c.echo else "") + r.text,
                "logprobs": _completion_logprobs(llm, c, r) if wants_logprobs else None,
                "finish_reason": r.finish_reason,
            }
        )
    return JSONResponse({**head, "object": "text_completion", "choices": out, "usage": run.usage()})


def _completion_logprobs(llm: LLM, choice: Choice, result: Completion) -> dict:
    items = [(lp.token_id, lp) for lp in result.logprobs]
    if not choice.echo:
        return LegacyLogprobs(llm).add(items)
    prompt_lps = result.prompt_logprobs or [None] * len(choice.prompt_ids)
    prompt = list(zip(choice.prompt_ids, prompt_lps, strict=True))
    return LegacyLogprobs(llm).add_echoed(choice.echo, prompt, items)


async def _completion_events(run: Run, head: dict, body: CompletionRequest):
    llm = run.state.llm
    usage_field = _usage_field(run, body)
    echoed: set[int] = set()
    logprobs = {c.index: LegacyLogprobs(llm) for c in run.choices}

    def chunk(index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse({**head, "object": "text_completion", "choices": [choice], **usage_field(index)})

    try:
        async for choice, delta in run.deltas():
            text, items = delta.text, [(lp.token_id, lp) for lp in delta.logprobs]
            lps = None
            if choice.echo and choice.index not in echoed:  # the prompt, and its tokens' logprobs, first
                echoed.add(choice.index)
                text = choice.echo.text + text
                prompt_lps = delta.prompt_logprobs or [None] * len(choice.prompt_ids)
                prompt = list(zip(choice.prompt_ids, prompt_lps, strict=True))
                if body.logprobs is not None:
                    lps = logprobs[choice.index].add_echoed(choice.echo, prompt, items)
            elif body.logprobs is not None and items:
                lps = logprobs[choice.index].add(items)
            if text or lps:
                yield chunk(choice.index, text, None, lps)
            if delta.finish_reason == "error":
                yield stream_error(generation_failed(delta.completion))
            elif delta.finish_reason is not None:
                yield chunk(choice.index, "", delta.finish_reason)
        if body.include_usage:
            yield sse({**head, "object": "text_completion", "choices": [], "usage": run.usage()})
    except Exception as exc:
        yield stream_error(exc)
    yield sse("[DONE]")
