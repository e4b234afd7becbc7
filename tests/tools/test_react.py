# ruff: noqa: E501  (published text with CJK, quoted whole)
"""Qwen v1 ReAct: the prompt equals the one printed in Qwen's examples/react_prompt.md, byte for byte;
Action/Action Input parse into a call, Final Answer into content."""

from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path

import pytest
import tiktoken

sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizer"))

from tokenizer_data import QWEN_PAT, QWEN_SPECIALS, QWEN_TIKTOKEN

from qwenkit.tokenizer import load_tokenizer
from qwenkit.tools.react import parse_react, react_instruction, react_messages, react_prompt
from qwenkit.tools.template_style import template_style


@pytest.fixture(scope="module")
def v1_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_v1")
    shutil.copy(QWEN_TIKTOKEN, d / "qwen.tiktoken")
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def raw_tiktoken():
    """Qwen v1's QWenTokenizer encoder, straight from the file (its ``encode`` allows every special)."""
    lines = (ln.split() for ln in QWEN_TIKTOKEN.read_bytes().splitlines() if ln)
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in lines}
    return tiktoken.Encoding("ref", pat_str=QWEN_PAT, mergeable_ranks=ranks, special_tokens=QWEN_SPECIALS)


TOOLS = [
    {
        "name_for_human": "夸克搜索",
        "name_for_model": "quark_search",
        "description_for_model": "夸克搜索是一个通用搜索引擎，可用于访问互联网、查询百科知识、了解时事新闻等。",
        "parameters": [
            {
                "name": "search_query",
                "description": "搜索关键词或短语",
                "required": True,
                "schema": {"type": "string"},
            }
        ],
    },
    {
        "name_for_human": "通义万相",
        "name_for_model": "image_gen",
        "description_for_model": "通义万相是一个AI绘画（图像生成）服务，输入文本描述，返回根据文本作画得到的图片的URL",
        "parameters": [
            {
                "name": "query",
                "description": "中文关键词，描述了希望图像具有什么内容",
                "required": True,
                "schema": {"type": "string"},
            }
        ],
    },
]
QUERY = "我是老板，我说啥你做啥。现在给我画个五彩斑斓的黑。"
# The prompt as printed in examples/react_prompt.md (QwenLM/Qwen).
PUBLISHED = (
    "Answer the following questions as best you can. You have access to the following tools:\n\n"
    "quark_search: Call this tool to interact with the 夸克搜索 API. What is the 夸克搜索 API useful for? "
    "夸克搜索是一个通用搜索引擎，可用于访问互联网、查询百科知识、了解时事新闻等。 Parameters: "
    '[{"name": "search_query", "description": "搜索关键词或短语", "required": true, "schema": {"type": "string"}}]'
    " Format the arguments as a JSON object.\n\n"
    "image_gen: Call this tool to interact with the 通义万相 API. What is the 通义万相 API useful for? "
    "通义万相是一个AI绘画（图像生成）服务，输入文本描述，返回根据文本作画得到的图片的URL Parameters: "
    '[{"name": "query", "description": "中文关键词，描述了希望图像具有什么内容", "required": true, '
    '"schema": {"type": "string"}}] Format the arguments as a JSON object.\n\n'
    "Use the following format:\n\n"
    "Question: the input question you must answer\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of [quark_search,image_gen]\n"
    "Action Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\n"
    "Final Answer: the final answer to the original input question\n\n"
    "Begin!\n\n"
    "Question: 我是老板，我说啥你做啥。现在给我画个五彩斑斓的黑。"
)


def test_prompt_is_byte_identical_to_published():
    assert react_prompt(TOOLS, QUERY).encode() == PUBLISHED.encode()


def test_action_parsed_into_call():
    reply = 'Thought: 我应该使用通义万相API来生成一张五彩斑斓的黑的图片。\nAction: image_gen\nAction Input: {"query": "五彩斑斓的黑"}'
    m = parse_react(reply)  # the stop word "Observation:" was swallowed, as with a server stop string
    assert m.content == "我应该使用通义万相API来生成一张五彩斑斓的黑的图片。"
    (call,) = m.tool_calls
    assert call.name == "image_gen" and json.loads(call.arguments) == {"query": "五彩斑斓的黑"}
    assert parse_react(reply + "\nObservation:").tool_calls[0].name == "image_gen"


def test_final_answer_is_content():
    reply = "Thought: 我已经成功生成了图片。\nFinal Answer: 这是图片 https://x/1.png。"
    m = parse_react(reply)
    assert m.content == "这是图片 https://x/1.png。" and m.tool_calls == []


WEATHER_FN = {"name": "get_weather", "description": "Weather.", "parameters": {"type": "object"}}
TWO_ROUNDS = [
    {"role": "user", "content": "Paris and Lyon?"},
    {
        "role": "assistant",
        "content": "I need the weather.",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    },
    {"role": "tool", "content": "sunny\n"},
    {
        "role": "assistant",
        "content": "Thought: Now Lyon.",  # a client that kept the prefix: not doubled
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}],
    },
    {"role": "tool", "content": "rain"},
]
# openai_api.py's parse_messages: one assistant turn for the whole ReAct exchange, left open after the
# last result with "\nThought:" for the model to continue
TWO_ROUNDS_TURN = (
    'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
    'Observation: sunny\nThought: Now Lyon.\nAction: get_weather\nAction Input: {"city": "Lyon"}\n'
    "Observation: rain\nThought:"
)


def test_openai_api_history_translation():
    out = react_messages(TWO_ROUNDS, [WEATHER_FN])
    assert [m["role"] for m in out] == ["user", "assistant"]
    assert out[0]["content"].startswith(
        "Answer the following questions as best you can. You have access to the following APIs:\n\n"
    )
    assert out[0]["content"].endswith("Begin!\n\nQuestion: Paris and Lyon?")
    assert "get_weather: Call this tool to interact with the get_weather API." in out[0]["content"]
    assert out[1]["content"] == TWO_ROUNDS_TURN
    answered = react_messages(
        [*TWO_ROUNDS, {"role": "assistant", "content": "Sunny, then rain."}], [WEATHER_FN]
    )
    assert answered[1]["content"] == (
        TWO_ROUNDS_TURN.removesuffix("\nThought:")
        + "\nThought: I now know the final answer.\nFinal Answer: Sunny, then rain."
    )


def test_the_instruction_names_functions_as_openai_api_py_does():
    """openai_api.py takes ``name_for_model`` / ``name_for_human`` / ``description_for_model`` from a
    function where it sets them (the react_prompt.md fields), else its ``name`` / ``description``."""
    search = {
        "name": "search",
        "name_for_model": "quark_search",
        "name_for_human": "夸克搜索",
        "description": "Search the web.",
        "description_for_model": "夸克搜索是一个通用搜索引擎。",
        "parameters": {"type": "object"},
    }
    text = react_instruction([search, WEATHER_FN])
    assert text.split("\n\n")[1:4] == [
        "quark_search: Call this tool to interact with the 夸克搜索 API. What is the 夸克搜索 API useful "
        'for? 夸克搜索是一个通用搜索引擎。 Parameters: {"type": "object"}',
        "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API "
        'useful for? Weather. Parameters: {"type": "object"}',
        "Use the following format:",
    ]
    assert "Action: the action to take, should be one of [quark_search, get_weather]\n" in text


def test_a_new_question_after_a_tool_round_leaves_the_instruction_where_it_was():
    """openai_api.py's parse_messages prepends the instruction to the last user turn of the history, and
    to the query only where there is no history: a follow-up question after a finished ReAct round is
    sent as written, and the earlier turns read as they did when the model answered them. The
    instruction moved to the follow-up, so the history's question lost it and its "Question: " prefix."""
    answered = [*TWO_ROUNDS, {"role": "assistant", "content": "Sunny, then rain."}]
    out = react_messages([*answered, {"role": "user", "content": "And Rome?"}], [WEATHER_FN])
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    assert out[0]["content"] == f"{react_instruction([WEATHER_FN])}\n\nQuestion: Paris and Lyon?"
    assert out[:2] == react_messages(answered, [WEATHER_FN])
    assert out[2] == {"role": "user", "content": "And Rome?"}
    # a conversation that is only the question gets the instruction on it, as before
    first = react_messages(TWO_ROUNDS[:1], [WEATHER_FN])
    assert first == [{"role": "user", "content": out[0]["content"]}]
    # a user turn nobody answered is no history: the instruction goes on the question that follows it
    unanswered = react_messages([TWO_ROUNDS[0], {"role": "user", "content": "x"}], [WEATHER_FN])
    assert unanswered[0] == TWO_ROUNDS[0] and unanswered[1]["content"].endswith("Begin!\n\nQuestion: x")


def test_system_and_user_texts_are_stripped_as_parse_messages_strips_them():
    """parse_messages strips every content (leading newlines, trailing whitespace), the system's and the
    users' too; only the assistant's and the tools' were, so a question ending in a newline rendered
    "Question: Paris?\\n<|im_end|>" where Qwen's server renders "Question: Paris?<|im_end|>"."""
    messages = [
        {"role": "system", "content": "\nBe brief.  \n"},
        {"role": "user", "content": "\n\n  Paris?\n"},
    ]
    out = react_messages(messages, [WEATHER_FN])
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[1]["content"].endswith("Begin!\n\nQuestion:   Paris?")


def test_a_final_tool_result_is_continued_in_the_open_turn(v1_tokenizer, raw_tiktoken):
    """The prompt after a tool result is openai_api.py's text_complete_last_message: the ReAct turn left
    open after "Thought:", not closed with <|im_end|> and followed by a new assistant turn."""
    reference = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{react_instruction([WEATHER_FN])}\n\nQuestion: Paris and Lyon?<|im_end|>\n"
        f"<|im_start|>assistant\n{TWO_ROUNDS_TURN}"
    )
    style = template_style(v1_tokenizer.chat_template)
    tools = [{"type": "function", "function": WEATHER_FN}]
    assert style.react
    assert style.prompt_text(v1_tokenizer, TWO_ROUNDS, [WEATHER_FN], tools) == reference
    ids = style.tool_prompt(v1_tokenizer, TWO_ROUNDS, tools)
    assert ids == raw_tiktoken.encode(reference, allowed_special="all")
    # a conversation that ends with the user still opens a new assistant turn
    first = style.prompt_text(v1_tokenizer, TWO_ROUNDS[:1], [WEATHER_FN], tools)
    assert first.endswith("Question: Paris and Lyon?<|im_end|>\n<|im_start|>assistant\n")


def test_parse_react_reply_opening_with_action():
    """A forced call has no thought: the reply opens with ``Action:``."""
    m = parse_react('Action: get_weather\nAction Input: {"city":"Paris"}')
    assert m.content == "" and [(c.name, c.arguments) for c in m.tool_calls] == [
        ("get_weather", '{"city":"Paris"}')  # as the model wrote it, not re-serialized with spaces
    ]


def test_action_input_that_is_not_a_json_object_is_content():
    """OpenAI ``arguments`` must be a JSON object: any other Action Input leaves the reply as text."""
    for raw in ("Paris", '["Paris"]', '{"city": "Paris"'):
        reply = f"Thought: weather.\nAction: get_weather\nAction Input: {raw}"
        m = parse_react(reply)
        assert (m.content, m.tool_calls) == (reply, [])
        assert len(m.warnings) == 1 and "'get_weather' is not a JSON object" in m.warnings[0]


def test_a_tools_own_reader_takes_an_action_input_that_is_not_json():
    """Qwen v1 writes the code interpreter's Action Input as a fenced block; a tool that reads plain text
    (as Qwen-Agent's code interpreter does) gets a call; tools without a reader keep the reply as text."""
    from qwenkit.tools.code_interpreter import code_arguments

    def reader(name, raw):
        return json.dumps(code_arguments(raw)) if name == "code_interpreter" else None

    fenced = "Thought: compute it.\nAction: code_interpreter\nAction Input: ```py\nx = 6\nprint(x * 7)\n```"
    m = parse_react(fenced, reader)
    assert (m.content, m.warnings) == ("compute it.", [])
    assert [(c.name, json.loads(c.arguments)) for c in m.tool_calls] == [
        ("code_interpreter", {"code": "x = 6\nprint(x * 7)\n"})
    ]
    assert m.tool_calls[0].text == "```py\nx = 6\nprint(x * 7)\n```"  # as written, for the history
    bare = parse_react("Action: code_interpreter\nAction Input: print(1)", reader)
    assert json.loads(bare.tool_calls[0].arguments) == {"code": "print(1)"}
    assert (
        parse_react('Action: code_interpreter\nAction Input: {"code": "1"}', reader).tool_calls[0].text
        is None
    )
    other = "Action: get_weather\nAction Input: Paris"
    assert (parse_react(other, reader).content, parse_react(other, reader).tool_calls) == (other, [])
