"""A request's fields as the engine's SamplingParams: the model's defaults under them, max_tokens fitted
to the context window, the seeds of n choices, and the OpenAI fields this server refuses by name."""

from __future__ import annotations

from dataclasses import replace

from qwenkit.engine import SamplingParams, SamplingParamsError
from qwenkit.generate import LLM
from qwenkit.server.errors import APIError
from qwenkit.server.schemas import ChatCompletionRequest, SamplingFields


def sampling_params(
    llm: LLM, body: SamplingFields, prompt_len: int, default_max: int | None, **extra: object
) -> SamplingParams:
    """The request's SamplingParams over the model's defaults, with max_tokens fitted to the context.
    ``default_max``: the max_tokens of a request that names none (the legacy completions route's 16, as
    OpenAI's and vLLM's); None: the length the model's generation_config.json names, else the rest of the
    context window, as vLLM and OpenAI's chat API (qwenkit's own 512 of `generate` cut a thinking model's
    answers off inside its thinking)."""
    limit, asked = check_context(llm, body, prompt_len)
    room = llm.engine.max_seq_len - prompt_len
    top_k = body.top_k if body.top_k is None or body.top_k > 0 else 0
    overrides = dict(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        include_stop_str_in_output=body.include_stop_str_in_output,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        logit_bias=body.logit_bias_pairs(),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        **extra,
    )
    if asked == 0 and extra.get("prompt_logprobs") is None:
        raise APIError(
            400,
            f"{limit} must be at least 1 "
            "(0 only with echo and logprobs on /v1/completions, to score a prompt)",
            limit,
            "invalid_value",
        )
    try:
        # min_tokens is checked against the max_tokens the request gets, not the model's default length
        params = llm.default_params(**{**overrides, "min_tokens": None})
        default = min(default_max or llm.named_max_tokens or room, room)
        if asked is None and body.min_tokens > default:  # the engine's words would name a max_tokens
            raise APIError(400, _min_tokens_past(body.min_tokens, default, room, prompt_len), "min_tokens")
        if asked is not None and body.min_tokens > asked:  # named as sent (the engine says max_tokens)
            raise APIError(
                400, f"min_tokens must be in [0, {limit}={asked}], got {body.min_tokens}", "min_tokens"
            )
        max_tokens = asked if asked is not None else default
        return replace(params, max_tokens=max_tokens, min_tokens=body.min_tokens)
    except SamplingParamsError as e:  # "<field> must ...": the field is the request's of that name
        field = str(e).split(" ", 1)[0]
        raise APIError(
            400, str(e), field if field in type(body).model_fields else None, "invalid_value"
        ) from None


def check_context(
    llm: LLM, body: SamplingFields, prompt_len: int, at_least: bool = False
) -> tuple[str, int | None]:
    """The 400 of a prompt (with the tokens asked for) past the context, else (the max-tokens field
    that counts, its value). Cheap: a chat request's is checked before its tools' grammar is compiled,
    which for a prompt of thousands of tools took a minute to end in this same refusal. ``at_least``:
    ``prompt_len`` is a lower bound (`Tokenizer.min_tokens`), checked before the prompt is tokenized, and
    only against the window: a prompt the bound puts inside it is at most a window's worth of text, as
    cheap to tokenize as any that runs, and its exact count makes the max-tokens message exact."""
    window = llm.engine.max_seq_len
    # max_completion_tokens, OpenAI's newer name, wins when both are given, except a 0 there beside a
    # max_tokens: vLLM and SGLang take `max_completion_tokens or max_tokens` (clients that fill in both send
    # 0 for unset). Alone, a 0 is refused as max_tokens 0 is. Errors name the field that counted.
    # max_tokens 0 (echo + logprobs: scoring the prompt) generates nothing, so the prompt may fill the window
    newer = body.max_completion_tokens
    limit = "max_completion_tokens" if newer or (newer == 0 and body.max_tokens is None) else "max_tokens"
    asked = getattr(body, limit)
    some = "at least " if at_least else ""
    if prompt_len > window or (prompt_len == window and asked != 0):
        raise APIError(
            400,
            f"This model's maximum context length is {window} tokens. However, your prompt has "
            f"{some}{prompt_len} tokens. Please reduce the length of the prompt.",
            "messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            "context_length_exceeded",
        )
    if asked is not None and asked > window - prompt_len and not at_least:
        raise APIError(
            400,
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
            "Please reduce the length of the prompt or completion.",
            limit,
            "context_length_exceeded",
        )
    return limit, asked


def _min_tokens_past(floor: int, default: int, room: int, prompt_len: int) -> str:
    why = f"the default here is {default}"
    if default == room:
        why += f", what the context has left after the prompt's {prompt_len} tokens"
    fix = (
        f"send a max_tokens of at least {floor}"
        if floor <= room
        else "lower min_tokens or shorten the prompt"
    )
    return (
        f"min_tokens {floor} is more than the {default} tokens this request may generate: it sent no "
        f"max_tokens, and {why}; {fix}"
    )


# vLLM's extensions to the request that change the answer, with what counts as leaving them unset. Other
# unknown fields are ignored (clients send extras), but these would give a silent answer without them.
VLLM_FIELDS: dict[str, tuple[tuple[object, ...], str]] = {
    "skip_special_tokens": ((True,), ""),
    "spaces_between_special_tokens": ((True,), ""),
    "use_beam_search": ((False,), "; ask for n choices instead"),
    "length_penalty": ((1, 1.0), ""),
    "prompt_logprobs": ((), "; /v1/completions with echo and logprobs returns them"),
    "allowed_token_ids": (([],), "; logit_bias can ban tokens"),
    "bad_words": (([],), "; logit_bias can ban tokens"),
    "truncate_prompt_tokens": ((), ""),
    "chat_template": ((), ""),
    "guided_json": ((), "; use response_format (json_schema)"),
    "guided_regex": ((), ""),
    "guided_choice": ((), ""),
    "guided_grammar": ((), ""),
    "structured_outputs": ((), "; use response_format (json_schema)"),
    "logits_processors": ((), ""),
    "return_tokens_as_token_ids": ((False,), ""),
}


def refuse_unsupported(body: SamplingFields) -> None:
    """Fields of the OpenAI API (and vLLM's extensions) this server does not carry out: a 400 naming each
    that is set, never a silent answer without them."""
    extra = body.model_extra or {}
    for name, (unset, hint) in VLLM_FIELDS.items():
        value = extra.get(name)
        if value is not None and not any(value == u and type(value) is type(u) for u in unset):
            raise APIError(400, f"{name} (a vLLM extension) is not supported{hint}", name, "unsupported")
    for name, instead in (("functions", "tools"), ("function_call", "tool_choice")):
        if extra.get(name) is not None:
            raise APIError(
                400, f"{name} (the legacy form) is not supported; use {instead}", name, "unsupported"
            )
    if extra.get("suffix") is not None:  # the chat routes' extra: fill-in-the-middle is text completions'
        raise APIError(
            400,
            "suffix (fill-in-the-middle) is supported on /v1/completions, with a text prompt",
            "suffix",
            "unsupported",
        )
    if getattr(body, "best_of", None) not in (None, 1):
        raise APIError(400, "best_of is not supported; ask for n choices instead", "best_of", "unsupported")


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices of one prompt: seeded requests get seed, seed+1, ... so they differ yet reproduce."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [replace(params, seed=params.seed + i) for i in range(n)]
