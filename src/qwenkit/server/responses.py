"""``/v1/responses``: OpenAI's Responses API over the chat route, stateless (as vLLM serves it by default).

A request becomes a chat request (``responses_request``: ``instructions`` the system message, ``input``
items the messages: ``function_call`` items an assistant turn's tool calls, ``function_call_output`` items
tool messages), runs exactly as ``/v1/chat/completions`` would (template, tools, grammar, reasoning
split), and comes back as output items: ``reasoning``, ``message`` and ``function_call``, in the order the
model wrote them (whole or streamed, the same items: one writer builds both). Streamed, each item is
added, filled by deltas and done, between ``response.created`` and ``response.completed``
(``response.incomplete`` when ``max_output_tokens`` cut it short), the order the openai SDK's
``responses.stream()`` checks. A call is sent once it is whole: one whose JSON breaks becomes text, never
a call a client would run. With ``include: ["message.output_text.logprobs"]`` each text part and delta
carries its own tokens' entries (``response_logprobs``); ``top_logprobs`` alone gives none, as OpenAI's
API and vLLM.

Nothing is stored, so ``previous_response_id`` and ``background`` are refused by name: the client sends
the whole conversation in ``input``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from qwenkit.engine import SamplingParams
from qwenkit.generate import Completion
from qwenkit.server.completions import ChatRun, start_chat
from qwenkit.server.errors import APIError, log_failure
from qwenkit.server.response_logprobs import TextLogprobs
from qwenkit.server.responses_request import (
    chat_request,
    refuse_invalid_unicode,
    refuse_stateful,
    rename_error,
    wants_logprobs,
)
from qwenkit.server.runs import collect, streaming_response
from qwenkit.server.schemas import ResponsesRequest
from qwenkit.server.state import ServerState
from qwenkit.tokenizer.thinking import THINK_CLOSE
from qwenkit.tools.calls import Event, ToolCall

# --------------------------------------------------------------------------------------------------
# Output items


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text or status == "completed" else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def output_text(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(
    item_id: str, text: str | None, status: str = "completed", logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    content = [] if text is None else [output_text(text, logprobs)]
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": content}


def call_item(item_id: str, call: ToolCall, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def usage(started: ChatRun, think_close: int | None) -> dict[str, Any]:
    """Token counts; reasoning tokens are the reply's up to and including its ``</think>`` (all of them
    when it was cut off while thinking)."""
    chat = started.run.usage()
    result = started.run.choices[0].result
    reasoning_tokens = 0
    if started.plan.reasoning and result is not None:
        ids = result.token_ids
        if think_close is not None and think_close in ids:
            reasoning_tokens = ids.index(think_close) + 1
        elif started.plan.in_reasoning or (ids and result.text.lstrip().startswith("<think>")):
            reasoning_tokens = len(ids)
    return {
        "input_tokens": chat["prompt_tokens"],
        "input_tokens_details": {
            "cached_tokens": chat["prompt_tokens_details"]["cached_tokens"],
            "cache_write_tokens": 0,
        },
        "output_tokens": chat["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": chat["total_tokens"],
    }


def _status(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


class ResponseHead:
    """The fields every Response object of one request carries, echoing the request's settings: the
    sampling ones as the request ran (``params``: its values, or the model's defaults it got), as OpenAI's
    and vLLM's, never null for a value that was known."""

    def __init__(self, body: ResponsesRequest, model: str, params: SamplingParams) -> None:
        self.id, self.created = _new_id("resp"), int(time.time())
        self.fields = {
            "instructions": body.instructions,
            "max_output_tokens": params.max_tokens,
            "max_tool_calls": body.max_tool_calls,
            "model": model,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None},
            "store": False,
            "temperature": params.temperature,
            "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": body.tools or [],
            "top_p": params.top_p,
            "top_logprobs": body.top_logprobs or 0,  # OpenAI's default
            "truncation": "disabled",
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        incomplete: dict[str, str] | None = None,
        error: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            # "Only present when the status is completed" (OpenAI's reference): null when cut short
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": incomplete,
            **self.fields,
            "output": output,
            "usage": usage,
        }


async def responses(state: ServerState, body: ResponsesRequest, request: Request):
    refuse_stateful(body)
    refuse_invalid_unicode(body)
    chat = chat_request(body)
    try:
        started = await start_chat(state, chat, request)
    except APIError as e:  # named as the client named it
        rename_error(e)
        raise
    head = ResponseHead(body, state.response_model(started.adapter), started.run.choices[0].params)
    think_close = state.llm.tokenizer.added_tokens.get(THINK_CLOSE)
    logprobs = TextLogprobs(state.llm, started.hidden) if wants_logprobs(body) else None
    if body.stream:
        return streaming_response(_events(started, head, think_close, logprobs, request))
    await collect(started.run, request)
    result: Completion = started.run.choices[0].result
    parser = started.plan.parser()
    status, incomplete = _status(result.finish_reason)
    writer = ItemWriter()  # the items the stream would build, in the order the model wrote them
    events = [*parser.feed(result.text), *parser.finish()]
    if logprobs is not None:
        logprobs.add(result.logprobs, final=True)
    writer.feed(events, logprobs and logprobs.for_events(events, len(result.text)))
    writer.end(status)
    return JSONResponse(head.response(status, writer.output, usage(started, think_close), incomplete))


# --------------------------------------------------------------------------------------------------
# Streaming


class ItemWriter:
    """A reply's output items as they form, and the events that form them (server-sent, with their
    ``event:`` line and a ``sequence_number``): the stream sends the events, a whole reply keeps only the
    items, so both give the same items."""

    def __init__(self) -> None:
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # items done, in order
        self.open: dict[str, Any] | None = None  # the item being filled: its kind, id, text
        self.item_ids = {"reasoning": "rs", "content": "msg"}

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def text(self, kind: str, delta: str, logprobs: list[dict[str, Any]]) -> list[str]:
        """``delta`` of reasoning or content (with its tokens' ``logprobs``): into the open item of that
        kind, opening one if needed."""
        out = (
            [] if self.open is not None and self.open["kind"] == kind else [*self.close(), *self.begin(kind)]
        )
        self.open["text"] += delta
        self.open["logprobs"] += logprobs
        where = {"item_id": self.open["id"], "output_index": len(self.output), "content_index": 0}
        if kind == "reasoning":
            return [*out, self.event("response.reasoning_text.delta", **where, delta=delta)]
        return [*out, self.event("response.output_text.delta", **where, delta=delta, logprobs=logprobs)]

    def begin(self, kind: str) -> list[str]:
        item_id = _new_id(self.item_ids[kind])
        self.open = {"kind": kind, "id": item_id, "text": "", "logprobs": []}
        index = len(self.output)
        if kind == "reasoning":
            item, part = reasoning_item(item_id, "", "in_progress"), {"type": "reasoning_text", "text": ""}
        else:
            item = message_item(item_id, None, "in_progress")
            part = output_text("")
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        return [
            self.event("response.output_item.added", output_index=index, item=item),
            self.event("response.content_part.added", **where, part=part),
        ]

    def close(self, status: str = "completed") -> list[str]:
        """End the open item (its text done, its part done, the item done)."""
        if self.open is None:
            return []
        kind, item_id, text, logprobs = (self.open[key] for key in ("kind", "id", "text", "logprobs"))
        self.open, index = None, len(self.output)
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        if kind == "reasoning":
            item = reasoning_item(item_id, text, "completed")
            part, done = item["content"][0], self.event("response.reasoning_text.done", **where, text=text)
        else:
            item = message_item(item_id, text, status, logprobs)
            part = item["content"][0]
            done = self.event("response.output_text.done", **where, text=text, logprobs=logprobs)
        self.output.append(item)
        return [
            done,
            self.event("response.content_part.done", **where, part=part),
            self.event("response.output_item.done", output_index=index, item=item),
        ]

    def feed(self, events: list[Event], logprobs: list[list[dict[str, Any]]] | None = None) -> list[str]:
        """The parser's events as output items: text into the open item, each whole call an item.
        ``logprobs``: per event, its tokens' entries (message text's, when asked for)."""
        out = []
        for i, e in enumerate(events):
            if e.kind in ("content", "reasoning") and e.text:
                out += self.text(e.kind, e.text, logprobs[i] if logprobs else [])
            elif e.kind == "tool_call" and e.call is not None:
                out += self.call(e.call)
        return out

    def end(self, status: str) -> list[str]:
        """Close the open item; a reply with no items at all is still an (empty) message."""
        opened = self.begin("content") if self.open is None and not self.output else []
        return [*opened, *self.close(status)]

    def call(self, call: ToolCall) -> list[str]:
        """A whole call: added, its arguments in one delta, done."""
        out, index, item_id = self.close(), len(self.output), _new_id("fc")
        self.output.append(call_item(item_id, call, call.arguments))
        where = {"item_id": item_id, "output_index": index}
        return [
            *out,
            self.event(
                "response.output_item.added",
                output_index=index,
                item=call_item(item_id, call, "", "in_progress"),
            ),
            self.event("response.function_call_arguments.delta", **where, delta=call.arguments),
            self.event(
                "response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments
            ),
            self.event("response.output_item.done", output_index=index, item=self.output[-1]),
        ]


async def _events(
    started: ChatRun,
    head: ResponseHead,
    think_close: int | None,
    logprobs: TextLogprobs | None,
    request: Request,
):
    writer = ItemWriter()
    parser = started.plan.parser()
    yield writer.event("response.created", response=head.response("in_progress", []))
    yield writer.event("response.in_progress", response=head.response("in_progress", []))
    try:
        finish, seen = None, 0  # seen: characters of the reply's text so far
        async for _choice, delta in started.run.deltas():
            if delta.finish_reason == "error":
                raise started.run.failure(delta.completion)
            events = parser.feed(delta.text)
            if delta.finish_reason is not None:
                events += parser.finish()
                finish = delta.finish_reason
            seen += len(delta.text)
            if logprobs is not None:
                logprobs.add(delta.logprobs, final=finish is not None)
            for line in writer.feed(events, logprobs and logprobs.for_events(events, seen)):
                yield line
        status, incomplete = _status(finish)
        for line in writer.end(status):
            yield line
        final = head.response(status, writer.output, usage(started, think_close), incomplete)
        yield writer.event(f"response.{status}", response=final)
    except Exception as exc:  # after the 200 went out, a failure is the response's own end
        log_failure(request, exc)
        message = exc.message if isinstance(exc, APIError) else f"internal error: {type(exc).__name__}"
        code = (exc.code if isinstance(exc, APIError) else None) or "server_error"
        for line in writer.close("incomplete"):
            yield line
        failed = head.response("failed", writer.output, None, None, {"code": code, "message": message})
        yield writer.event("response.failed", response=failed)
