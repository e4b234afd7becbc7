"""Model text cannot drive the terminal: on a terminal, `generate` and `chat` show control characters as
escapes; into a pipe or a file they write the model's text byte for byte.

The tiny random model is made to say a chosen text through the engine's own settings: each token of it
gets a logit bias one step below the one before, greedy decoding takes them in that order, and a huge
repetition penalty keeps a token from coming twice.
"""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys

import pytest
from chat_driver import QWENKIT, Terminal

from qwenkit.cli import main
from qwenkit.cli.chat import ask_tool_result
from qwenkit.generate import LLM, tokenizer_for

# A colour (CSI), the start of an OSC 52 clipboard write ended by BEL, backspace, carriage return, tab,
# newlines, the one-character CSI of C1 (U+009B, two tokens: its UTF-8 bytes split) and DEL.
SAID = ["\x1b[", "3", "1", "m", "red", "\x1b", "]", "5", "2", "\x07", "\x08", "\r", "\t", "\n\n", "\x9b"]
SAID += ["\x7f", " safe"]
RAW = "".join(SAID)
# what a terminal is given: tab and newline as they are, every other control as an escape it cannot act on
SHOWN = "\\x1b[31mred\\x1b]52\\x07\\x08\\r\t\n\n\\u009b\\x7f safe"


class Screen(io.StringIO):
    """Standard output as a terminal would be."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def bias(tiny_chat_model) -> dict[int, float]:
    tokenizer = tokenizer_for(tiny_chat_model)
    ids = [i for piece in SAID for i in tokenizer.encode(piece)]
    assert len(set(ids)) == len(ids) == 18
    return {token: 100.0 - 5 * k for k, token in enumerate(ids)}


GREEDY = ["--temperature", "0", "--repetition-penalty", "1000", "--max-new-tokens", "18"]


@pytest.fixture
def forced(monkeypatch, bias):
    """`generate` and `chat -p` have no logit-bias option: their default settings get one."""
    default_params = LLM.default_params
    monkeypatch.setattr(LLM, "default_params", lambda llm, **kw: default_params(llm, **kw, logit_bias=bias))


@pytest.mark.parametrize(
    "command", [["generate", "--prompt-ids", "9707"], ["chat", "-p", "hi"]], ids=["generate", "chat"]
)
@pytest.mark.parametrize(
    ("stdout", "expected"), [(Screen, SHOWN + "\n"), (io.StringIO, RAW + "\n")], ids=["terminal", "pipe"]
)
def test_generate_and_one_shot_chat(tiny_chat_model, forced, monkeypatch, command, stdout, expected):
    out = stdout()
    monkeypatch.setattr(sys, "stdout", out)
    name, *rest = command
    assert main([name, str(tiny_chat_model), *rest, *GREEDY]) == 0
    assert out.getvalue() == expected


@pytest.mark.parametrize("stdout", [Screen, io.StringIO], ids=["terminal", "pipe"])
def test_generate_json_writes_no_control_a_terminal_obeys(tiny_chat_model, forced, monkeypatch, stdout):
    """json.dumps escapes ESC and the other C0 controls, but left DEL and the C1 controls (U+009B, a whole
    CSI) raw: `generate --json` on a terminal wrote them. There they are \\u escapes, the same JSON value."""
    out = stdout()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", str(tiny_chat_model), "--prompt-ids", "9707", *GREEDY, "--json"]) == 0
    text = out.getvalue()
    assert json.loads(text)["text"] == RAW
    raw_controls = {c for c in text if c < " " or "\x7f" <= c <= "\x9f"} - {"\n"}
    assert raw_controls == (set() if stdout is Screen else {"\x9b", "\x7f"})
    if stdout is Screen:
        assert '"text": "\\u001b[31mred\\u001b]52\\u0007\\b\\r\\t\\n\\n\\u009b\\u007f safe"' in text


def conf_line(bias: dict[int, float]) -> bytes:
    pairs = list(bias.items())  # a list: :conf keeps a bracketed value with spaces as one item
    return f":conf temperature=0 repetition_penalty=1000.0 max_tokens=18 logit_bias={pairs}\n".encode()


def test_interactive_chat_in_a_pipe_keeps_the_bytes(tiny_chat_model, bias):
    script = conf_line(bias) + b"hi\n:history\n"
    r = subprocess.run(
        [*QWENKIT, "chat", str(tiny_chat_model)], input=script, capture_output=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert f"\n{RAW}\n".encode() in r.stdout
    assert f"assistant: {RAW}\n".encode() in r.stdout


def test_interactive_chat_on_a_terminal_shows_controls(tiny_chat_model, bias):
    """The answer and :history show the escapes; :clear still clears the screen."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*QWENKIT, "chat", str(tiny_chat_model)], stdin=slave, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    term = Terminal(master)
    shown = SHOWN.replace("\n", "\r\n").encode()  # the terminal's own newline translation
    try:
        term.read_until(b">>> ")
        os.write(master, conf_line(bias))
        term.read_until(b"max_tokens=18")
        term.read_until(b">>> ")
        os.write(master, b"hi\n")
        out = term.read_until(b">>> ")
        assert shown + b"\r\n" in out
        for raw in (b"\x1b[31m", b"\x1b]52", b"\x07", b"\x08", b"\xc2\x9b", b"\x7f"):
            assert raw not in out, raw
        os.write(master, b":history\n")
        assert b"assistant: " + shown + b"\r\n" in term.read_until(b">>> ")
        os.write(master, b":clear\n")
        assert b"\x1b[2J\x1b[H" in term.read_until(b">>> ")
        os.write(master, b":exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_a_tool_call_on_a_terminal(monkeypatch):
    """The arguments of a tool call the chat shows (`--tools`) are the model's text too."""
    out = Screen()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", io.StringIO("42\n"))
    assert ask_tool_result("add", '{"a": "\x1b]52;c;aGk=\x07"}') == "42"
    assert out.getvalue() == '[tool call] add({"a": "\\x1b]52;c;aGk=\\x07"})\n[result of add] > '
