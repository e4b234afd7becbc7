"""The sandboxed code interpreter: escape attempts stopped and reported, its output cut, its settings
and code checked by name, its scratch directory."""

from __future__ import annotations

import gc

import pytest

from qwenkit.sandbox_kernel import TIMEOUT_MESSAGE
from qwenkit.tools.code_interpreter import CodeInterpreter

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
