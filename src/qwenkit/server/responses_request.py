"""``/v1/responses``' request as a chat request: ``instructions`` the system message, ``input`` items the
messages (``function_call`` items an assistant turn's tool calls, ``function_call_output`` items tool
messages, ``reasoning`` items the next assistant turn's ``reasoning_content``), flat function tools as
chat tools, ``text.format`` as ``response_format``; what needs stored responses is refused by name, and a
chat error is named as the client named it (``rename_error``)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from qwenkit.server.errors import APIError, named_param
from qwenkit.server.request_params import VLLM_FIELDS
from qwenkit.server.response_logprobs import INCLUDE, refuse_unaligned
from qwenkit.server.schemas import ChatCompletionRequest, ResponsesRequest
from qwenkit.server.tool_use import NAMED_USAGE
from qwenkit.tokenizer import TokenizerError
from qwenkit.tokenizer.base import LONE_SURROGATE, check_unicode
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


def rename_error(e: APIError) -> None:
    """A chat route's error (``start_chat``'s) named as the client named it: its Responses field names."""
    e.param = _PARAMS.get(e.param or "", e.param)
    e.message = _CHAT_NAMES.sub(lambda m: _PARAMS[m.group(0)], e.message.replace(NAMED_USAGE, _NAMED_USAGE))
