"""What the chat reads: text that is not UTF-8 (questions, lines, flags, blocks), `-p -`, scripts with
CRLF line ends, and blocks of several lines (a message's, `:system`'s)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from chat_driver import NO_END, QWENKIT, run_chat

from qwenkit.chat import ChatSession
from qwenkit.generate import LLM


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, progress=False)


@pytest.mark.parametrize("encoding", ["utf-8:surrogateescape", "utf-8:strict"])
def test_text_that_is_not_utf8_is_one_line(tiny_chat_model, encoding):
    """A question or typed line with bytes that are not UTF-8 ended the chat with a traceback (TypeError
    from the template's encoding, or UnicodeDecodeError from a strict stdin, which also lost the lines
    after it); now it is one error line, and a typed one keeps the chat."""
    env = {**os.environ, "PYTHONIOENCODING": encoding}

    def chat(stdin: bytes, *args: str) -> subprocess.CompletedProcess:
        command = [*QWENKIT, "chat", str(tiny_chat_model), "--max-new-tokens", "2", *args]
        return subprocess.run(command, input=stdin, capture_output=True, env=env, timeout=120)

    r = chat(b"\xffabc", "-p", "-")
    assert (r.returncode, r.stdout, r.stderr) == (
        2,
        b"",
        b"error: standard input is not UTF-8 text (an invalid byte at position 0)\n",
    )
    r = subprocess.run(
        [*QWENKIT, "chat", str(tiny_chat_model), "-p", os.fsdecode(b"ab\xff")],
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert (r.returncode, r.stderr) == (
        2,
        b"error: the question is not UTF-8 text (an invalid byte at position 2)\n",
    )
    r = chat(b"hi\xff\n:history\nhello\n:history\n")
    assert r.returncode == 1
    assert r.stderr.decode().splitlines()[0] == (
        "error: the message is not UTF-8 text (an invalid byte at position 2)"
    )
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "[history is empty]"
    assert "user: hello" in lines and lines.count("[history is empty]") == 1


def test_a_system_prompt_or_stop_flag_that_is_not_utf8_is_refused(tiny_chat_model):
    """`--system` bytes that are not UTF-8 failed every turn with a message about "the rendered chat
    prompt", naming no flag; a `--stop` string of them was taken and could never match."""
    for flags, error in (
        (["--system", os.fsdecode(b"be \xff brief")], "--system is not UTF-8 text"),
        (["--stop", os.fsdecode(b"\xffend")], "--stop is not UTF-8 text"),
    ):
        r = subprocess.run(
            [*QWENKIT, "chat", str(tiny_chat_model), "-p", "hi", "--max-new-tokens", "2", *flags],
            capture_output=True,
            timeout=120,
        )
        place = flags[1].index("\udcff")
        assert (r.returncode, r.stdout, r.stderr.decode()) == (
            2,
            b"",
            f"error: {error} (an invalid byte at position {place})\n",
        )


def test_a_system_prompt_block_that_is_not_utf8_keeps_the_chat(tiny_chat_model):
    """A `:system \"\"\"` block with a line that is not UTF-8 is one error line and the chat goes on, as
    for a message's block (it ended the chat with exit 2, the rest of the script never read)."""
    script = b':system """\nBe brief.\n\xff\n"""\n:history\nhello\n:history\n'
    command = [*QWENKIT, "chat", str(tiny_chat_model), "--max-new-tokens", "2", "--temperature", "0"]
    r = subprocess.run(command, input=script, capture_output=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.decode().splitlines() == [
        "error: line 3 of the system prompt is not UTF-8 text (an invalid byte at position 0)",
        "[stopped at max_tokens=2; raise it with :conf max_tokens=N]",
    ]
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "[history is empty]" and "[system prompt set; history cleared]" not in lines
    assert "user: hello" in lines


def test_a_question_piped_to_p_is_the_typed_message(tiny_chat_model, llm, monkeypatch):
    """`echo QUESTION | chat -p -` asks what `-p QUESTION` and a typed line ask: the newline `echo` ends
    it with (and blank lines around it) is not part of the message (the model was sent "hi\\n")."""
    import qwenkit.cli.chat as chat_cli
    from qwenkit.cli import main

    prompts: list[list[int]] = []
    stream = llm.stream
    monkeypatch.setattr(
        llm, "stream", lambda prompt, *a, **k: prompts.append(list(prompt)) or stream(prompt, *a, **k)
    )
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: llm)
    args = ["chat", str(tiny_chat_model), "--max-new-tokens", "1"]
    assert main([*args, "-p", "hi"]) == 0
    for piped in ("hi\n", "\nhi  \n\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
        assert main([*args, "-p", "-"]) == 0
    expected = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert prompts == [expected] * 3


def test_a_script_of_crlf_lines_is_read_as_typed(tiny_chat_model, llm, monkeypatch):
    """A script written on Windows (CRLF line ends) piped to the chat: a block (a message's, `:system`'s)
    kept a CR at the end of each line, sent to the model ("line one\\r\\nline two"), as `-p -` did with
    its lines and a typed tool result with its end. The CR of a CRLF line end is the line end's."""
    import qwenkit.cli.chat as chat_cli
    from qwenkit.cli import main

    prompts: list[list[int]] = []
    stream = llm.stream
    monkeypatch.setattr(
        llm, "stream", lambda prompt, *a, **k: prompts.append(list(prompt)) or stream(prompt, *a, **k)
    )
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: llm)
    args = ["chat", str(tiny_chat_model), "--max-new-tokens", "1"]
    script = (
        ':system """\r\nBe brief.\r\n\r\n    Very brief.\r\n"""\r\n"""\r\nline one\r\nline two\r\n"""\r\n'
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(args) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("line one\r\nline two\r\n"))
    assert main([*args, "-p", "-"]) == 0
    system = {"role": "system", "content": "Be brief.\n\n    Very brief."}
    user = {"role": "user", "content": "line one\nline two"}
    render = llm.tokenizer.apply_chat_template
    assert prompts == [
        render([system, user], add_generation_prompt=True),
        render([user], add_generation_prompt=True),
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("sunny, 21C\r\n"))
    assert chat_cli.ask_tool_result("get_weather", "{}") == "sunny, 21C"


def test_a_message_of_several_lines(tiny_chat_model):
    """ollama's convention: a line that starts with three double quotes opens a message of several lines
    and a line that ends with them sends it, its lines as typed (a line was a message of its own before,
    so pasted code went out line by line). A block is a message even when it starts with a colon; one
    that is never closed is not sent: an error, and the script's exit status says so."""
    block = '"""def f(x):\n\n    return x  # :not a command\n"""\n'
    script = f':help\n{block}""":conf is text here"""\n:history\n"""\nnot closed\n'
    r = run_chat(tiny_chat_model, script, "--max-new-tokens", "2", "--temperature", "0")
    assert r.returncode == 1
    assert (
        '  """                   begin a message of several lines; a line that ends with """ sends it\n'
        in (r.stdout)
    )
    shown = r.stdout.rsplit("\nuser: ", 2)
    assert shown[1].startswith("def f(x):\n\n    return x  # :not a command\nassistant: ")
    assert shown[2].startswith(":conf is text here\nassistant: ")
    stop = "[stopped at max_tokens=2; raise it with :conf max_tokens=N]"
    assert r.stderr.splitlines() == [
        stop,
        stop,
        'error: the message was not sent: its """ block was not closed',
    ]
    assert "\n... " not in r.stdout  # no continuation prompts into a pipe (and no third answer above)


def test_a_system_prompt_of_several_lines(tiny_chat_model, llm):
    """`:system \"\"\"` opens a block as a message's \"\"\" does, its lines the system prompt (it set the
    prompt to the three quotes and sent the next lines as messages)."""
    system = "Be brief.\n\n    Very brief."
    params = llm.default_params(temperature=1.0, seed=7, max_tokens=6, logit_bias=NO_END)
    expected = "".join(ChatSession(llm, params, system=system).ask("hi")).strip()
    literal = "".join(ChatSession(llm, params, system='"""').ask("hi")).strip()
    assert expected != literal  # the answer tells which system prompt the chat holds
    seeded = ("--temperature", "1", "--seed", "7", "--max-new-tokens", "6")
    script = f':conf logit_bias={NO_END}\n:system """{system}\n"""\nhi\n:history\n'
    r = run_chat(tiny_chat_model, script, *seeded)
    assert (r.returncode, r.stderr) == (0, "[stopped at max_tokens=6; raise it with :conf max_tokens=N]\n")
    assert r.stdout.count("[system prompt set; history cleared]") == 1
    assert r.stdout.rstrip("\n").endswith(f"user: hi\nassistant: {expected}")
    # opened and closed on one line; one never closed sets nothing, and the script's exit says so
    one_line = f':conf logit_bias={NO_END}\n:system """Be brief."""\nhi\n:system """\nnot closed\n'
    r = run_chat(tiny_chat_model, one_line, *seeded)
    brief = "".join(ChatSession(llm, params, system="Be brief.").ask("hi"))
    assert r.returncode == 1 and f"[system prompt set; history cleared]\n{brief}\n" in r.stdout
    assert r.stderr.splitlines()[1:] == ['error: the system prompt was not set: its """ block was not closed']
