"""``/v1/responses``: OpenAI's Responses API over the chat route, stateless (as vLLM serves it by default).

A request becomes a chat request (``instructions`` the system message, ``input`` items the messages:
``function_call`` items an assistant turn's tool calls, ``function_call_output`` items tool messages), runs
exactly as ``/v1/chat/completions`` would (template, tools, grammar, reasoning split), and comes back as
output items: ``reasoning``, ``message`` and ``function_call``, in the order the model wrote them
(whole or streamed, the same items: one writer builds both). Streamed, each item is added, filled by
deltas and done, between ``response.created`` and ``response.completed`` (``response.incomplete`` when
``max_output_tokens`` cut it short), the order the openai SDK's ``responses.stream()`` checks. A call is
sent once it is whole: one whose JSON breaks becomes text, never a call a client would run. With
``include: ["message.output_text.logprobs"]`` each text part and delta carries its own tokens' entries
(``response_logprobs``); ``top_logprobs`` alone gives none, as OpenAI's API and vLLM.

Nothing is stored, so ``previous_response_id`` and ``background`` are refused by name: the client sends
the whole conversation in ``input``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from qwenkit.engine import SamplingParams
from qwenkit.generate import Completion
from qwenkit.server.completions import ChatRun, start_chat
from qwenkit.server.errors import APIError, log_failure, named_param
from qwenkit.server.request_params import VLLM_FIELDS
from qwenkit.server.response_logprobs import INCLUDE, TextLogprobs, refuse_unaligned
from qwenkit.server.runs import collect, streaming_response
from qwenkit.server.schemas import ChatCompletionRequest, ResponsesRequest
from qwenkit.server.state import ServerState
from qwenkit.server.tool_use import NAMED_USAGE
from qwenkit.tokenizer import TokenizerError
from qwenkit.tokenizer.base import LONE_SURROGATE, check_unicode
from qwenkit.tokenizer.thinking import THINK_CLOSE
from qwenkit.tools.calls import Event, ToolCall
from qwenkit.tools.template_style import arguments_object

# The chat request's fields a Responses error names under their Responses names.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}
_CHAT_NAMES = re.compile(r"\b(?:" + "|".join(_PARAMS) + r")\b")
# The named tool_choice a chat error shows, in the Responses shape.
_NAMED_USAGE = 'Correct usage: `{"type": "function", "name": "my_function"}`'

# Sampling fields vLLM also takes on /v1/responses, passed to the chat request as they are.
_SAMPLING_EXTRAS = (
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "stop_token_ids",
    "logit_bias",
    "ignore_eos",
    "min_tokens",
    "chat_template_kwargs",
)
_TEXT_PARTS = ("input_text", "output_text", "text")


def _bad_input(where: str, problem: str) -> APIError:
    return APIError(400, f"{where}: {problem}", "input", "invalid_value")


def _text(content: Any, where: str, field: str = "content") -> str:
    """A message's content (or a call output's ``field``): a string, or text parts (``input_text``,
    ``output_text``) joined."""
    if isinstance(content, str):
        return content
    where = f"{where}.{field}"
    if not isinstance(content, list):
        raise _bad_input(where, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            shown = kind if kind is not None else type(part).__name__
            raise _bad_input(f"{where}[{j}]", f"only text parts are supported, got {shown!r}")
        texts.append(part["text"])
    return "".join(texts)


def input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """``input`` as chat messages. Consecutive ``function_call`` items are one assistant turn's calls
    (joined to the assistant message just before them); a ``reasoning`` item is the ``reasoning_content``
    of the assistant turn right after it (dropped when another message comes first)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    reasoning = ""
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad_input(where, f"must be an object, got {type(item).__name__}")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad_input(
                    f"{where}.role", f"must be user, system, developer or assistant, got {role!r}"
                )
            message: dict[str, Any] = {"role": role, "content": _text(item.get("content"), where)}
            if role == "assistant" and reasoning:
                message["reasoning_content"] = reasoning
            reasoning = ""  # a turn's reasoning never reaches a later turn's (one cut off while thinking)
            messages.append(message)
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise _bad_input(f"{where}.{key}", "must be a string")
            if arguments_object(item["arguments"]) is None:
                raise _bad_input(
                    f"{where}.arguments", f"must be a JSON object, got {item['arguments'][:100]!r}"
                )
            call = {"id": item["call_id"], "type": "function"}
            call["function"] = {"name": item["name"], "arguments": item["arguments"]}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                turn = {"role": "assistant", "content": "", "tool_calls": [call]}
                if reasoning:
                    turn["reasoning_content"], reasoning = reasoning, ""
                messages.append(turn)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad_input(f"{where}.call_id", "must be a string")
            output, reasoning = _text(item.get("output"), where, "output"), ""
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning += "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise _bad_input(
                f"{where}.type", f"{kind!r} items are not supported (text messages and function calls are)"
            )
    return messages


def _chat_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """Responses' flat function tools as chat tools; built-in tools (web search, files) are refused."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise APIError(400, f"tools[{i}]: only function tools are supported, got type {kind!r}", "tools")
        if not isinstance(tool.get("name"), str):
            raise APIError(400, f"tools[{i}].name must be a string", "tools")
        fn = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError(
                400,
                'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
                "tool_choice",
            )
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as the chat route's ``response_format``."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, "text.format.type must be text, json_object or json_schema", "text.format")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    if not isinstance(fmt.get("schema", {}), dict):  # none: any JSON object, as on the chat route
        raise APIError(400, "text.format.schema must be a JSON schema object", "text.format")
    spec = {key: fmt[key] for key in ("name", "schema", "strict") if key in fmt}
    return {"type": "json_schema", "json_schema": spec}


def refuse_stateful(body: ResponsesRequest) -> None:
    """What needs stored responses, runs after the request returns, or belongs to the chat route: refused
    by name."""
    if body.previous_response_id is not None:
        raise APIError(
            400,
            "previous_response_id needs stored responses, which this server does not keep; send the whole "
            "conversation in `input`",
            "previous_response_id",
            "unsupported",
        )
    for name in ("background", "conversation", "prompt"):  # `prompt`: a stored prompt template
        if (body.model_extra or {}).get(name) not in (None, False):
            raise APIError(400, f"{name} is not supported (nothing is stored)", name, "unsupported")
    if (body.model_extra or {}).get("response_format") is not None:  # as OpenAI: moved, never ignored
        raise APIError(
            400,
            "response_format is the chat route's field; on /v1/responses use text.format",
            "response_format",
            "unsupported",
        )
    if body.truncation not in (None, "disabled"):
        raise APIError(400, 'truncation must be "disabled": input is never cut to fit', "truncation")


# Fields a Response object echoes as sent (instructions and tools the chat template also renders).
_ECHOED = ("instructions", "tools", "tool_choice", "text", "reasoning", "user", "metadata")


def refuse_invalid_unicode(body: ResponsesRequest) -> None:
    """A lone surrogate (JSON's "\\ud800") in a field the response echoes: a 400 naming it, as in a prompt;
    echoed, it cannot be written as UTF-8 (a 500, or a stream cut before its first event)."""
    for name in _ECHOED:
        found = _lone_surrogate(getattr(body, name), name)
        if found is not None:
            param, text = found
            try:
                check_unicode(text, param)
            except TokenizerError as e:
                raise APIError(400, str(e), param, "invalid_value") from None


def _lone_surrogate(value: Any, path: str) -> tuple[str, str] | None:
    """(the path, the text) of the first string in ``value`` holding a lone surrogate; a dict key names
    its dict."""
    if isinstance(value, str):
        return (path, value) if LONE_SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and LONE_SURROGATE.search(key):
            return path, key
        found = _lone_surrogate(item, f"{path}.{key}")
        if found is not None:
            return found
    return None


def wants_logprobs(body: ResponsesRequest) -> bool:
    return INCLUDE in (body.include or [])


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that carries out ``body``."""
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages += input_messages(body.input)
    if not messages:
        raise _bad_input("input", "is empty")
    extra = body.model_extra or {}
    kwargs = extra.get("chat_template_kwargs")
    asked = [extra.get("continue_final_message")]
    asked += [kwargs.get("continue_final_message")] if isinstance(kwargs, dict) else []
    if any(value is not None and value is not False for value in asked):
        raise APIError(  # a Responses turn is always the model's new one: nothing to continue
            400,
            "continue_final_message is not supported on /v1/responses; use /v1/chat/completions "
            "with add_generation_prompt false",
            "continue_final_message",
            "unsupported",
        )
    # vLLM's extensions the chat route refuses go with them, refused there by name rather than ignored here
    passed = (*_SAMPLING_EXTRAS, *VLLM_FIELDS)
    chat: dict[str, Any] = {key: extra[key] for key in passed if key in extra}
    effort = (body.reasoning or {}).get("effort")
    if effort is not None:  # as vLLM: the template may read it (Qwen's ignore it)
        chat["chat_template_kwargs"] = {
            "reasoning_effort": effort,
            **(chat.get("chat_template_kwargs") or {}),
        }
    chat |= {
        "model": body.model,
        "messages": messages,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": body.max_output_tokens,
        "tools": _chat_tools(body.tools),
        "tool_choice": _chat_tool_choice(body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body.text),
    }
    if wants_logprobs(body):  # as OpenAI and vLLM: top_logprobs alone gives none
        chat |= {"logprobs": True, "top_logprobs": body.top_logprobs}
    try:
        request = ChatCompletionRequest.model_validate(chat)
    except ValidationError as e:
        first = e.errors()[0]
        named = named_param(first)  # schemas.invalid names the part at fault
        loc = named or ".".join(str(p) for p in first["loc"])
        param = _PARAMS.get(str(first["loc"][0]), named or str(first["loc"][0])) if first["loc"] else None
        raise APIError(400, f"{loc}: {first['msg']}", param, "invalid_value") from None
    if wants_logprobs(body):
        refuse_unaligned(request)
    return request


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
        e.param = _PARAMS.get(e.param or "", e.param)
        e.message = _CHAT_NAMES.sub(
            lambda m: _PARAMS[m.group(0)], e.message.replace(NAMED_USAGE, _NAMED_USAGE)
        )
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
