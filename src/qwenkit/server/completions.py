"""``/v1/chat/completions`` and ``/v1/completions``: requests in, engine streams out, OpenAI shapes back.

Handlers never step the engine: each choice is one request submitted to the LLM's driver and read
with ``async for`` (``runs.py``). Streaming sends nothing before the first token: the
first chunk of a choice carries the role together with the first text (clients time TTFT from it, and
Qwen-Agent breaks on a role-only chunk).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from qwenkit.chat import continued_text
from qwenkit.engine import SamplingParamsError
from qwenkit.generate import LLM, Completion
from qwenkit.server.errors import APIError
from qwenkit.server.logprobs import LegacyLogprobs, PromptEcho, chat_logprobs
from qwenkit.server.request_ids import request_id
from qwenkit.server.request_params import (
    check_context,
    choice_params,
    refuse_unsupported,
    sampling_params,
)
from qwenkit.server.runs import (
    Choice,
    IndexOrder,
    Run,
    check_capacity,
    chunk_usage,
    collect,
    sse,
    stream_error,
    streaming_response,
)
from qwenkit.server.schemas import ChatCompletionRequest, CompletionRequest
from qwenkit.server.state import ServerState
from qwenkit.server.tool_use import ToolParser, ToolPlan, plan_tools, react_functions
from qwenkit.tokenizer import TokenizerError
from qwenkit.tokenizer.base import check_unicode
from qwenkit.tools.calls import ToolSpecError
from qwenkit.tools.template_style import tool_style

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Chat completions


def template_kwargs(body: ChatCompletionRequest, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The chat template's kwargs: the server's ``defaults`` under the request's own (vLLM's merge:
    ``defaults | request``), the top-level ``continue_final_message`` under ``chat_template_kwargs``' (vLLM
    passes the field first, then the kwargs)."""
    kwargs = dict(body.chat_template_kwargs or {})
    if "chat_template" in kwargs:  # the tokenizer's template choice, not a variable: vLLM refuses it too
        raise APIError(
            400,
            "chat_template_kwargs may not hold chat_template: the server renders the model's own template "
            "(its tool_use one where tools are offered)",
            "chat_template_kwargs",
        )
    for key in ("enable_thinking",):  # also accepted at the top level, as some clients send it
        if key in (body.model_extra or {}):
            kwargs.setdefault(key, body.model_extra[key])
    if body.continue_final_message:
        kwargs.setdefault("continue_final_message", True)
    return {**(defaults or {}), **kwargs}


def chat_prompt(
    llm: LLM, body: ChatCompletionRequest, defaults: Mapping[str, Any] | None = None, to_run: bool = True
) -> list[int]:
    """The request's prompt ids; ``defaults`` are the server's template kwargs (see `template_kwargs`).
    ``to_run``: a prompt that surely cannot fit the context is refused before it is tokenized; /tokenize
    counts any (as vLLM's, it checks no length)."""
    messages = [m.as_template_message() for m in body.messages]
    kwargs = template_kwargs(body, defaults)
    style, functions = tool_style(llm.tokenizer, body.tools), react_functions(llm, body)

    def fits(texts: Sequence[str]) -> None:  # a prompt that surely cannot fit, before it is tokenized
        if to_run and (bound := llm.tokenizer.min_tokens(*texts, reaching=llm.engine.max_seq_len)):
            check_context(llm, body, bound, at_least=True)

    try:
        return style.prompt_ids(
            llm.tokenizer,
            messages,
            functions,
            body.tools,
            body.add_generation_prompt,
            check_texts=fits,
            **kwargs,
        )
    except APIError:
        raise
    except ToolSpecError as e:
        raise APIError(400, str(e), "messages") from None
    except Exception as e:  # the template's own raise_exception, or a malformed message
        reason = str(e).removeprefix("chat template failed: ")  # the tokenizer's words for the same thing
        if reason.startswith("continue_final_message"):  # the tokenizer's check of the field, naming it
            raise APIError(400, reason, "continue_final_message") from None
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


async def start_chat(state: ServerState, body: ChatCompletionRequest, request: Request) -> ChatRun:
    """Render, check and submit a chat request (400s for what cannot run, before anything is submitted)."""
    llm = state.llm
    adapter = state.check_model(body.model)
    refuse_unsupported(body)
    defaults = state.config.default_chat_template_kwargs
    prompt_ids = await asyncio.to_thread(chat_prompt, llm, body, defaults)
    final = [m.as_template_message() for m in body.messages[-1:]]
    continued = continued_text(final, template_kwargs(body, defaults))

    def planned() -> ToolPlan:
        check_context(llm, body, len(prompt_ids))  # before a grammar of its tools is compiled
        return plan_tools(llm, body, prompt_ids, continued)

    plan = await asyncio.to_thread(planned)
    extra = {
        "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
        "grammar": plan.grammar,
        "adapter": adapter,
    }
    # in a worker thread, as the prompt: a logit_bias over the whole vocabulary takes 0.1 s to check
    params = await asyncio.to_thread(sampling_params, llm, body, len(prompt_ids), None, **extra)
    if plan.stop:
        params = replace(params, stop=(*params.stop, *plan.stop))
    choices = [Choice(i, prompt_ids, p) for i, p in enumerate(choice_params(params, body.n))]
    run = Run(state, choices, request_id(request))
    run.start()
    return ChatRun(run, plan, llm.eos_token_ids | frozenset(params.stop_token_ids), adapter)


async def chat_completions(state: ServerState, body: ChatCompletionRequest, request: Request):
    llm = state.llm
    started = await start_chat(state, body, request)
    run, plan, hidden = started.run, started.plan, started.hidden
    created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    model = state.response_model(started.adapter)
    fingerprint = state.fingerprint_for(started.adapter)
    head = {"id": rid, "created": created, "model": model, "system_fingerprint": fingerprint}
    if body.stream:
        return streaming_response(_chat_events(run, head, body, hidden, plan, request))
    await collect(run, request)
    logged = _logged(request, rid)
    choices = []
    for c in run.choices:
        r = c.result
        message, finish = {"role": "assistant", "content": r.text, "tool_calls": None}, r.finish_reason
        if plan.parses:
            parser = plan.parser()
            parser.feed(r.text)
            parser.finish()
            parsed, finish = parser.message(), parser.finish_reason(r.finish_reason)
            _log_warnings(logged, c.index, parser)
            # null beside calls or reasoning, as OpenAI's and vLLM's (a stream sends no content then)
            message["content"] = parsed.content or (None if parsed.tool_calls or parsed.reasoning else "")
            message["tool_calls"] = [call.as_openai() for call in parsed.tool_calls] or None
            if plan.reasoning:  # both names, equal, as vLLM sends them (it deprecated reasoning_content)
                message["reasoning_content"] = message["reasoning"] = parsed.reasoning or None
        choice = {
            "index": c.index,
            "message": message,
            "logprobs": chat_logprobs(llm, r.logprobs, hidden) if body.logprobs else None,
            "finish_reason": finish,
            "stop_reason": r.stop_reason,  # vLLM's: the stop string or stop token id that ended it
        }
        choices.append(choice)
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": run.usage()})


def _logged(request: Request, rid: str) -> str:
    """A choice's name in the log: the request's id (the client's x-request-id), the completion's."""
    return f"{request_id(request)} {rid}"


def _log_warnings(logged: str, index: int, parser: ToolParser) -> None:
    for warning in parser.warnings:
        log.warning("%s choice %d: %s", logged, index, warning)


def _event_deltas(events: list, indices: dict[str, int]) -> list[dict]:
    """Parsed events as chat deltas: text as content, or as reasoning_content and reasoning (vLLM's two
    names); a tool call as the OpenAI SDK accumulates it: its index, id, type and name once (with
    ``arguments: ""``), then each piece of its arguments as the model writes it (every delta has
    ``function``). ``indices``: each started call's index in this choice, by id (the next call gets the
    next index)."""
    deltas = []
    for e in events:
        if e.kind == "content":
            deltas.append({"content": e.text})
        elif e.kind == "reasoning":
            deltas.append({"reasoning_content": e.text, "reasoning": e.text})
        elif e.kind == "call_start":
            index = indices.setdefault(e.call.id, len(indices))
            head = {"index": index, "id": e.call.id, "type": "function"}
            deltas.append({"tool_calls": [{**head, "function": {"name": e.call.name, "arguments": ""}}]})
        elif e.kind == "call_args":
            deltas.append({"tool_calls": [{"index": indices[e.call.id], "function": {"arguments": e.text}}]})
    return deltas


async def _chat_events(
    run: Run,
    head: dict,
    body: ChatCompletionRequest,
    hidden: frozenset[int],
    plan: ToolPlan,
    request: Request,
):
    logged = _logged(request, head["id"])
    llm = run.state.llm
    usage_field = chunk_usage(run, body)
    started: set[int] = set()
    parsers: dict[int, ToolParser] = {c.index: plan.parser() for c in run.choices} if plan.parses else {}
    call_indices: dict[int, dict[str, int]] = {i: {} for i in parsers}
    order = IndexOrder()  # a cached later choice is whole before choice 0 starts

    def chunk(
        index: int,
        delta: dict,
        finish: str | None = None,
        logprobs: dict | None = None,
        reason: str | int | None = None,
    ) -> list[str]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        choice["stop_reason"] = reason
        text = sse({**head, "object": "chat.completion.chunk", "choices": [choice], **usage_field(index)})
        return order.send(index, text)

    def said(index: int, message: dict) -> dict:
        if index not in started:
            started.add(index)
            return {"role": "assistant", **message}
        return message

    try:
        async for choice, delta in run.deltas():
            out: list[str] = []
            parser = parsers.get(choice.index)
            lps = chat_logprobs(llm, delta.logprobs, hidden) if body.logprobs else None
            if parser is None:
                if delta.text or (lps and delta.logprobs):  # held-back text's logprobs go out too
                    out += chunk(choice.index, said(choice.index, {"content": delta.text}), None, lps)
            else:
                events = parser.feed(delta.text)
                if delta.finish_reason is not None and delta.finish_reason != "error":
                    events += parser.finish()
                messages = _event_deltas(events, call_indices[choice.index])
                for i, message in enumerate(messages):
                    out += chunk(choice.index, said(choice.index, message), None, lps if i == 0 else None)
                if lps and delta.logprobs and not messages:  # logprobs of held-back text go out in order
                    out += chunk(choice.index, said(choice.index, {"content": ""}), None, lps)
            if delta.finish_reason is not None and delta.finish_reason != "error":
                if choice.index not in started:  # a choice with no text still says who spoke
                    started.add(choice.index)
                    out += chunk(choice.index, {"role": "assistant", "content": ""})
                finish = delta.finish_reason
                if parser is not None:
                    finish = parser.finish_reason(finish)
                    _log_warnings(logged, choice.index, parser)
                out += chunk(choice.index, {}, finish, None, delta.completion.stop_reason)
            for text in out:
                yield text
            if delta.finish_reason == "error":  # ends the stream: the held chunks, then one error
                raise run.failure(delta.completion)
        for text in order.rest():
            yield text
        if body.include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": run.usage()})
    except Exception as exc:  # after the 200 went out, errors travel in the stream
        for text in order.rest():
            yield text
        yield stream_error(exc, request)
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


def _may_be_cached(state: ServerState, body: CompletionRequest) -> bool:
    """Whether a choice of ``body`` may be answered from the response cache (then it takes no row, and
    the count of those that do is known only once the prompts are read)."""
    if state.response_cache is None:
        return False
    try:
        return state.response_cache.caches(
            state.llm.default_params(temperature=body.temperature, seed=body.seed)
        )
    except SamplingParamsError:  # refused by name once the prompts are read
        return True


def _fim_bound(llm: LLM, prefix: str | list[int], suffix: str | None) -> int:
    """At least how many ids `Tokenizer.encode_fim` makes (its three FIM tokens and sequence tokens)."""
    tokenizer = llm.tokenizer
    window = llm.engine.max_seq_len
    bound = tokenizer.min_tokens(prefix, suffix or "", reaching=window) if isinstance(prefix, str) else 0
    return bound + 3 + len(tokenizer.sequence_special_ids[0]) if bound else 0


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

    wants_logprobs = body.logprobs is not None
    extra = {
        "logprobs": body.logprobs,
        "prompt_logprobs": body.logprobs if (body.echo and wants_logprobs) else None,
        "adapter": adapter,
    }

    def naming(k: int, e: APIError) -> APIError:
        if e.param == "prompt" and len(raw_prompts) > 1:  # which of the batch's prompts is too long
            e.param = f"prompt.{k}"
        return e

    def choices_of(k: int, prompt: str | list[int], start: int) -> list[Choice]:
        prompt_ids, echo = read(k, prompt)
        try:
            params = sampling_params(llm, body, len(prompt_ids), 16, **extra)
        except APIError as e:
            raise naming(k, e) from None
        if fim:  # the middle ends where the model closes it (its FIM stop tokens)
            params = llm.fim_params(params)
        each = choice_params(params, body.n)
        return [Choice(start + i, prompt_ids, p, echo=echo) for i, p in enumerate(each)]

    def all_choices() -> list[Choice]:
        if not _may_be_cached(state, body):  # every choice runs: too many are refused before any is read
            check_capacity(state, len(raw_prompts) * body.n, len(raw_prompts), body.n)
        for k, prompt in enumerate(raw_prompts):  # texts that surely cannot fit, before any is tokenized
            bound = _fim_bound(llm, prompt, body.suffix) if fim else llm.min_prompt_tokens(prompt)
            try:
                if bound:
                    check_context(llm, body, bound, at_least=True)
            except APIError as e:
                raise naming(k, e) from None
        choices: list[Choice] = []
        for k, prompt in enumerate(raw_prompts):
            choices += choices_of(k, prompt, len(choices))
        return choices

    # in a worker thread, as chat's: the prompts are read and their parameters checked while the event
    # loop answers others (/health); a million prompts held it for 37 s
    choices = await asyncio.to_thread(all_choices)
    run = Run(state, choices, request_id(request))
    run.start()
    created, rid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    model = state.response_model(adapter)
    fingerprint = state.fingerprint_for(adapter)
    head = {"id": rid, "created": created, "model": model, "system_fingerprint": fingerprint}
    if body.stream:
        return streaming_response(_completion_events(run, head, body, request))
    await collect(run, request)

    def answer(c: Choice) -> dict:
        r = c.result
        return {
            "index": c.index,
            "text": (c.echo.text if c.echo else "") + r.text,
            "logprobs": _completion_logprobs(llm, c, r) if wants_logprobs else None,
            "finish_reason": r.finish_reason,
            "stop_reason": r.stop_reason,
        }

    # in a worker thread: an echoed prompt's logprobs decode it token by token (0.3 s for 30k tokens,
    # which every other stream waited on the loop)
    out = await asyncio.to_thread(lambda: [answer(c) for c in run.choices])
    return JSONResponse({**head, "object": "text_completion", "choices": out, "usage": run.usage()})


def _completion_logprobs(llm: LLM, choice: Choice, result: Completion) -> dict:
    items = [(lp.token_id, lp) for lp in result.logprobs]
    if not choice.echo:
        return LegacyLogprobs(llm).add(items)
    prompt_lps = result.prompt_logprobs or [None] * len(choice.prompt_ids)
    prompt = list(zip(choice.prompt_ids, prompt_lps, strict=True))
    return LegacyLogprobs(llm).add_echoed(choice.echo, prompt, items)


async def _completion_events(run: Run, head: dict, body: CompletionRequest, request: Request):
    llm = run.state.llm
    usage_field = chunk_usage(run, body)
    echoed: set[int] = set()
    logprobs = {c.index: LegacyLogprobs(llm) for c in run.choices}
    order = IndexOrder()  # as chat's: a cached later choice is whole before choice 0 starts

    def chunk(
        index: int,
        text: str,
        finish: str | None = None,
        logprobs: dict | None = None,
        reason: str | int | None = None,
    ) -> list[str]:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        choice["stop_reason"] = reason
        return order.send(
            index, sse({**head, "object": "text_completion", "choices": [choice], **usage_field(index)})
        )

    try:
        async for choice, delta in run.deltas():
            text, items = delta.text, [(lp.token_id, lp) for lp in delta.logprobs]
            lps = None
            if choice.echo and choice.index not in echoed:  # the prompt, and its tokens' logprobs, first
                echoed.add(choice.index)
                text = choice.echo.text + text
                prompt_lps = delta.prompt_logprobs or [None] * len(choice.prompt_ids)
                prompt = list(zip(choice.prompt_ids, prompt_lps, strict=True))
                if body.logprobs is not None:  # off the loop, as a whole answer's (see completions)
                    echoed_lps = logprobs[choice.index].add_echoed
                    lps = await asyncio.to_thread(echoed_lps, choice.echo, prompt, items)
            elif body.logprobs is not None and items:
                lps = logprobs[choice.index].add(items)
            out = chunk(choice.index, text, None, lps) if text or lps else []
            if delta.finish_reason is not None and delta.finish_reason != "error":
                out += chunk(choice.index, "", delta.finish_reason, None, delta.completion.stop_reason)
            for event in out:
                yield event
            if delta.finish_reason == "error":  # ends the stream: the held chunks, then one error
                raise run.failure(delta.completion)
        for event in order.rest():
            yield event
        if body.include_usage:
            yield sse({**head, "object": "text_completion", "choices": [], "usage": run.usage()})
    except Exception as exc:
        for event in order.rest():
            yield event
        yield stream_error(exc, request)
    yield sse("[DONE]")
