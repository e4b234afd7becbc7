"""Chat templates: text byte-identical to transformers, ids equal for special-free contents, clear errors."""

from __future__ import annotations

import pytest

from qwenkit.tokenizer import TokenizerError, chatml_template
from qwenkit.tokenizer.hf import HFTokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city. Returns °C & <b>text</b>.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "城市"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "Current time", "parameters": {}}},
]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello"}],
    "system_and_turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What's 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 你好 😀?\n  with spaces  "},
    ],
    "history_with_thinking": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nanswer one"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "answer two", "reasoning_content": "new reasoning"},
    ],
    "tool_calls": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"type": "function", "function": {"name": "now", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "content": '{"temp": 21, "sky": "晴"}'},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "21 °C at noon.", "reasoning_content": "combine"},
    ],
}


def _cases():
    for name in CONVERSATIONS:
        for gen in (True, False):
            for thinking in (None, True, False):
                yield pytest.param(name, gen, thinking, id=f"{name}-gen{int(gen)}-think{thinking}")


@pytest.mark.parametrize(("name", "gen", "thinking"), list(_cases()))
def test_text_and_ids_equal_transformers(qwen3, hf_qwen3, name, gen, thinking):
    messages = CONVERSATIONS[name]
    tools = TOOLS if name == "tool_calls" else None
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    reference_text = hf_qwen3.apply_chat_template(
        messages, tools=tools, add_generation_prompt=gen, tokenize=False, **kwargs
    )
    # the "<think>" block in a history content is dropped by the template, so every control token in
    # these prompts is the template's own and the ids are transformers' plain ids for the text (its
    # sanitize_control_tokens mode keeps newlines the template strips: see the test below)
    reference_ids = hf_qwen3.apply_chat_template(
        messages, tools=tools, add_generation_prompt=gen, tokenize=True, return_dict=False, **kwargs
    )
    assert (
        qwen3.render_chat_template(messages, tools=tools, add_generation_prompt=gen, **kwargs)
        == reference_text
    )
    assert (
        qwen3.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, **kwargs) == reference_ids
    )


def test_qwen3_known_shapes(qwen3):
    text = qwen3.render_chat_template(CONVERSATIONS["single"], enable_thinking=False)
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = qwen3.apply_chat_template(CONVERSATIONS["single"], enable_thinking=False)
    assert ids == [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]
    with_tools = qwen3.render_chat_template(CONVERSATIONS["tool_calls"], tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in with_tools
    assert "<|im_start|>user\n<tool_response>\n" in with_tools
    assert (
        '"description": "Weather for a city. Returns °C & <b>text</b>."' in with_tools
    )  # tojson: no escaping


def test_v1_chatml_text_and_ids(v1):
    messages = CONVERSATIONS["system_and_turns"]
    text = v1.render_chat_template(messages)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat's 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 你好 😀?\n  with spaces  <|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert v1.apply_chat_template(messages) == v1.encode(text, allow_special=True)
    no_gen = v1.render_chat_template(messages[1:2], add_generation_prompt=False)
    assert no_gen == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat's 2+2?<|im_end|>\n"
    )
    assert v1.apply_chat_template(messages[1:2], add_generation_prompt=False) == v1.encode(
        no_gen, allow_special=True
    )
    with pytest.raises(TokenizerError, match="no tool support"):
        v1.apply_chat_template(messages, tools=TOOLS)


def test_chatml_template_function():
    assert "You are a helpful assistant." in chatml_template()
    assert "system" not in chatml_template(None).replace("'system'", "")


def _with_template(qwen3, template: str) -> HFTokenizer:
    return HFTokenizer(qwen3.backend, {**qwen3.tokenizer_config, "chat_template": template})


def test_syntax_error_is_one_line(qwen3):
    tok = _with_template(qwen3, "{% for m in messages %}{{ m.content }")
    with pytest.raises(TokenizerError, match=r"^chat template has a syntax error at line 1: ") as e:
        tok.render_chat_template(CONVERSATIONS["single"])
    assert "\n" not in str(e.value)


def test_raise_exception_in_template(qwen3):
    tok = _with_template(qwen3, "{{ raise_exception('Only user and assistant roles are supported!') }}")
    with pytest.raises(TokenizerError, match=r"^chat template failed: Only user and assistant roles"):
        tok.apply_chat_template(CONVERSATIONS["single"])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ 1 / 0 }}", "chat template failed: ZeroDivisionError: division by zero"),
        ("{{ 10.0 ** 400 }}", "chat template failed: OverflowError: "),
        (
            "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
            "chat template failed: it recursed too deeply (a macro that calls itself?)",
        ),
        # a model's template is a file of the checkpoint: `*` and `**` are bounded as jinja2 documents
        ("{{ ('x' * 10**12)|length }}", "chat template failed: a repetition of 1000000000000 items is over"),
        ("{{ ([1] * 10**12)|length }}", "chat template failed: a repetition of 1000000000000 items is over"),
        ("{{ (2 ** (10**9)) > 1 }}", "chat template failed: an integer power of 1000000000 is over"),
        # each power or product small, the integer they build is not: bounded by its size, not the exponent
        ("{{ ((2 ** 4096) ** 4096) > 1 }}", "chat template failed: an integer power of 4096 is over"),
        (
            "{% set ns = namespace(x=3) %}{% for i in range(20) %}{% set ns.x = ns.x * ns.x %}{% endfor %}"
            "{{ ns.x > 1 }}",
            "chat template failed: an integer product of 103874 bits is over",
        ),
    ],
)
def test_template_arithmetic_and_recursion_errors_are_one_line(qwen3, source, message):
    # a model's broken template ended `qwenkit template` and `chat` in a traceback
    tok = _with_template(qwen3, source)
    with pytest.raises(TokenizerError) as e:
        tok.render_chat_template(CONVERSATIONS["single"])
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_sandbox_blocks_escape(qwen3):
    tok = _with_template(qwen3, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError, match="chat template failed"):
        tok.render_chat_template(CONVERSATIONS["single"])


def test_none_content_is_dropped_like_transformers(qwen3):
    # transformers drops None-valued keys; Qwen3's template then fails on the missing content, as here
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []}]
    with pytest.raises(TokenizerError, match="has no attribute 'content'"):
        qwen3.render_chat_template(messages)


def test_missing_template_and_bad_messages(qwen3):
    tok = HFTokenizer(qwen3.backend, {"eos_token": "<|im_end|>"})
    with pytest.raises(TokenizerError, match="no chat_template"):
        tok.render_chat_template(CONVERSATIONS["single"])
    with pytest.raises(TokenizerError, match="non-empty list"):
        qwen3.apply_chat_template([])
    with pytest.raises(TokenizerError, match="chat message 0"):
        qwen3.apply_chat_template([{"content": "no role"}])


def test_template_globals(qwen3):
    tok = _with_template(
        qwen3,
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ dict(a=1) | tojson }}"
        "|{{ strftime_now('%Y')|length }}"
        "|{{ eos_token }}|{% generation %}g{% endgeneration %}",
    )
    assert tok.render_chat_template(CONVERSATIONS["system_and_turns"]) == '1|{"a": 1}|4|<|im_end|>|g'


def test_text_parts_render_as_their_joined_text(qwen3):
    """OpenAI's content as text parts: Qwen3's template renders a non-string content as '' (the words were
    lost); they are joined as the server joins them, control-token text in a part kept plain."""
    parts = [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris<|im_end|>?"}]
    as_parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": parts},
    ]
    as_text = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Weather in Paris<|im_end|>?"},
    ]
    ids = qwen3.apply_chat_template(as_parts)
    assert ids == qwen3.apply_chat_template(as_text)
    assert "Weather in Paris<|im_end|>?" in qwen3.decode(ids)
    assert ids.count(qwen3.added_tokens["<|im_end|>"]) == 2  # the system's and the user's turn ends only


@pytest.mark.parametrize(
    "part",
    [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text"}, {"type": "text", "text": 5}, "hi"],
)
def test_a_part_that_is_not_text_is_refused_by_message_and_part(qwen3, part):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": [{"type": "text", "text": "b"}, part]},
    ]
    with pytest.raises(
        TokenizerError, match=r"^chat message 1 content part 1: only text parts .* are supported"
    ):
        qwen3.apply_chat_template(messages)


REASONING_IN_CONTENT = "<think>\nr\n</think>\n\nans"  # how Qwen3 data and chat history carry reasoning


@pytest.mark.parametrize("turn", ["last", "earlier"])
def test_reasoning_in_content_gets_the_ids_of_the_rendered_text(qwen3, hf_qwen3, turn):
    """Qwen3's template splits a content on "</think>" and strips the newlines around the parts. The
    marker that keeps the content's "</think>" from becoming a control token stood in the way of those
    strips: the prompt text read "<think>\\nr\\n</think>\\n\\nans" but its ids "<think>\\n\\nr\\n\\n</think>
    \\n\\n\\n\\nans" (an earlier turn, whose reasoning is dropped: "\\n\\nans"), a format the model never saw,
    in every fine-tuning example that keeps its reasoning in the content and every chat with a thinking
    model's replies in its history."""
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": REASONING_IN_CONTENT}]
    if turn == "earlier":
        messages.append({"role": "user", "content": "q2"})
    gen = turn == "earlier"
    text = qwen3.render_chat_template(messages, add_generation_prompt=gen)
    ids = qwen3.apply_chat_template(messages, add_generation_prompt=gen)
    assert qwen3.decode(ids) == text
    # the template wrote the <think> block itself (the content's own tags are gone): transformers' ids
    assert ids == hf_qwen3.apply_chat_template(
        messages, add_generation_prompt=gen, tokenize=True, return_dict=False
    )
    answer = [151644, 77091, 198, 596, 151645, 198]  # <|im_start|>assistant\nans<|im_end|>\n
    if turn == "last":
        answer[3:3] = [151667, 198, 81, 198, 151668, 271]  # <think>\nr\n</think>\n\n
    start = ids.index(151644, 1)  # the assistant turn's <|im_start|>
    assert ids[start : start + len(answer)] == answer


@pytest.mark.parametrize("answer", [" \nans", "\t\n\nans", "  \n"])
def test_reasoning_in_content_is_encoded_as_one_text_around_the_dropped_markers(qwen3, hf_qwen3, answer):
    """The parts of a content split on its "</think>" were encoded apart: in an earlier turn (its reasoning
    dropped), "assistant\n" and " \nans" gave the tokens "\n", " \n" where the prompt text's "\n \n" is
    one token."""
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": f"<think>\nr\n</think>\n\n{answer}"},
        {"role": "user", "content": "q2"},
    ]
    ids = qwen3.apply_chat_template(messages)
    assert ids == hf_qwen3.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
