"""The agent loop (steered model: the tool decisions a trained Qwen would make) and the sandboxed
code interpreter under escape attempts."""

from __future__ import annotations

import gc
import io
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from scripted import ScriptedModel, steer_next_request

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM
from qwenkit.sandbox_kernel import TIMEOUT_MESSAGE
from qwenkit.tools.agent import Agent, Tool, ToolError
from qwenkit.tools.code_interpreter import FUNCTION, CodeInterpreter


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    loaded = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=2, progress=False)
    model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens["<|im_end|>"])
    llm = LLM(model, loaded.tokenizer, max_batch_size=2, max_seq_len=2048)
    return llm, steer_next_request(llm, model)


def queue(steered, *replies: str) -> None:
    llm, pending = steered
    pending.extend(llm.tokenizer.encode(r, allow_special=True) for r in replies)


def call(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


ADD = Tool(
    "add",
    lambda a, b: a + b,
    "Add two integers",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)
PARAMS = SamplingParams(max_tokens=120, temperature=0)


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


ESCAPES = {
    "network": (
        "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\nprint('connected')",
        "error:\n\n```\nOSError: [Errno 101] Network is unreachable\n\n```",
    ),
    "read_outside": ("print(open('/etc/shadow').read())", "error:\n\n```\nPermissionError: [Errno 13]"),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", "error:\n\n```\nBlockingIOError: [Errno 11]"),
    "memory_hog": ("x = bytearray(4 * 1024**3)\nprint('allocated')", "error:\n\n```\nMemoryError\n\n```"),
    "infinite_loop": ("while True:\n    pass", f"error:\n\n```\n{TIMEOUT_MESSAGE}\n```"),
    "huge_output": ("print('x' * 10_000_000)", "[output cut at 2000 bytes]"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ESCAPES))
def test_code_interpreter_escape_attempts_are_stopped_and_reported(name, tmp_path):
    code, marker = ESCAPES[name]
    report = CodeInterpreter(timeout=3, memory_mb=256, max_output=2_000, workdir=tmp_path)(code)
    assert marker in report, report
    assert "connected" not in report and "allocated" not in report and len(report) < 4_000


def test_code_interpreter_reports_a_cut_in_bytes_without_a_broken_character(tmp_path):
    report = CodeInterpreter(timeout=5, max_output=51, workdir=tmp_path)("print('é' * 100)")
    assert report == "stdout:\n\n```\n" + "é" * 25 + "\n```\n\n[output cut at 51 bytes]"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": "5"}, "timeout must be a number of seconds > 0, got '5'"),
        ({"timeout": -1}, "timeout must be a number of seconds > 0, got -1"),
        ({"timeout": float("inf")}, "timeout must be a number of seconds > 0, got inf"),
        ({"memory_mb": "x"}, "memory_mb must be an integer >= 1, got 'x'"),
        ({"memory_mb": 0}, "memory_mb must be an integer >= 1, got 0"),
        ({"max_output": -5}, "max_output must be an integer >= 1, got -5"),
        ({"workdir": 5}, "workdir must be a path or None, got 5"),
        ({"python": 3}, "python must be a path to an interpreter or None, got 3"),
    ],
)
def test_code_interpreter_settings_are_refused_by_name(kwargs, message):
    """A str timeout failed in the kernel's arithmetic, a str memory_mb in prlimit's exec ("Argument
    list too long"), a negative max_output in a read, a workdir of 5 in pathlib; -1 seconds and 0 MB
    came back to the model as the sandbox's own failure."""
    from qwenkit.tools.code_interpreter import InterpreterError

    with pytest.raises(InterpreterError) as raised:
        CodeInterpreter(**kwargs)
    assert str(raised.value) == message


def test_code_that_is_not_a_string_is_refused_by_name_and_the_model_is_told(tmp_path):
    """None ran in the kernel and came back as a traceback of the kernel's own bootstrap code."""
    from qwenkit.tools.code_interpreter import InterpreterError

    interpreter = CodeInterpreter(timeout=5, workdir=tmp_path)
    with pytest.raises(InterpreterError, match="^code must be a string, got None$"):
        interpreter(None)
    assert interpreter.tool().run('{"code": 5}') == "error: InterpreterError: code must be a string, got 5"
    interpreter.close()


STDOUT_1 = "stdout:\n\n```\n1\n\n```"  # Qwen-Agent's words: print's newline inside the fence


def test_code_interpreters_own_scratch_directory_goes_with_it(tmp_path):
    interpreter = CodeInterpreter(timeout=5)
    workdir = interpreter.workdir
    assert interpreter("open('kept.txt', 'w').write('1')\nprint(open('kept.txt').read())") == STDOUT_1
    assert (workdir / "kept.txt").read_text() == "1"  # kept between calls
    del interpreter
    gc.collect()
    assert not workdir.exists()  # not one more qwenkit-ci-* directory left in /tmp per chat
    given = CodeInterpreter(timeout=5, workdir=tmp_path)
    given("open('mine.txt', 'w').write('2')")
    del given
    gc.collect()
    assert (tmp_path / "mine.txt").read_text() == "2"  # a directory the caller gave stays


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


def chatml_without_tools(template: str) -> str:
    """The model's template with its tools branch cut, so the agent takes Qwen v1's ReAct path."""
    return template.replace("tools", "offered")  # undefined in the template: false


def test_an_agent_refuses_what_is_not_a_tool_by_name(steered, tmp_path):
    with pytest.raises(ToolError, match=r"got CodeInterpreter \(use CodeInterpreter\(\)\.tool\(\)\)"):
        Agent(steered[0], [CodeInterpreter(workdir=tmp_path)])
    with pytest.raises(ToolError, match="tools must be Tool objects, got function"):
        Agent(steered[0], [lambda: 1])


# ---- qwenkit chat --tools ------------------------------------------------------------------------

QWENKIT = [sys.executable, "-m", "qwenkit.cli"]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[]", "non-empty JSON array"),
        ("{", "is not JSON"),
        ('[{"type": "function", "function": {}}]', "no function name"),
    ],
)
def test_tools_file_errors_name_the_problem(tmp_path, content, words):
    from qwenkit.tools.agent import load_tool_specs

    path = tmp_path / "tools.json"
    path.write_text(content)
    with pytest.raises(ToolError, match=words):
        load_tool_specs(str(path))


def test_chat_tools_file_error_is_one_line_exit_2(tmp_path):
    import subprocess

    path = tmp_path / "tools.json"
    path.write_text("{")
    r = subprocess.run(
        [*QWENKIT, "chat", "--tools", str(path), "-p", "hi"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "is not JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1, (
        r.stderr
    )


def test_chat_code_dir_is_the_interpreters_directory(steered, tmp_path, monkeypatch, capsys):
    """`chat --code-dir DIR`: the code interpreter works in DIR (it reads the user's file there) and what it
    writes stays after the chat, the directory the user's again; a DIR that is a file is one line, exit 2."""
    import subprocess

    from qwenkit.cli import chat as chat_cli

    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("a,b\n1,2\n3,4\n")
    code = (
        "rows = open('data.csv').read().split()[1:]\nopen('sum.txt', 'w').write(str(len(rows)))\nprint(rows)"
    )
    queue(steered, call("code_interpreter", json.dumps({"code": code})), "Two rows.")
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: steered[0])
    assert chat_cli.main(["--code-dir", str(work), "--temperature", "0", "-p", "Count the rows."]) == 0
    assert "[output]\nstdout:\n\n```\n['1,2', '3,4']\n\n```\n" in capsys.readouterr().out
    assert (work / "sum.txt").read_text() == "2" and (work / "sum.txt").stat().st_uid == os.getuid()
    r = subprocess.run(
        [*QWENKIT, "chat", "--code-dir", str(work / "data.csv"), "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (r.returncode, r.stderr) == (2, f"error: --code-dir {work / 'data.csv'}: not a directory\n")


def test_chat_tools_shows_call_and_takes_typed_result(steered, tmp_path, monkeypatch, capsys):
    from qwenkit.cli.chat import ask_tool_result
    from qwenkit.tools.agent import load_tool_specs, typed_tools

    path = tmp_path / "tools.json"
    path.write_text(
        '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]'
    )
    monkeypatch.setattr("builtins.input", lambda prompt: "sunny, 21C")
    tools = typed_tools(load_tool_specs(str(path)), ask_tool_result)
    queue(steered, call("get_weather", '{"city": "Paris"}'), "It is sunny.")
    result = Agent(steered[0], tools, params=PARAMS).run("Weather in Paris?")
    assert '[tool call] get_weather({"city": "Paris"})' in capsys.readouterr().out
    assert [m["content"] for m in result.messages if m["role"] == "tool"] == ["sunny, 21C"]
    assert result.answer == "It is sunny."


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


def test_tool_chat_keeps_the_chat_commands(steered, monkeypatch, capsys):
    """`chat --code-interpreter` (and --tools): the chat commands work as in a plain chat (they never reach
    the model), the interpreter runs the model's code, and :history shows the calls of the turn."""
    import io

    from qwenkit.cli import chat as chat_cli

    llm = steered[0]
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: llm)
    monkeypatch.setattr("sys.stdin", io.StringIO(":help\nWhat is 6*7?\n:history\n:exit\nnever asked\n"))
    queue(steered, call("code_interpreter", '{"code": "print(6*7)"}'), "It is 42.")
    assert chat_cli.main(["--code-interpreter", "--temperature", "0", "--max-tokens", "120"]) == 0
    out = capsys.readouterr().out
    assert "  :help                 this help" in out and "[output]\nstdout:\n\n```\n42\n\n```\n" in out
    history = out.split("It is 42.\n", 1)[1]
    assert history.splitlines() == [
        "user: What is 6*7?",
        'assistant: [calls code_interpreter({"code": "print(6*7)"})]',
        "tool: stdout:",
        "",
        "```",
        "42",
        "",
        "```",
        "assistant: It is 42.",
    ]
    assert not steered[1]  # every queued reply was asked for, and nothing more


class Writes(io.StringIO):
    """Standard output that keeps each write, to see what was shown when."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[str] = []

    def write(self, text: str) -> int:
        self.pieces.append(text)
        return super().write(text)


def test_tool_chat_streams_its_text_and_never_the_call_markup(steered, monkeypatch):
    """`chat --code-interpreter` printed each answer whole, at its end, and nothing of the text a model
    writes before its call: now the visible text streams piece by piece as in a plain chat (the parser
    the server streams with holds back what may open a <tool_call>), the tool's output starts a line of its
    own, and the markup never shows."""
    from qwenkit.cli import chat as chat_cli

    llm = steered[0]
    out = Writes()
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: llm)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 6*7?\n"))
    monkeypatch.setattr("sys.stdout", out)
    first = "Let me run it.\n" + call("code_interpreter", '{"code": "print(6*7)"}')
    queue(steered, first, "The answer is forty-two, as printed.")
    assert chat_cli.main(["--code-interpreter", "--temperature", "0", "--max-tokens", "120"]) == 0
    assert out.getvalue() == (
        "Let me run it.\n[code_interpreter]\nprint(6*7)\n[output]\nstdout:\n\n```\n42\n\n```\n"
        "The answer is forty-two, as printed.\n\n"
    )
    answer = out.pieces[out.pieces.index("[output]\nstdout:\n\n```\n42\n\n```") + 2 :]
    assert len(answer) > 5 and "".join(answer) == "The answer is forty-two, as printed.\n\n"
    assert not any("<" in piece or "tool_call" in piece for piece in out.pieces)
    assert not steered[1]


def test_tool_chat_says_when_max_tokens_cut_the_answer(steered, monkeypatch, capsys):
    from qwenkit.cli import chat as chat_cli

    llm = steered[0]
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: llm)
    queue(steered, "The answer is forty-two, as printed.")
    argv = ["--code-interpreter", "--temperature", "0", "--max-tokens", "3", "-p", "What is 6*7?"]
    assert chat_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "The answer is\n"
    assert captured.err == "[stopped at max_tokens=3; raise it with --max-new-tokens N]\n"


def test_tool_chat_says_on_stderr_when_the_rounds_ran_out(steered, monkeypatch, capsys):
    """A tool chat whose model calls a tool on every round until the agent's limit: the notice is one line
    on standard error, as the other notices are (it was printed on standard output, as if the answer)."""
    from qwenkit.cli import chat as chat_cli

    llm = steered[0]
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: llm)
    queue(steered, *[call("code_interpreter", '{"code": "print(6*7)"}')] * 5)
    argv = ["--code-interpreter", "--temperature", "0", "--max-tokens", "120", "-p", "What is 6*7?"]
    assert chat_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "[code_interpreter]\nprint(6*7)\n[output]\nstdout:\n\n```\n42\n\n```\n" * 5 + "\n"
    assert captured.err == "[stopped after 5 rounds of tool calls, with no answer]\n"
    assert not steered[1]


class CtrlC(Writes):
    """Standard output where Ctrl-C comes once, at the write of ``at`` (a piece of the streamed answer)."""

    def __init__(self, at: str) -> None:
        super().__init__()
        self.at: str | None = at

    def write(self, text: str) -> int:
        if text == self.at:
            self.at = None
            raise KeyboardInterrupt
        return super().write(text)


def recorded_prompts(llm, monkeypatch) -> list[list[int]]:
    prompts: list[list[int]] = []
    submit = llm.submit
    monkeypatch.setattr(
        llm, "submit", lambda prompt, *a, **k: prompts.append(prompt) or submit(prompt, *a, **k)
    )
    return prompts


def test_tool_chat_ctrl_c_keeps_the_calls_that_ran_as_a_plain_chat_keeps_its_answer(
    steered, tmp_path, monkeypatch
):
    """Ctrl-C in the second round of a tool chat dropped the whole turn: the code the interpreter had
    run (its file written) was gone from :history and from the next prompt, which asked the model about
    a conversation where nothing ran. Now the turn stays as far as it went, as a plain chat's answer:
    the question, the round whose tool ran (call and result as the agent keeps them), and the text shown
    of the answer Ctrl-C stopped."""
    from qwenkit.cli import chat as chat_cli

    llm = steered[0]
    code = "open('n.txt', 'w').write('42')\nprint(42)"
    queue(steered, call("code_interpreter", json.dumps({"code": code})))
    queue(steered, "I wrote 42 to n.txt, and then I went on to explain at length why.", "Yes.")
    pieces = [llm.tokenizer.decode([t]) for t in llm.tokenizer.encode("I wrote 42 to n.txt, and then")]
    out = CtrlC(at=pieces[-1])  # Ctrl-C at the write of " then"
    prompts = recorded_prompts(llm, monkeypatch)
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: llm)
    monkeypatch.setattr("sys.stdin", io.StringIO("Write 42 to n.txt.\n:history\nDid it work?\n"))
    monkeypatch.setattr("sys.stdout", out)
    argv = ["--code-interpreter", "--code-dir", str(tmp_path), "--temperature", "0", "--max-tokens", "120"]
    assert chat_cli.main(argv) == 0
    assert (tmp_path / "n.txt").read_text() == "42"
    # the text given to the terminal, the piece whose write Ctrl-C stopped included (as a plain chat's)
    shown = "I wrote 42 to n.txt, and then"
    printed = "[output]\nstdout:\n\n```\n42\n\n```\nI wrote 42 to n.txt, and\n"
    history = out.getvalue().split(printed, 1)[1]
    assert history.splitlines()[:9] == [
        "user: Write 42 to n.txt.",
        f"assistant: [calls code_interpreter({json.dumps({'code': code})})]",
        "tool: stdout:",
        "",
        "```",
        "42",
        "",
        "```",
        f"assistant: {shown}",
    ]
    third = llm.tokenizer.decode(prompts[2])
    assert third.endswith(
        "<|im_start|>user\nWrite 42 to n.txt.<|im_end|>\n<|im_start|>assistant\n"
        + call("code_interpreter", json.dumps({"code": code}))
        + "<|im_end|>\n<|im_start|>user\n<tool_response>\nstdout:\n\n```\n42\n\n```\n</tool_response>"
        f"<|im_end|>\n<|im_start|>assistant\n{shown}<|im_end|>\n"
        "<|im_start|>user\nDid it work?<|im_end|>\n<|im_start|>assistant\n"
    ), third
    assert not steered[1] and llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_ctrl_c_inside_a_tool_keeps_the_rounds_before_it_and_the_text_shown(steered, monkeypatch):
    """Ctrl-C at a --tools result prompt (raised inside the agent, not at a write): the round whose tool
    ran stays, the interrupted round's calls do not (their results never came), the reply's text does."""
    from qwenkit.cli.chat import ToolChatSession
    from qwenkit.tools.agent import typed_tools

    answers = iter(["sunny, 21C"])

    def ask(name: str, arguments: str) -> str:
        return next(answers)  # the second call: StopIteration, as Ctrl-C: raise KeyboardInterrupt instead

    def typed(name: str, arguments: str) -> str:
        try:
            return ask(name, arguments)
        except StopIteration:
            raise KeyboardInterrupt from None

    specs = [{"name": "get_weather", "parameters": {"type": "object"}}]
    session = ToolChatSession(steered[0], typed_tools(specs, typed), PARAMS)
    queue(steered, call("get_weather", '{"city": "Paris"}'))
    queue(steered, "And Rome:\n" + call("get_weather", '{"city": "Rome"}'))
    with pytest.raises(KeyboardInterrupt):
        assert "".join(session.ask("Weather in Paris and Rome?")) == "And Rome:\n"
    assert session.history == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": session.history[1]["tool_calls"][0]["id"],
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": session.history[1]["tool_calls"][0]["id"],
            "name": "get_weather",
            "content": "sunny, 21C",
        },
        {"role": "assistant", "content": "And Rome:"},
    ]
    assert not steered[1]


def ctrl_c_after(llm, monkeypatch, text: str) -> None:
    """Ctrl-C once, inside the agent, right after the next reply has written ``text`` (as SIGINT arrives
    while the engine streams: no piece of it need have been shown)."""
    stream = llm.stream

    def interrupted(prompt, *a, **k):
        deltas, written = stream(prompt, *a, **k), ""
        try:
            for delta in deltas:
                written += delta.text
                yield delta
                if text in written:
                    monkeypatch.setattr(llm, "stream", stream)
                    raise KeyboardInterrupt
        finally:
            deltas.close()

    monkeypatch.setattr(llm, "stream", interrupted)


WEATHER = [{"name": "get_weather", "parameters": {"type": "object"}}]


def test_ctrl_c_inside_the_second_call_of_a_reply_keeps_the_first_call_that_ran(steered, monkeypatch):
    """A reply of two calls, Ctrl-C at the second one's result prompt: the round was dropped whole, the
    first call's result (typed, or code the interpreter ran) with it, and only the text shown stayed. Now
    the history keeps the reply with the call that ran and its result, as the next request shows it."""
    from qwenkit.cli.chat import ToolChatSession
    from qwenkit.tools.agent import typed_tools

    results = iter(["sunny, 21C"])

    def typed(name: str, arguments: str) -> str:
        try:
            return next(results)
        except StopIteration:
            raise KeyboardInterrupt from None

    session = ToolChatSession(steered[0], typed_tools(WEATHER, typed), PARAMS)
    paris, rome = call("get_weather", '{"city": "Paris"}'), call("get_weather", '{"city": "Rome"}')
    queue(steered, f"Both:\n{paris}\n{rome}")
    with pytest.raises(KeyboardInterrupt):
        assert "".join(session.ask("Weather in Paris and Rome?")) == "Both:\n"
    call_id = session.history[1]["tool_calls"][0]["id"]
    assert session.history == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Both:",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": "sunny, 21C"},
    ]
    prompts = recorded_prompts(steered[0], monkeypatch)
    queue(steered, "Paris is sunny.")
    assert "".join(session.ask("And Paris?")) == "Paris is sunny."
    assert (
        steered[0]
        .tokenizer.decode(prompts[0])
        .endswith(
            "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n<|im_start|>assistant\nBoth:\n"
            f"{paris}<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response><|im_end|>\n"
            "<|im_start|>user\nAnd Paris?<|im_end|>\n<|im_start|>assistant\n"
        )
    )
    assert not steered[1]


def test_ctrl_c_while_a_tool_reply_thinks_keeps_its_thinking_as_a_plain_chat_does(steered, monkeypatch):
    """A plain chat stopped while the model thinks keeps the turn, the thinking as ``reasoning_content``
    and an empty answer; a tool chat kept nothing (no text had been shown), so the question was gone
    from the next prompt. Now it keeps the same, and the thinking of a reply whose tool was stopped."""
    from qwenkit.cli.chat import ToolChatSession
    from qwenkit.tools.agent import typed_tools

    llm = steered[0]
    session = ToolChatSession(llm, [ADD], PARAMS)
    queue(steered, "<think>\nThe user wants a sum, so I call add.\n</think>\n\n" + call("add", "{}"))
    ctrl_c_after(llm, monkeypatch, "so")
    with pytest.raises(KeyboardInterrupt):
        assert "".join(session.ask("What is 2+3?")) == ""
    assert session.history == [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "", "reasoning_content": "The user wants a sum, so"},
    ]
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0
    llm.model.script = None

    # the reply whole, its call stopped: its thinking stays with the text shown
    def typed(name: str, arguments: str) -> str:
        raise KeyboardInterrupt  # at the result prompt

    stopped = ToolChatSession(llm, typed_tools(WEATHER, typed), PARAMS)
    queue(
        steered, "<think>\nLook it up.\n</think>\n\nLet me look.\n" + call("get_weather", '{"city": "Rome"}')
    )
    with pytest.raises(KeyboardInterrupt):
        assert "".join(stopped.ask("Weather in Rome?")) == "Let me look.\n"
    assert stopped.history == [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "Let me look.", "reasoning_content": "Look it up."},
    ]
    assert not steered[1]


def test_ctrl_c_in_a_react_reply_keeps_the_turn_and_the_answer_written(steered, monkeypatch):
    """A ReAct reply shows nothing until it is whole, so Ctrl-C in it kept nothing: the question was gone
    from the next prompt. Now the turn stays as a plain chat's: the answer written so far (what follows
    ``Final Answer:``), or an empty one while the model was still thinking or writing its action."""
    from qwenkit.cli.chat import ToolChatSession

    llm = steered[0]
    monkeypatch.setattr(llm.tokenizer, "chat_template", chatml_without_tools(llm.tokenizer.chat_template))
    for reply, at, kept in [
        (
            "Thought: I know it.\nFinal Answer: It is five, as two and three make five.",
            "two",
            "It is five, as two",
        ),
        ('Thought: I should add.\nAction: add\nAction Input: {"a": 2, "b": 3}', "add\n", ""),
    ]:
        session = ToolChatSession(llm, [ADD], PARAMS)
        queue(steered, reply)
        ctrl_c_after(llm, monkeypatch, at)
        with pytest.raises(KeyboardInterrupt):
            assert "".join(session.ask("What is 2+3?")) == ""
        assert session.history == [
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": kept},
        ]
        assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0
        llm.model.script = None
    assert not steered[1]


def test_a_tool_chat_stopped_before_anything_showed_leaves_the_history_as_it_was(steered):
    from qwenkit.cli.chat import ToolChatSession

    session = ToolChatSession(steered[0], [ADD], PARAMS)
    queue(steered, "The sum is 5.")
    stream = session.ask("What is 2+3?")
    assert next(stream) == "The"
    stream.close()
    assert session.history == [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "The"},
    ]
    session.history.clear()
    stream = session.ask("What is 2+3?")
    stream.close()  # before it began
    assert session.history == []
    assert steered[0].driver.wait_idle() and steered[0].engine.blocks.usage == 0
    steered[0].model.script = None  # the reply left unplayed plays for no later request


def test_an_agent_stream_closed_early_aborts_its_request_and_runs_no_tool(steered):
    """Agent.stream left by ``break``/``close()``: the request stops at once (KV freed), the call the reply
    was writing never runs, and ``conversation`` holds what happened, the text shown included."""
    llm = steered[0]
    ran = []
    add = Tool("add", lambda a, b: ran.append((a, b)) or a + b, "Add", ADD.parameters)
    long = SamplingParams(max_tokens=1500, temperature=0)
    queue(steered, call("add", '{"a": 2, "b": 3}'))
    queue(steered, "Let me add again, " + "at length " * 500 + call("add", '{"a": 5, "b": 10}'))
    conversation: list[dict] = []
    stream = Agent(llm, [add], params=long).stream("What is 2+3+10?", conversation=conversation)
    pieces = [next(stream) for _ in range(3)]
    stream.close()
    assert llm.driver.wait_idle(timeout=2) and llm.engine.blocks.usage == 0
    assert ran == [(2, 3)]
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "assistant"]
    assert conversation[2]["content"] == "5" and conversation[3]["content"] == "".join(pieces).strip()
    llm.model.script = None
    with pytest.raises(ToolError, match="conversation must be an empty list"):
        next(Agent(llm, [add]).stream("hi", conversation=conversation))


def test_a_tool_chat_round_that_fails_after_a_tool_ran_keeps_the_run(steered, capsys):
    """A result too long for the window fails the next reply (one error line): the call that ran stays in
    the history, as Ctrl-C keeps it, where the whole turn was dropped; the next turn's prompt, fitted to
    the window, leaves that turn out (not the history)."""
    from qwenkit.cli.chat import ToolChatSession, answer

    big = Tool("fetch", lambda: "word " * 3000, "Fetch", {"type": "object", "properties": {}})
    session = ToolChatSession(steered[0], [big], PARAMS)
    queue(steered, call("fetch", "{}"))
    assert answer(session, "Fetch it.") is False
    err = capsys.readouterr().err
    assert err.startswith("error: the prompt has ") and err.count("\n") == 1, err
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool"]
    assert session.history[2]["content"] == "word " * 3000
    queue(steered, "Hello.")
    assert answer(session, "Hi.") and session.history[-1] == {"role": "assistant", "content": "Hello."}
    assert len(session.history) == 5 and not steered[1]
