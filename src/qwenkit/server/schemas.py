"""Request bodies of the OpenAI-compatible API, validated with the ranges the engine accepts.

Unknown fields are accepted and ignored (clients send extras: qwen-agent's ``extra``, LangChain's
``parallel_tool_calls``), but every known field is checked, so a bad value is a 400 naming the field.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_N = 16
MAX_STOP = 16
_TOKEN_KEY = re.compile(r"[0-9]+")  # ASCII digits only: int() also takes " 5", "+5", "5_0" and "٣"
_LEADING_ZERO = re.compile(r"(?:^|,)0[0-9]")  # in keys joined by commas: "05" names token 5 too


def invalid(param: str, message: str) -> PydanticCustomError:
    """A validation error naming the part of a field at fault (``stop.1``, ``prompt.0.3``): the error
    handler makes it a 400 whose param is that path."""
    return PydanticCustomError("invalid_value", "{message}", {"message": message, "param": param})


def shown(value: Any) -> str:
    return json.dumps(value)[:60]


def check_token_ids(ids: list[Any], param: str) -> None:
    """Token ids are JSON integers >= 0: never 1.0 or true (which lax parsing takes as token 1) or "5"."""
    if all(type(t) is int for t in ids) and min(ids, default=0) >= 0:
        return
    i = next(i for i, t in enumerate(ids) if type(t) is not int or t < 0)
    raise invalid(f"{param}.{i}", f"a token id is an integer >= 0, got {shown(ids[i])}")


def _bias_in_bulk(bias: dict) -> set[type] | None:
    """The kinds of a logit_bias's values if every entry passes (None if one may not: the walk in the
    schema names it), checked in calls that each take all entries at once: one by one, a bias over the
    whole vocabulary (151,936 entries) held the server's event loop for 0.5 s."""
    keys, values = list(bias), list(bias.values())
    if set(map(type, keys)) != {str} or not all(keys):
        return None
    digits = "".join(keys)
    # ASCII digits, as _TOKEN_KEY; and no leading 0, so no two keys name one token
    if not (digits.isascii() and digits.isdigit()) or _LEADING_ZERO.search(",".join(keys)):
        return None
    kinds = set(map(type, values))
    if not kinds <= {int, float} or min(values) < -100 or max(values) > 100:
        return None
    return None if any(map(math.isnan, values)) else kinds


# A token id in a list: a JSON integer >= 0 (errors name its index: tokens.3)
TokenId = Annotated[int, Field(strict=True, ge=0)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool = Field(False, strict=True)  # "yes" or "no" would pass lax parsing as True/False
    # vLLM's: every chunk carries its choice's usage so far (with include_usage only, as in vLLM)
    continuous_usage_stats: bool = Field(False, strict=True)


def number(default: Any = None, **bounds: float) -> Any:
    """A float field: a JSON number (an int too), never a string, a boolean, NaN or infinity."""
    return Field(default, strict=True, allow_inf_nan=False, **bounds)


def integer(default: Any = None, **bounds: Any) -> Any:
    """An int field: a JSON integer, never "5", 5.0 or true (which lax parsing would take as 5 or 1)."""
    return Field(default, strict=True, **bounds)


def flag(default: bool = False) -> Any:
    """A bool field: a JSON boolean, never "yes" or 1."""
    return Field(default, strict=True)


class SamplingFields(_Lenient):
    """Fields shared by chat and text completions. Numbers and booleans are parsed strictly, and an
    explicit null means the default for every field (the OpenAI API marks them nullable)."""

    model: str | None = None
    max_tokens: int | None = integer(ge=0)
    max_completion_tokens: int | None = integer(ge=0)
    temperature: float | None = number(ge=0, le=100)
    top_p: float | None = number(gt=0, le=1)
    top_k: int | None = integer(ge=-1)  # -1 or 0: off (vLLM uses -1)
    min_p: float | None = number(ge=0, le=1)
    repetition_penalty: float | None = number(gt=0, le=10)
    presence_penalty: float | None = number(ge=-2, le=2)
    frequency_penalty: float | None = number(ge=-2, le=2)
    seed: int | None = integer(ge=-(2**63), lt=2**63)  # int64, as OpenAI's API and vLLM take it
    n: int = integer(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP)
    include_stop_str_in_output: bool = flag()
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = flag()
    min_tokens: int = integer(0, ge=0)  # vLLM's: no eos, stop token or stop string before this many
    stream: bool = flag()
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    @field_validator("logit_bias", mode="wrap")
    @classmethod
    def _token_ids(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if not isinstance(value, dict) or not value:
            return handler(value)  # not an object: the type's own error; {}: nothing to check
        kinds = _bias_in_bulk(value)
        if kinds == {float}:
            return value  # what pydantic's own pass, entry by entry, would give
        if kinds is not None:
            return handler(value)
        seen: dict[int, str] = {}
        for key, bias in value.items():
            if not _TOKEN_KEY.fullmatch(key):
                raise invalid("logit_bias", f"keys must be token ids, got {key!r}")
            if int(key) in seen:
                raise invalid("logit_bias", f"keys {seen[int(key)]!r} and {key!r} name the same token")
            seen[int(key)] = key
            if type(bias) not in (int, float) or (type(bias) is float and not math.isfinite(bias)):
                raise invalid(f"logit_bias.{key}", f"a bias is a number, got {shown(bias)}")
            if not -100 <= bias <= 100:  # an int past a float's range (10**400) cut short: float() raised
                got = shown(bias) if abs(bias) > 1e300 else float(bias)
                raise invalid(
                    f"logit_bias.{key}", f"values must be in [-100, 100], got {got} for token {key}"
                )
        return handler(value)

    @field_validator("stream_options")
    @classmethod
    def _only_with_a_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # vLLM's rule and words (clients match them): options set on a request that does not stream are
        # refused, not ignored; null or {} sets none
        if (
            value is not None
            and (value.model_fields_set or value.model_extra)
            and not info.data.get("stream")
        ):
            raise invalid("stream_options", "Stream options can only be defined when `stream=True`.")
        return value

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        bias = self.logit_bias or {}
        return tuple(sorted(zip(map(int, bias), bias.values(), strict=True)))

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        # an empty stop string would end every completion at once: vLLM refuses it, and so does this
        if value == "":
            raise invalid("stop", "a stop sequence cannot be empty")
        if isinstance(value, list):
            if len(value) > MAX_STOP:
                raise invalid("stop", f"at most {MAX_STOP} stop sequences")
            for i, stop in enumerate(value):
                if not isinstance(stop, str):
                    raise invalid(f"stop.{i}", f"a stop sequence is a string, got {shown(stop)}")
                if not stop:
                    raise invalid(f"stop.{i}", "a stop sequence cannot be empty")
        return value

    @field_validator("stop")
    @classmethod
    def _as_list(cls, value: str | list[str] | None) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        # the union's own error said "Input should be a valid string" of an image part or a part missing
        # its text; the part at fault is named instead
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    got = f"a part of type {shown(kind)}" if isinstance(part, dict) else shown(part)
                    message = f'only text parts are supported ({{"type": "text", "text": ...}}), got {got}'
                    raise invalid(f"content.{i}", message)
                if not isinstance(part.get("text"), str):
                    raise invalid(
                        f"content.{i}.text", f"a text part's text is a string, got {shown(part.get('text'))}"
                    )
        return value

    def as_template_message(self) -> dict[str, Any]:
        """The dict the chat template renders; text parts are joined, ``developer`` is ``system``."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        message["content"] = content if content is not None else ""
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.role == "tool":  # qwen-agent sends `id` instead of `tool_call_id`
            message["tool_call_id"] = self.tool_call_id or (self.model_extra or {}).get("id")
        if self.name:
            message["name"] = self.name
        # vLLM deprecated reasoning_content for `reasoning`; transformers calls it `thinking`
        extra = self.model_extra or {}
        names = (self.reasoning_content, extra.get("reasoning"), extra.get("thinking"))
        reasoning = next((r for r in names if isinstance(r, str) and r), None)
        if reasoning:
            message["reasoning_content"] = reasoning
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = flag()
    top_logprobs: int | None = integer(ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | {"type": "function", ...}
    parallel_tool_calls: bool | None = Field(None, strict=True)  # lax parsing takes "no" as false
    response_format: dict[str, Any] | None = None  # text | json_object | json_schema
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = flag(True)
    # vLLM's prefill: the prompt ends inside the final message (with add_generation_prompt false)
    continue_final_message: bool = flag()

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        # OpenAI and vLLM refuse this too: alternatives without `logprobs` would be silently dropped
        if value and not info.data.get("logprobs"):
            raise invalid("top_logprobs", "`logprobs` must be set to true to get top_logprobs")
        return value


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    echo: bool = flag()
    logprobs: int | None = integer(ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = integer(ge=1, le=MAX_N)

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Text, a list of texts, token ids, or a list of token-id lists; the first entry of a list says
        which, and an entry of another kind is named by its index. A list checked here is taken as it
        is: the union's own pass tried every member over every entry (2M ids held the event loop 1 s)."""
        if value == "":
            raise invalid("prompt", "the prompt is empty")
        if not isinstance(value, list) or not value:
            return handler(value)  # text, or not a list: the type's own errors
        first = value[0]
        if isinstance(first, str | list):
            kind = "string" if isinstance(first, str) else "list of token ids"
            for i, prompt in enumerate(value):
                if not isinstance(prompt, type(first)):
                    raise invalid(f"prompt.{i}", f"expected a {kind}, as prompt.0 is, got {shown(prompt)}")
                if not prompt:
                    raise invalid(f"prompt.{i}", "a prompt in the list is empty")
                if isinstance(prompt, list):
                    check_token_ids(prompt, f"prompt.{i}")
        else:
            check_token_ids(value, "prompt")
        return value

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# OpenAI's values of a Responses request's ``include``: only message.output_text.logprobs adds anything
# here (no built-in tools, no stored reasoning), the rest are accepted as clients send them
ResponseIncludable = Literal[
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
]


class ResponsesRequest(_Lenient):
    """OpenAI's ``/v1/responses`` body; ``server.responses`` turns it into a chat request. Unknown fields
    are ignored as on the other routes (vLLM's sampling extensions among them are passed on)."""

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = Field(None, strict=True)
    # caps calls to built-in tools; with function tools only (built-in ones are refused) there is
    # nothing to cap, so it is checked and echoed
    max_tool_calls: int | None = integer(ge=0)
    max_output_tokens: int | None = integer(ge=1)
    temperature: float | None = number(ge=0, le=2)
    top_p: float | None = number(gt=0, le=1)
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool = flag()
    store: bool | None = None  # nothing is stored: every response says "store": false
    previous_response_id: str | None = None
    truncation: str | None = None
    include: list[ResponseIncludable] | None = None  # a misspelt one is a 400, not silently nothing
    top_logprobs: int | None = integer(ge=0, le=20)
    user: str | None = None
    metadata: dict[str, Any] | None = None


class TokenizeRequest(_Lenient):
    """vLLM's ``/tokenize``: a prompt, or messages rendered as a chat request with the same fields would
    render them (``tools`` and ``chat_template_kwargs`` included)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = flag(True)
    add_generation_prompt: bool = flag(True)
    continue_final_message: bool = flag()

    def as_chat_request(self) -> ChatCompletionRequest:
        fields = (
            "messages",
            "tools",
            "chat_template_kwargs",
            "add_generation_prompt",
            "continue_final_message",
        )
        return ChatCompletionRequest.model_validate(
            {**(self.model_extra or {}), **self.model_dump(include=set(fields))}
        )


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[TokenId]


class LoadLoRAAdapterRequest(_Lenient):
    """vLLM's ``/v1/load_lora_adapter`` body; ``load_inplace`` gives a served name new weights."""

    lora_name: str | None = None
    lora_path: str | None = None
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(_Lenient):
    lora_name: str | None = None


class EmbeddingRequest(_Lenient):
    """OpenAI's ``/v1/embeddings`` body. ``input`` and ``dimensions`` are checked where the message can
    name the input at fault and the model's size (``embedding.check_inputs``); ``user`` is ignored."""

    model: str | None = None
    input: Any
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = integer()
    user: str | None = None


class RerankRequest(_Lenient):
    """vLLM's, Jina's and Cohere's ``/v1/rerank`` body. ``query`` and ``documents`` (strings, or objects
    with a "text" as Cohere's and Jina's clients may send) are checked where the message can name the
    document at fault (``server.rerank``); ``instruction`` is vLLM's (the judge's task)."""

    model: str | None = None
    query: Any = None
    documents: Any = None
    top_n: int | None = integer()
    return_documents: bool | None = Field(None, strict=True)
    instruction: str | None = None
