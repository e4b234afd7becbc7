"""The agent loop (steered model: the tool decisions a trained Qwen would make): rounds, errors, the
arguments it refuses by name, and the history it renders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agent_helpers import ADD, PARAMS, call, chatml_without_tools, queue

from qwenkit.sandbox_kernel import TIMEOUT_MESSAGE
from qwenkit.tools.agent import Agent, Tool, ToolError
from qwenkit.tools.code_interpreter import FUNCTION, CodeInterpreter


def test_loop_runs_tools_and_stops_on_answer(steered):
    queue(steered, call("add", '{"a": 2, "b": 3}'), call("add", '{"a": 5, "b": 10}'), "The sum is 15.")
    result = Agent(steered[0], [ADD], params=PARAMS).run("What is 2+3+10?")
    assert result.answer == "The sum is 15." and result.rounds == 3
    assert [m["content"] for m in result.messages if m["role"] == "tool"] == ["5", "15"]


def test_reasoning_stays_with_its_calls_in_the_next_round(steered, monkeypatch):
    """Qwen3's template renders the thinking of the turn in progress before its calls: the second
    round's prompt shows the call as the model wrote it, <think> block included (it was dropped)."""
    llm = steered[0]
    prompts = []
    submit = llm.submit
    monkeypatch.setattr(
        llm, "submit", lambda prompt, *a, **k: prompts.append(prompt) or submit(prompt, *a, **k)
    )
    reply = "<think>\nAdd them.\n</think>\n\n" + call("add", '{"a": 2, "b": 3}')
    queue(steered, reply, "<think>\nDone.\n</think>\n\nThe sum is 5.")
    result = Agent(llm, [ADD], params=PARAMS).run("What is 2+3?")
    assert result.answer == "The sum is 5." and result.rounds == 2
    assert [m.get("reasoning_content") for m in result.messages] == [None, "Add them.", None, "Done."]
    second = llm.tokenizer.decode(prompts[1])
    assert second.endswith(
        f"<|im_start|>assistant\n{reply}<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_max_rounds_stops_the_loop(steered):
    queue(steered, *[call("add", '{"a": 1, "b": 1}')] * 2)
    result = Agent(steered[0], [ADD], max_rounds=2, params=PARAMS).run("loop")
    assert result.answer is None and result.rounds == 2
    assert sum(m["role"] == "tool" for m in result.messages) == 2


def test_tool_errors_go_back_to_the_model(steered):
    queue(steered, call("nope", "{}") + "\n" + call("add", '{"a": "x"}'), "Sorry.")
    result = Agent(steered[0], [ADD], params=PARAMS).run("?")
    errors = [m["content"] for m in result.messages if m["role"] == "tool"]
    assert errors[0].startswith("error: there is no tool named 'nope'")
    assert errors[1].startswith("error: TypeError") and result.answer == "Sorry."


def test_bad_agent_definitions_raise(steered):
    with pytest.raises(ToolError, match="unique"):
        Agent(steered[0], [ADD, ADD])
    with pytest.raises(ToolError, match="max_rounds"):
        Agent(steered[0], [ADD], max_rounds=0)


def test_code_interpreter_in_the_loop(steered, tmp_path):
    tool = CodeInterpreter(timeout=2, workdir=tmp_path).tool()  # the README's "ready tool"
    assert tool.spec()["function"] == FUNCTION
    code = CodeInterpreter.arguments("open('n.txt', 'w').write('41')\nprint(int(open('n.txt').read()) + 1)")
    hog = CodeInterpreter.arguments("while True:\n    pass")
    queue(steered, call("code_interpreter", code), call("code_interpreter", hog), "It is 42.")
    result = Agent(steered[0], [tool], params=PARAMS).run("Compute 41+1 with Python")
    outputs = [m["content"] for m in result.messages if m["role"] == "tool"]
    assert outputs[0] == "stdout:\n\n```\n42\n\n```" and TIMEOUT_MESSAGE in outputs[1]
    assert result.answer == "It is 42."  # the model (and its process) carried on after the runaway code


def test_react_code_interpreter_call_written_as_a_fenced_block_runs(steered, tmp_path, monkeypatch):
    """Qwen v1 (ReAct) writes the interpreter's Action Input as a fenced block, not JSON: the agent runs
    the code, as Qwen-Agent does, where before the reply came back as the final answer, code and all. A
    tool without a text reader still refuses such input (the reply is the answer, verbatim)."""
    llm = steered[0]
    monkeypatch.setattr(llm.tokenizer, "chat_template", chatml_without_tools(llm.tokenizer.chat_template))
    tool = CodeInterpreter(timeout=5, workdir=tmp_path).tool()
    fenced = "Thought: I should run code.\nAction: code_interpreter\nAction Input: ```py\nprint(6 * 7)\n```"
    queue(steered, fenced, "Thought: I now know the final answer\nFinal Answer: It is 42.")
    prompts = []
    submit = llm.submit
    monkeypatch.setattr(
        llm, "submit", lambda prompt, *a, **k: prompts.append(prompt) or submit(prompt, *a, **k)
    )
    result = Agent(llm, [tool], params=PARAMS).run("What is 6*7?")
    assert [m["content"] for m in result.messages if m["role"] == "tool"] == ["stdout:\n\n```\n42\n\n```"]
    # the history keeps the call as the model wrote it (as Qwen-Agent does), and so does the next prompt
    assert result.messages[1]["tool_calls"][0]["function"]["arguments"] == "```py\nprint(6 * 7)\n```"
    second = llm.tokenizer.decode(prompts[1])
    assert fenced + "\nObservation: stdout:\n\n```\n42\n\n```\nThought:" in second
    assert (result.answer, result.rounds) == ("It is 42.", 2)
    plain = "Thought: add.\nAction: add\nAction Input: 2 and 3"
    queue(steered, plain)
    result = Agent(llm, [ADD], params=PARAMS).run("What is 2+3?")
    assert (result.answer, result.rounds) == (plain, 1)
    assert not steered[1]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Tool(None, len), "a tool's name must be a non-empty string, got None"),
        (lambda: Tool("", len), "a tool's name must be a non-empty string, got ''"),
        (lambda: Tool("add", None), "tool 'add': fn must be callable, got None"),
        (lambda: Tool("add", len, None), "tool 'add': description must be a string, got None"),
        (
            lambda: Tool("add", len, "d", None),
            "tool 'add': parameters must be a JSON schema object, got None",
        ),
        (
            lambda: Tool("add", len, "d", {"type": "string"}),
            'tool \'add\': parameters must be a schema of "type": "object" (the function\'s keyword '
            "arguments), got 'string'",
        ),
        (
            lambda: Tool("add", len, text_arguments="code"),
            "tool 'add': text_arguments must be callable or None, got 'code'",
        ),
    ],
)
def test_a_bad_tool_is_refused_when_made_by_name(make, message):
    """A name of None failed mid-run inside the ReAct prompt (``sequence item 0: expected str``); a fn of
    None, or a schema that is not an object's, was offered to the model and every call failed as text."""
    with pytest.raises(ToolError) as raised:
        make()
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tools": None}, "tools must be a list of Tool objects, got None"),
        ({"tools": ADD}, "tools must be a list of Tool objects, got a Tool (put it in a list: [tool])"),
        ({"max_rounds": "5"}, "max_rounds must be an integer >= 1, got '5'"),
        ({"max_rounds": 2.5}, "max_rounds must be an integer >= 1, got 2.5"),
        ({"max_rounds": None}, "max_rounds must be an integer >= 1, got None"),
        ({"max_rounds": True}, "max_rounds must be an integer >= 1, got True"),
        ({"llm": None}, "llm must be an LLM (LLM.load(path)), got None"),
        ({"llm": "model.gguf"}, "llm must be an LLM (LLM.load(path)), got 'model.gguf'"),
    ],
)
def test_a_bad_agent_argument_is_refused_by_name(steered, kwargs, message):
    """Each failed later with a bare TypeError or AttributeError (``'NoneType' object is not
    iterable``, ``'<' not supported between instances of 'str' and 'int'``); True ran one round."""
    args = {"llm": steered[0], "tools": [ADD], **kwargs}
    with pytest.raises(ToolError) as raised:
        Agent(args.pop("llm"), args.pop("tools"), **args)
    assert str(raised.value) == message


def test_bad_agent_params_or_messages_are_refused_by_name(steered):
    from qwenkit.engine import SamplingParamsError

    with pytest.raises(
        SamplingParamsError, match=r"^params must be a SamplingParams, got \{'temperature': 0\}$"
    ):
        Agent(steered[0], [ADD], params={"temperature": 0})
    agent = Agent(steered[0], [ADD], params=PARAMS)
    for messages in (None, 5):
        with pytest.raises(
            ToolError, match=f"^messages must be a string or a list of chat messages, got {messages}$"
        ):
            agent.run(messages)
    assert steered[0].driver.wait_idle() and not steered[0].engine.has_unfinished()


def test_an_agent_refuses_what_is_not_a_tool_by_name(steered, tmp_path):
    with pytest.raises(ToolError, match=r"got CodeInterpreter \(use CodeInterpreter\(\)\.tool\(\)\)"):
        Agent(steered[0], [CodeInterpreter(workdir=tmp_path)])
    with pytest.raises(ToolError, match="tools must be Tool objects, got function"):
        Agent(steered[0], [lambda: 1])


# Qwen2.5's way with a call's arguments: always through tojson (a string would be encoded twice).
TOJSON_TEMPLATE = (
    "{%- if tools %}{%- endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}\n<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_a_history_with_arguments_as_json_text_is_rendered_once_encoded(steered, monkeypatch):
    """A conversation handed to the agent in OpenAI's shape (arguments as JSON text) renders as the
    server renders it: the template sees the arguments as an object, not a string encoded twice."""
    llm = steered[0]
    monkeypatch.setattr(llm.tokenizer, "chat_template", TOJSON_TEMPLATE)
    prompts = []
    submit = llm.submit
    monkeypatch.setattr(
        llm, "submit", lambda prompt, *a, **k: prompts.append(prompt) or submit(prompt, *a, **k)
    )
    queue(steered, "Done.")
    history = [
        {"role": "user", "content": "What is 2+3?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    assert Agent(llm, [ADD], params=PARAMS).run(history).answer == "Done."
    text = llm.tokenizer.decode(prompts[0])
    assert '"arguments": {"a": 2, "b": 3}' in text and '\\"a\\"' not in text, text
