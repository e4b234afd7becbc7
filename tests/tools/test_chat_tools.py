"""`qwenkit chat --tools FILE` and `--code-interpreter`/`--code-dir` (steered model): the tools file's
errors, the calls shown and results typed, streamed text, the chat commands and the notices."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agent_helpers import PARAMS, Writes, call, queue

from qwenkit.tools.agent import Agent, ToolError

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
