"""Request fields as OpenAI's API defines them: null means the default, numbers and booleans are JSON
numbers and booleans (never "5" or true for a count), logit_bias is applied, and the fields this server
does not carry out are refused by name rather than ignored."""

from __future__ import annotations

import json

import httpx
import pytest

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HELLO = [{"role": "user", "content": "hello"}]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def test_null_means_the_default(server):
    base = {"messages": HELLO, "max_tokens": 4, "temperature": 0}
    plain = post(server, CHAT, base).json()["choices"]
    nulls = {"n": None, "logprobs": None, "stream": None, "ignore_eos": None, "add_generation_prompt": None}
    assert post(server, CHAT, {**base, **nulls}).json()["choices"] == plain
    text = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
    assert (
        post(server, COMPLETIONS, {**text, "n": None, "echo": None, "best_of": None}).json()["choices"]
        == post(server, COMPLETIONS, text).json()["choices"]
    )


@pytest.mark.parametrize(
    ("path", "fields", "param", "words"),
    [
        (CHAT, {"max_tokens": "5"}, "max_tokens", "valid integer"),
        (CHAT, {"max_tokens": True}, "max_tokens", "valid integer"),
        (CHAT, {"n": 2.0}, "n", "valid integer"),
        (CHAT, {"stream": "yes"}, "stream", "valid boolean"),
        (CHAT, {"parallel_tool_calls": "no"}, "parallel_tool_calls", "valid boolean"),
        (
            CHAT,
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
            "valid boolean",
        ),
        (
            COMPLETIONS,
            {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": "no"}},
            "stream_options.continuous_usage_stats",
            "valid boolean",
        ),
        ("/tokenize", {"add_special_tokens": "no"}, "add_special_tokens", "valid boolean"),
        (CHAT, {"temperature": "0.5"}, "temperature", "valid number"),
        (COMPLETIONS, {"logprobs": True}, "logprobs", "valid integer"),
        (
            CHAT,
            {"max_tokens": 0},
            "max_tokens",
            "max_tokens must be at least 1 (0 only with echo and logprobs",
        ),
        (  # the field given is the one named, and max_completion_tokens takes precedence over max_tokens
            CHAT,
            {"max_completion_tokens": 100000},
            "max_completion_tokens",
            "you requested 100009 tokens (9 in the prompt, 100000 for the completion)",
        ),
        (  # alone (max_tokens null: unset), a 0 is refused as max_tokens 0 is
            CHAT,
            {"max_completion_tokens": 0, "max_tokens": None},
            "max_completion_tokens",
            "max_completion_tokens must be at least 1",
        ),
        (CHAT, {"logit_bias": {"abc": 5}}, "logit_bias", "keys must be token ids, got 'abc'"),
        (
            CHAT,
            {"logit_bias": {"5": 1000}},
            "logit_bias.5",
            "values must be in [-100, 100], got 1000.0 for token 5",
        ),
        # int() took these as token ids: " 5" and "٣" (an Arabic-Indic 3) ran as 5 and 3, "²" was a 500
        (CHAT, {"logit_bias": {" 5": 1}}, "logit_bias", "keys must be token ids, got ' 5'"),
        (CHAT, {"logit_bias": {"\u0663": 1}}, "logit_bias", "keys must be token ids, got '\u0663'"),
        (CHAT, {"logit_bias": {"\u00b2": 1}}, "logit_bias", "keys must be token ids, got '\u00b2'"),
        (CHAT, {"logit_bias": {"05": 1, "5": -1}}, "logit_bias", "keys '05' and '5' name the same token"),
        (CHAT, {"logit_bias": {"5": True}}, "logit_bias.5", "a bias is a number, got true"),  # ran as 1
        (CHAT, {"logit_bias": {"5": "50"}}, "logit_bias.5", 'a bias is a number, got "50"'),
        (
            COMPLETIONS,
            {"logit_bias": {"151936": 1}},
            "logit_bias",
            "logit_bias token id 151936 is outside the vocabulary (0..151935)",
        ),
        (CHAT, {"stop_token_ids": [151645, 1.0]}, "stop_token_ids.1", "valid integer"),  # ran as 1
        (CHAT, {"stop_token_ids": [True]}, "stop_token_ids.0", "valid integer"),
        (CHAT, {"stop_token_ids": [-1]}, "stop_token_ids.0", "greater than or equal to 0"),
        (
            CHAT,
            {"stop_token_ids": [10**6]},
            "stop_token_ids",
            "stop token id 1000000 is outside the vocabulary (0..151935)",
        ),
        (COMPLETIONS, {"stop": ["a", 5]}, "stop.1", "a stop sequence is a string, got 5"),
        ("/detokenize", {"tokens": [9707, 1.0]}, "tokens.1", "valid integer"),
        ("/detokenize", {"tokens": [False]}, "tokens.0", "valid integer"),
        ("/detokenize", {"tokens": [-1]}, "tokens.0", "greater than or equal to 0"),
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens.1", "token id 1000000 is outside the vocabulary"),
        (COMPLETIONS, {"prompt": ""}, "prompt", "the prompt is empty"),
        (
            CHAT,
            {"functions": [{"name": "f"}]},
            "functions",
            "functions (the legacy form) is not supported; use tools",
        ),
        (COMPLETIONS, {"best_of": 3}, "best_of", "best_of is not supported; ask for n choices instead"),
        # vLLM's extensions that change the answer are refused once set, not ignored
        (CHAT, {"min_tokens": 9, "max_tokens": 4}, "min_tokens", "min_tokens must be in [0, max_tokens=4]"),
        (  # the limit the request sent, by its name (it said max_tokens=4, the other field's)
            CHAT,
            {"min_tokens": 9, "max_completion_tokens": 4},
            "min_tokens",
            "min_tokens must be in [0, max_completion_tokens=4], got 9",
        ),
        (COMPLETIONS, {"skip_special_tokens": False}, "skip_special_tokens", "is not supported"),
        (CHAT, {"guided_json": {"type": "object"}}, "guided_json", "use response_format (json_schema)"),
        (COMPLETIONS, {"prompt_logprobs": 1}, "prompt_logprobs", "with echo and logprobs returns them"),
        (CHAT, {"bad_words": ["x"]}, "bad_words", "logit_bias can ban tokens"),
        (CHAT, {"use_beam_search": True}, "use_beam_search", "ask for n choices instead"),
        # options of a stream on a request that does not stream were ignored; OpenAI and vLLM refuse them
        (CHAT, {"stream_options": {"include_usage": True}}, "stream_options", "when `stream=True`"),
        (
            COMPLETIONS,
            {"stream": False, "stream_options": {"include_usage": False}},
            "stream_options",
            "Stream options can only be defined when `stream=True`",
        ),
    ],
)
def test_a_wrong_type_or_unsupported_field_is_a_400_naming_it(server, path, fields, param, words):
    body = {"messages": HELLO} if path == CHAT else {"prompt": "hello"} if path == COMPLETIONS else {}
    r = post(server, path, {**body, "max_tokens": 2, **fields})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and words in error["message"], error


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("stream", [False, True])
def test_max_completion_tokens_0_beside_max_tokens_yields_to_it(server, path, stream):
    """vLLM and SGLang take ``max_completion_tokens or max_tokens``: clients that fill in both fields send
    0 for "unset". That was a 400 "max_completion_tokens must be at least 1" for a request vLLM answers."""
    body = {"messages": HELLO} if path == CHAT else {"prompt": "hello"}
    body |= {"max_completion_tokens": 0, "max_tokens": 3, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
        r.read()
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        usage = chunks[-1]["usage"]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    else:
        usage, finish = r.json()["usage"], r.json()["choices"][0]["finish_reason"]
    assert (usage["completion_tokens"], finish) == (3, "length")


def test_empty_stream_options_without_a_stream_are_accepted(server):
    """As vLLM takes them: null, or an object that sets no option, asks for nothing."""
    for options in (None, {}):
        r = post(server, COMPLETIONS, {"prompt": "hello", "max_tokens": 2, "stream_options": options})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_vllm_extensions_left_at_their_defaults_are_accepted(server):
    """Clients that send vLLM's fields with their default values (or null) are answered as before."""
    unset = {"min_tokens": 0, "skip_special_tokens": True, "use_beam_search": False, "bad_words": []}
    unset |= {"prompt_logprobs": None, "length_penalty": 1.0, "continue_final_message": False}
    r = post(server, CHAT, {"messages": HELLO, "max_tokens": 2, **unset})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("bias", "kept"),
    [
        ({"5": 1, "7": -2.5}, {"5": 1.0, "7": -2.5}),  # ints made floats, as the walk's type check did
        ({"05": 3, "0": -100}, {"05": 3.0, "0": -100.0}),  # a leading 0 is left to the walk: no duplicate
        ({"9": 100.0}, {"9": 100.0}),
    ],
)
def test_a_logit_bias_checked_in_bulk_is_what_the_walk_gives(bias, kept):
    """The schema checks a logit_bias in calls over all entries at once (entry by entry, the whole
    vocabulary held the event loop for 0.5 s); what it accepts, and how, is the walk's."""
    from qwenkit.server.schemas import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({"messages": HELLO, "logit_bias": bias})
    assert body.logit_bias == kept and all(type(v) is float for v in body.logit_bias.values())


@pytest.mark.parametrize(
    ("bias", "words"),
    [
        ({"5": float("nan")}, "a bias is a number, got NaN"),
        ({"5": float("inf")}, "a bias is a number, got Infinity"),
        # math.isfinite(10**400) raised OverflowError, out of the validator: a 500
        ({"5": 10**400}, f"values must be in [-100, 100], got {str(10**400)[:60]} for token 5"),
        ({"5": 1, "05": 2}, "keys '5' and '05' name the same token"),
    ],
)
def test_a_logit_bias_the_bulk_check_refuses_is_named_by_the_walk(bias, words):
    from pydantic import ValidationError

    from qwenkit.server.schemas import ChatCompletionRequest

    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate({"messages": HELLO, "logit_bias": bias})
    assert words in str(raised.value)


def test_nan_temperature_is_refused_as_not_finite(server):
    raw = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": NaN}'
    r = httpx.post(server.url + CHAT, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert "finite number" in r.json()["error"]["message"]


def test_logit_bias_forces_and_bans_tokens(server):
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 0}
    piece = httpx.post(server.url + "/detokenize", json={"tokens": [65]}).json()["prompt"]
    forced = post(server, COMPLETIONS, {**body, "logit_bias": {"65": 100}}).json()["choices"][0]
    assert forced["text"] == piece * 3
    first = post(server, COMPLETIONS, {**body, "max_tokens": 1}).json()["choices"][0]["text"]
    ids = httpx.post(server.url + "/tokenize", json={"prompt": first, "add_special_tokens": False}).json()
    banned = {str(t): -100 for t in ids["tokens"]}
    other = post(server, COMPLETIONS, {**body, "max_tokens": 1, "logit_bias": banned}).json()["choices"][0]
    assert len(ids["tokens"]) == 1 and other["text"] != first
    out_of_vocabulary = post(server, COMPLETIONS, {**body, "logit_bias": {"99999999": 1}}).json()["error"]
    assert "logit_bias token id 99999999 is outside the vocabulary" in out_of_vocabulary["message"]


def test_tokenize_renders_messages_as_the_chat_request_does(server):
    """/tokenize with messages and tools counts the prompt a chat request with them gets (the tools'
    prompt included), not the messages alone."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    bare = httpx.post(server.url + "/tokenize", json={"messages": HELLO}).json()["count"]
    counted = httpx.post(server.url + "/tokenize", json={"messages": HELLO, "tools": tools}).json()["count"]
    used = post(server, CHAT, {"messages": HELLO, "tools": tools, "max_tokens": 1}).json()["usage"]
    assert counted == used["prompt_tokens"] > bare


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"messages": []}, "messages", "messages: List should have at least 1 item"),
        ({"messages": HELLO, "max_tokens": -1}, "max_tokens", "greater than or equal to 0 (got -1)"),
        ({"messages": HELLO, "logit_bias": 5}, "logit_bias", "valid dictionary"),
    ],
)
def test_tokenize_messages_a_chat_request_refuses_are_a_400_naming_the_field(server, fields, param, words):
    """/tokenize validates messages (and the fields beside them) as the chat request they render as;
    that validation ran inside the route, where its error was no request error: a 500."""
    r = post(server, "/tokenize", fields)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_a_wrong_method_is_a_client_error(server):
    r = httpx.get(server.url + CHAT)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def bundled_server():
    """The bundled SmolLM2: a template without reasoning, so replies take the plain (parser-less) path."""
    from live import LiveServer

    from qwenkit.default_model import default_model_path
    from qwenkit.generate import LLM
    from qwenkit.server import ServerConfig, create_app

    with LLM.load(default_model_path(), progress=False) as llm:
        app = create_app(llm, ServerConfig(served_model_name="smol", response_cache_entries=0))
        with LiveServer(app) as live:
            yield live


def test_stream_and_whole_logprobs_agree_when_a_stop_string_takes_all_the_text(bundled_server):
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "logprobs": True}
    text = post(bundled_server, CHAT, body).json()["choices"][0]["message"]["content"]
    stopped = {**body, "stop": [text[:6]]}  # matches at the very start, over tokens: the content is empty
    whole = post(bundled_server, CHAT, stopped).json()["choices"][0]
    with httpx.stream("POST", bundled_server.url + CHAT, json={**stopped, "stream": True}, timeout=120) as s:
        chunks = [json.loads(line[6:])["choices"][0] for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["content"]]
    assert whole["message"]["content"] == ""
    assert "".join(c["delta"].get("content") or "" for c in chunks) == ""
    assert [t["token"] for t in streamed] == [t["token"] for t in whole["logprobs"]["content"]]
    assert len(streamed) >= 2, (text, streamed)


def test_system_fingerprint_tells_another_dtype_or_weights_apart(chat_llm, tiny_chat_model):
    """What a client resuming work against an endpoint can compare: the same model and settings give the
    same fingerprint; another dtype, or other weights under the same config, give another."""
    import torch

    from qwenkit.generate import LLM
    from qwenkit.server.state import model_fingerprint

    same = LLM.load(tiny_chat_model, dtype="float32", progress=False)
    bf16 = LLM.load(tiny_chat_model, dtype="bfloat16", progress=False)
    prints = [model_fingerprint(llm) for llm in (chat_llm, same, bf16)]
    with torch.no_grad():
        same.model.model.norm.weight.add_(1.0)
    assert prints[0] == prints[1] and len({*prints, model_fingerprint(same)}) == 3


def test_a_prompt_of_2m_token_ids_is_validated_in_one_pass():
    """The body is validated on the event loop: pydantic tried the prompt's union member by member, each
    over every id (list[str] failing 2M times), 1.1 s of the loop; a checked list is taken as it is."""
    import time

    from qwenkit.server.schemas import CompletionRequest

    ids = [9707, 1879, 11, 419, 374] * 400_000
    start = time.perf_counter()
    body = CompletionRequest.model_validate({"prompt": ids})
    took = time.perf_counter() - start
    assert body.prompts() == [ids]
    assert took < 0.4, f"validating 2M token ids took {took:.2f} s"


def test_detokenize_gives_embedding_padding_ids_no_text(server, chat_llm):
    """The model's vocabulary (151,936 rows) is larger than the tokenizer's (151,669); a completion's
    text gives a padding id no text, and /detokenize of the same ids was a 400 "unknown token id"."""
    padding = chat_llm.tokenizer.vocab_size
    assert padding < chat_llm.config.vocab_size
    r = httpx.post(
        server.url + "/detokenize", json={"tokens": [9707, padding, 1879, chat_llm.config.vocab_size - 1]}
    )
    assert r.status_code == 200 and r.json() == {"prompt": "Hello world"}


def test_a_too_long_prompt_of_a_batch_is_named_by_its_index(server):
    """lm-eval batches prompts: the one past the context was a 400 naming just "prompt"."""
    r = post(server, COMPLETIONS, {"prompt": ["hello", "hello " * 9000, "hi"], "max_tokens": 2})
    error = r.json()["error"]
    assert (
        r.status_code == 400 and error["param"] == "prompt.1" and error["code"] == "context_length_exceeded"
    )
    assert "However, your prompt has 9001 tokens" in error["message"]
    r = post(server, COMPLETIONS, {"prompt": "hello " * 9000, "max_tokens": 2})
    assert r.json()["error"]["param"] == "prompt"


def test_an_echoed_token_prompt_with_an_embedding_padding_id(server, chat_llm):
    """The id runs (it is in the model's vocabulary) and, echoed, has no text: echo was a 400
    "unknown token id" for the prompt that ran without it."""
    padding = chat_llm.tokenizer.vocab_size
    body = {"prompt": [9707, padding, 1879], "max_tokens": 1, "temperature": 0}
    plain = post(server, COMPLETIONS, body).json()["choices"][0]["text"]
    echoed = post(server, COMPLETIONS, {**body, "echo": True, "logprobs": 0}).json()["choices"][0]
    assert echoed["text"] == "Hello world" + plain
    assert echoed["logprobs"]["tokens"][:3] == ["Hello", "", " world"]
    assert echoed["logprobs"]["text_offset"][:4] == [0, 5, 5, 11]


def test_text_offsets_give_a_hidden_special_token_no_width(server, chat_llm):
    """<|im_end|> sampled under ignore_eos never shows in the text (the engine's text skips special
    tokens), so it takes no width: its offsets ran 10 characters a token past the text, whole and
    streamed, and past the echoed prompt with echo."""
    im_end = chat_llm.tokenizer.token_to_id("<|im_end|>")
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    body |= {"logit_bias": {str(im_end): 100}}
    whole = post(server, COMPLETIONS, body).json()["choices"][0]
    assert (whole["text"], whole["logprobs"]["tokens"]) == ("", ["<|im_end|>"] * 3)
    assert whole["logprobs"]["text_offset"] == [0, 0, 0]
    streamed = post(server, COMPLETIONS, {**body, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    offsets = [
        o for c in chunks for ch in c["choices"] if ch["logprobs"] for o in ch["logprobs"]["text_offset"]
    ]
    assert offsets == [0, 0, 0]
    echoed = post(server, COMPLETIONS, {**body, "echo": True}).json()["choices"][0]
    assert echoed["text"] == "hello" and echoed["logprobs"]["text_offset"] == [0, 5, 5, 5]


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        (COMPLETIONS, '{"prompt": ["ok", "a\\ud800b"], "max_tokens": 2}', "prompt.1"),
        (COMPLETIONS, '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
        ("/tokenize", '{"prompt": "a\\ud800b"}', "prompt"),
    ],
)
def test_a_prompt_that_is_not_valid_unicode_is_named(server, path, raw, param):
    """A JSON escape of a lone surrogate is valid JSON but no text; the 400 named no field."""
    r = httpx.post(server.url + path, content=raw.encode(), headers={"content-type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param
    assert error["message"].startswith(
        "the text is not valid Unicode: a lone surrogate '\\ud800' at position 1"
    )


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        (CHAT, {"tool_choice": "required"}, "tool_choice"),
        (CHAT, {"tools": [{"type": "function"}]}, "tools"),
        (CHAT, {"response_format": {"type": "xml"}}, "response_format"),
        (
            CHAT,
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "w"}}}},
            "response_format",
        ),
        ("/tokenize", {"prompt": "a", "messages": HELLO}, "prompt"),
    ],
)
def test_every_400_says_its_code(server, path, fields, param):
    """A 400 names its kind in ``code`` as the field checks' do ("invalid_value"); the tool, format and
    template checks left it null, so a client that branches on the code saw two kinds of bad request."""
    body = {"messages": HELLO} if path == CHAT else {}
    error = post(server, path, {**body, **fields}).json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_value"), error


def test_min_tokens_holds_off_eos_and_stop_strings(server, chat_llm):
    """vLLM's min_tokens, on the chat and completions routes: eos forced by logit_bias comes only after
    min_tokens tokens (it was refused as an unsupported extension)."""
    im_end = chat_llm.tokenizer.added_tokens["<|im_end|>"]
    body = {"max_tokens": 8, "seed": 1, "temperature": 1, "logit_bias": {str(im_end): 100}}
    for path, extra in ((CHAT, {"messages": HELLO}), (COMPLETIONS, {"prompt": "hello"})):
        for floor, used in ((0, 1), (3, 4)):
            r = post(server, path, {**extra, **body, "min_tokens": floor})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert (r.json()["usage"]["completion_tokens"], choice["finish_reason"]) == (used, "stop"), path


def test_min_tokens_past_the_default_length_names_what_the_client_sent(server, chat_llm):
    """min_tokens over the max_tokens a request gets when it sends none: a 400 that says none was sent and
    what the default is (it said "min_tokens must be in [0, max_tokens=16]", a max_tokens the client never
    sent). With a max_tokens that holds it, min_tokens past the model's default length (64 here) runs (it
    was refused against that default)."""
    default = chat_llm.default_params().max_tokens
    cases = [
        (COMPLETIONS, {"prompt": "hello", "min_tokens": 17}, 17, 16),
        (CHAT, {"messages": HELLO, "min_tokens": default + 1}, default + 1, default),
    ]
    for path, body, floor, length in cases:
        r = post(server, path, body)
        message = (
            f"min_tokens {floor} is more than the {length} tokens this request may generate: it sent no "
            f"max_tokens, and the default here is {length}; send a max_tokens of at least {floor}"
        )
        assert (r.status_code, r.json()) == (
            400,
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": "min_tokens",
                    "code": "invalid_value",
                }
            },
        )
    window = chat_llm.engine.max_seq_len
    long = [9707] * (window - 10)  # 10 tokens of room: the default, under /v1/completions' 16
    error = post(server, COMPLETIONS, {"prompt": long, "min_tokens": 11}).json()["error"]
    assert (error["param"], error["message"]) == (
        "min_tokens",
        "min_tokens 11 is more than the 10 tokens this request may generate: it sent no max_tokens, and "
        f"the default here is 10, what the context has left after the prompt's {window - 10} tokens; "
        "lower min_tokens or shorten the prompt",
    )
    assert post(server, COMPLETIONS, {"prompt": long, "min_tokens": 10, "max_tokens": 10}).status_code == 200
    prompt = len(chat_llm.encode("hello"))
    r = post(server, COMPLETIONS, {"prompt": "hello", "max_tokens": window - prompt + 1, "min_tokens": 1})
    assert r.json()["error"]["param"] == "max_tokens"  # the context's limit names what was sent
    r = post(server, COMPLETIONS, {"prompt": "hello", "max_tokens": default + 2, "min_tokens": default + 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= default + 1, r.text
