"""``qwenkit generate ... >&-``: with standard output closed Python starts with ``sys.stdout`` None, and
the first write was an AttributeError traceback. Output to a closed stream is discarded, as a reader gone
(a broken pipe) is: the command succeeds, and says on standard error what it always says there."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

QWENKIT = [sys.executable, "-m", "qwenkit"]


def run_closed(args: list[str], close: str = ">&-") -> subprocess.CompletedProcess:
    """Run ``qwenkit args`` from a shell with its standard output closed (``close``)."""
    return subprocess.run(
        ["sh", "-c", f'exec "$@" {close}', "sh", *QWENKIT, *args], capture_output=True, timeout=300
    )


SUMMARY = r"\[1 prompt tokens, 3 new tokens, .*, finish: length\]\n"
STOPPED = r"\[stopped at max_tokens=3; raise it with --max-new-tokens N\]\n"


@pytest.mark.parametrize(
    "args, err",
    [
        (["generate", "-p", "hi", "--max-new-tokens", "3"], SUMMARY),
        (["generate", "-p", "hi", "--max-new-tokens", "3", "--json"], ""),
        (["chat", "-p", "hi", "--max-new-tokens", "3"], STOPPED),
    ],
    ids=["generate", "generate-json", "chat-p"],
)
def test_a_closed_stdout_is_a_quiet_success(tiny_chat_model, args, err):
    args = [args[0], str(tiny_chat_model), *args[1:]]
    r = run_closed(args)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert re.fullmatch(err.encode(), r.stderr), r.stderr.decode()[-2000:]


def test_closed_stdout_and_stderr_is_a_quiet_success(tiny_chat_model):
    r = run_closed(["generate", str(tiny_chat_model), "-p", "hi", "--max-new-tokens", "3"], ">&- 2>&-")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def test_a_closed_stdin_reads_as_empty(tiny_chat_model):
    """``qwenkit chat <&-`` (a supervisor or script that closed standard input): Python starts with
    ``sys.stdin`` None, and the chat and ``-p -`` ended in an AttributeError traceback. A closed standard
    input reads as an empty one (``</dev/null``): the chat ends at once, an empty question is refused."""
    model = str(tiny_chat_model)
    r = run_closed(["chat", model, "--max-new-tokens", "3"], "<&-")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"\n", b"")
    r = run_closed(["chat", model, "-p", "-"], "<&-")
    assert (r.returncode, r.stdout, r.stderr) == (2, b"", b"error: the question is empty\n")
    r = run_closed(["generate", model, "-p", "-"], "<&-")
    assert (r.returncode, r.stdout, r.stderr) == (2, b"", b"error: the prompt is empty\n")
