"""The chat as users drive it: stdin scripts, a pseudo-terminal with Ctrl-C, and one-shot -p."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from qwenkit.chat import ChatSession, chat
from qwenkit.cli.chat_commands import CommandError, parse_conf, split_assignments
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM

QWENKIT = [sys.executable, "-m", "qwenkit.cli"]
NO_END = {151643: -100, 151645: -100}  # the end tokens banned: the answer runs to max_tokens
KNOWN = (  # the settings :conf takes
    "max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, "
    "frequency_penalty, seed, stop, include_stop_str_in_output, logit_bias"
)


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, progress=False)


def run_chat(model, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*QWENKIT, "chat", str(model), *args], input=script, capture_output=True, text=True, timeout=120
    )


def test_commands_history_and_errors_over_stdin(tiny_chat_model):
    script = (
        "\n".join(
            [
                "hello there",
                ":history",
                ":conf bogus=1",
                ":conf temperature=-1",
                ":conf temperature=__import__('os')",
                ":seed x",
                ":seed 99999999999999999999999",
                ":frobnicate",
                ":clear",
                ":clear-history",
                ":history",
                ":system Be brief.",
                "second question",
                ":history",
                ":exit",
                "never reached",
            ]
        )
        + "\n"
    )
    r = run_chat(tiny_chat_model, script, "--max-new-tokens", "5", "--temperature", "0")
    # Errors went to stdout and the script exited 0: now each is one line on stderr, the chat goes on,
    # and a script in which a line failed ends with 1.
    assert r.returncode == 1, r.stderr
    out = r.stdout
    assert "user: hello there" in out and "error" not in out
    stop = "[stopped at max_tokens=5; raise it with :conf max_tokens=N]"
    assert r.stderr.splitlines() == [
        stop,
        f"error: unknown :conf key 'bogus'; known: {KNOWN}",
        "error: temperature must be >= 0, got -1",
        "error: value for temperature must be a literal such as 0.7, 20, None or 'text'; "
        "got \"__import__('os')\"",
        "error: :seed needs an integer, got 'x'",
        # an integer past 64 bits was said not to be an integer
        "error: seed must fit in 64 bits (-9223372036854775808..18446744073709551615), "
        "got 99999999999999999999999",
        "error: unknown command :frobnicate; type :help, or ::frobnicate to send it as a message",
        stop,
    ]
    after_clear = out.split("[history cleared]")[1]
    assert "[history is empty]" in after_clear and "user: hello there" not in after_clear
    assert "user: second question" in after_clear and "never reached" not in out
    # :clear writes no terminal codes into a pipe (the random model may print an ESC of its own)
    assert "\033[2J" not in out and "\033[H" not in out
    # the same script without its failing lines ends with 0
    good = "\n".join(line for line in script.splitlines() if line.startswith((":history", ":exit", "hello")))
    r = run_chat(tiny_chat_model, good + "\n", "--max-new-tokens", "5", "--temperature", "0")
    assert (r.returncode, r.stderr) == (0, stop + "\n")


def test_a_message_that_starts_with_a_colon(tiny_chat_model):
    """A line starting with ':' was always a command, so ':) thanks' could not be sent: a doubled colon
    sends the rest as the message, and an unknown command's error says so."""
    script = ":help\n:) thanks\n::) thanks\n:param x\n::param x\n::\n:history\n"
    r = run_chat(tiny_chat_model, script, "--max-new-tokens", "2", "--seed", "1")
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert [line for line in lines if line.startswith("user: ")] == [
        "user: :) thanks",
        "user: :param x",
        "user: :",
    ]
    assert "  ::TEXT                send :TEXT as a message (e.g. ::) thanks)" in lines
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: unknown command :); type :help, or ::) thanks to send it as a message",
        "error: unknown command :param; type :help, or ::param x to send it as a message",
    ]


def test_a_failed_answer_or_a_mistyped_setting_keeps_the_chat(tiny_chat_model):
    """Errors while answering (a setting the engine refuses, a message too long for the window) are one
    line and the chat goes on, its history without the failed turn; :conf checks each value's type."""
    script = "\n".join(
        [
            "hello",
            ":conf top_k=2.7",
            ":conf seed=1.5",
            ":conf stop=5",
            ":conf temperature='hot'",
            ":conf stop='a b' max_tokens=3",
            ":conf stop='open",
            ":seed",
            ":conf adapter='foo'",
            ":conf logit_bias={10000000: 1}",
            "this turn fails",
            ":reset-conf",
            "word " * 80,
            "third",
            ":history",
        ]
    )
    r = run_chat(
        tiny_chat_model, script + "\n", "--max-new-tokens", "4", "--max-context", "64", "--seed", "7"
    )
    assert r.returncode == 1, r.stderr
    out, errors = r.stdout, r.stderr
    for message in [
        "error: top_k must be an integer, got 2.7\n",
        "error: seed must be an integer or None, got 1.5\n",
        "error: stop must be a list or a string, got 5\n",
        "error: temperature must be a number, got 'hot'\n",
        'error: a quote or bracket is not closed in "stop=\'open"\n',
        f"error: :conf cannot set adapter: it is not a chat setting; known: {KNOWN}\n",
        "error: logit_bias token id 10000000 is outside the vocabulary (0..151935)\n",
        "error: the message needs ",
    ]:
        assert message in errors and message not in out, message
    assert "\nstop=['a b']\n" in out and "[seed = 7]" in out and "error" not in out
    history = out.rsplit("[settings reset]", 1)[1]  # what :history printed at the end
    assert "user: hello" in history and "user: third" in history
    assert "this turn fails" not in history and "word word" not in history
    assert "Traceback" not in errors


def test_chat_refuses_an_empty_question_and_a_bad_context(tiny_chat_model):
    for stdin, args, message in [
        ("", ["-p", "  "], "error: the question is empty\n"),
        (" \n", ["-p", "-"], "error: the question is empty\n"),  # read before the model loads
        (
            "",
            ["-p", "hi", "--max-context", "-5"],
            "error: argument --max-context: must be at least 2 tokens (a prompt token and one to generate), "
            "got -5; see `qwenkit chat --help`\n",
        ),
    ]:
        r = run_chat(tiny_chat_model, stdin, *args)
        assert (r.returncode, r.stderr) == (2, message)


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


def test_conf_really_applies_to_the_next_answer(tiny_chat_model, llm):
    # Greedy, one token: the reply must be exactly the model's first greedy token after the chat prompt.
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[
        0
    ].text.strip()
    r = run_chat(tiny_chat_model, ":conf temperature=0 max_tokens=1\nhi\n:history\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("temperature=0\nmax_tokens=1\n\n")  # the settings set, then the answer
    assert f"assistant: {expected}\n" in r.stdout
    # :reset-conf goes back: now 5 tokens of sampled text, not 1
    params = parse_conf(SamplingParams(), ["top_k=3", "stop='x'", "seed=None"])
    assert (params.top_k, params.stop, params.seed) == (3, ("x",), None)
    with pytest.raises(CommandError, match="expected key=value"):
        parse_conf(params, ["temperature"])
    # a dict or nested list with spaces is one value: it was cut at its first space ("got '{9707:'")
    items = split_assignments("logit_bias={9707: 5.0, 1879: -100} stop=[('a b'), ['c]']] top_k=2")
    assert items == ["logit_bias={9707: 5.0, 1879: -100}", "stop=[('a b'), ['c]']]", "top_k=2"]
    params = parse_conf(params, split_assignments("logit_bias={9707: 5.0, 1879: -100}  stop=['a b', 'c']"))
    assert (params.logit_bias, params.stop) == (((1879, -100.0), (9707, 5.0)), ("a b", "c"))
    for unclosed in ("logit_bias={1: [2, 3}", "stop='a b", "stop=[('a', 'b']"):
        with pytest.raises(CommandError, match="a quote or bracket is not closed"):
            split_assignments(unclosed)


def test_conf_shows_each_setting_on_its_line_as_conf_takes_it(tiny_chat_model):
    """:conf alone lists the chat's settings one a line, each as ``key=value`` typed back to :conf (it was
    one line of the engine's reprs: stop=('a b',), logit_bias=((9707, 5.0),)), so a line can be copied;
    a change shows the settings it set. The engine's own fields (grammar, adapter, ignore_eos, ...) are
    neither shown nor set: the whole list, internal fields with it, followed every change."""
    args = ("--max-new-tokens", "3", "--temperature", "0", "--top-p", "0.8", "--top-k", "20")
    script = ":conf stop='a b' logit_bias={9707: 5} top-k=20\n:conf\n:conf ignore_eos=True\n"
    r = run_chat(tiny_chat_model, script, *args)
    assert r.returncode == 1
    assert r.stderr == f"error: :conf cannot set ignore_eos: it is not a chat setting; known: {KNOWN}\n"
    shown = r.stdout.rstrip("\n").splitlines()  # the chat ends its last line at the end of its input
    every = [
        "max_tokens=3",
        "temperature=0.0",
        "top_p=0.8",
        "top_k=20",
        "min_p=0.0",
        "repetition_penalty=1.0",
        "presence_penalty=0.0",
        "frequency_penalty=0.0",
        "seed=None",
        "stop=['a b']",
        "include_stop_str_in_output=False",
        "logit_bias={9707: 5.0}",
    ]
    assert shown == ["stop=['a b']", "logit_bias={9707: 5.0}", "top_k=20", *every]
    again = run_chat(tiny_chat_model, f":conf {' '.join(every)}\n")  # the defaults of the model, then these
    assert (again.returncode, again.stderr, again.stdout.rstrip("\n").splitlines()) == (0, "", every)


def test_one_shot_prompt_and_python_chat_api(tiny_chat_model, llm):
    r = subprocess.run(
        [
            *QWENKIT,
            "chat",
            str(tiny_chat_model),
            "-p",
            "hi",
            "--temperature",
            "1",
            "--seed",
            "3",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    params = SamplingParams(temperature=1, seed=3, max_tokens=6)
    reply = chat(llm, [{"role": "user", "content": "hi"}], params)
    assert r.stdout.strip() == reply and reply
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=4), system="sys")
    first = "".join(session.ask("one"))
    "".join(session.ask("two"))
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first.strip()


class Terminal:
    """Reads a pseudo-terminal; text after a matched needle stays for the next wait (reads can merge)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pending = fd, b""

    def read_until(self, needle: bytes, timeout: float = 60.0) -> bytes:
        end = time.time() + timeout
        while needle not in self.pending:
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {needle!r}; got {self.pending[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.pending += os.read(self.fd, 4096)
                except OSError:
                    break
        cut = self.pending.index(needle) + len(needle)
        seen, self.pending = self.pending[:cut], self.pending[cut:]
        return seen

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def read_rest(self, proc: subprocess.Popen, timeout: float = 30.0) -> bytes:
        """Everything ``proc`` writes until it exits (read as it comes: a full terminal would block it)."""
        end = time.time() + timeout
        while time.time() < end:
            if not select.select([self.fd], [], [], 0.5)[0]:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # the process exited and its end of the terminal closed
                break
            if not data:
                break
            self.pending += data
        rest, self.pending = self.pending, b""
        return rest


@contextlib.contextmanager
def in_a_terminal(argv: list[str]) -> Iterator[tuple[subprocess.Popen, Terminal]]:
    """``argv`` run on a pseudo-terminal (standard error a pipe), killed and closed however the test ends."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, close_fds=True)
    os.close(slave)
    try:
        yield proc, Terminal(master)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


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


def test_ctrl_c_interrupts_the_answer_not_the_chat(tiny_chat_model):
    """The answer stops, the chat goes on, and the notice is on standard error, as the other notices
    are (it was printed into the answers on standard output)."""
    argv = [*QWENKIT, "chat", str(tiny_chat_model), "--max-new-tokens", "6000", "--temperature", "1"]
    with in_a_terminal(argv) as (proc, term):
        term.read_until(b">>> ")
        term.write(f":conf logit_bias={NO_END}\n".encode())  # a random model may end early
        term.read_until(b"logit_bias=")
        term.read_until(b">>> ")
        term.write(b"tell me a long story\n")
        term.read_until(b"story\r\n")  # the echo; the answer streams after it
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stopped = term.read_until(b">>> ")
        # the answer's line is ended on standard output, before the notice on standard error
        assert stopped.endswith(b"\r\n\r\n>>> ") and b"[interrupted]" not in stopped
        term.write(b":history\n")
        out = term.read_until(b">>> ")
        assert b"user: tell me a long story" in out and b"assistant: " in out
        # at the prompt: the chat goes on, the hint on standard error. Not at once: a SIGINT between the
        # prompt's write and readline's wait is seen only at the next key (Python's readline loop)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        assert term.read_until(b">>> ") == b"\r\n\r\n>>> "  # the prompt's line ended, then a new one
        term.write(b":exit\n")
        assert proc.wait(timeout=30) == 0
        assert proc.stderr.read() == b"[interrupted]\n[Ctrl-D or :exit to leave]\n"


def test_ctrl_c_in_a_one_shot_answer_ends_its_line(tiny_chat_model):
    """`chat -p` stopped by Ctrl-C left the answer's last line open (a newline on standard error followed
    it): with standard error elsewhere (`2>log`), the shell's prompt began inside the answer, and a file
    the answer went to lacked its final newline. Now its line is ended on standard output, and the notice
    goes to standard error, as in the interactive chat (exit 130, as before)."""
    argv = [*QWENKIT, "chat", str(tiny_chat_model), "-p", "tell me a long story", "--ignore-eos"]
    with in_a_terminal([*argv, "--max-new-tokens", "6000", "--temperature", "1"]) as (proc, term):
        assert select.select([term.fd], [], [], 60)[0]  # the answer streams
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        output = term.read_rest(proc)
        assert proc.wait(timeout=30) == 130
        assert len(output) > 5 and output.endswith(b"\r\n"), output  # (a random answer may end a line itself)
        assert proc.stderr.read() == b"[interrupted]\n"


def test_ctrl_c_in_a_system_prompt_block_keeps_the_chat(tiny_chat_model):
    """Ctrl-C while a `:system \"\"\"` block is typed drops the block and returns to the prompt, as in a
    message's block (it ended the chat: exit 130, the conversation lost)."""
    with in_a_terminal([*QWENKIT, "chat", str(tiny_chat_model), "--max-new-tokens", "2"]) as (proc, term):
        term.read_until(b">>> ")
        term.write(b':system """\nBe brief.\n')
        term.read_until(b"brief.\r\n... ")
        time.sleep(1.0)  # readline waits for the next line (see the test above)
        proc.send_signal(signal.SIGINT)
        assert term.read_until(b">>> ") == b"\r\n\r\n>>> "
        term.write(b":history\n")
        assert term.read_until(b">>> ") == b":history\r\n[history is empty]\r\n\r\n>>> "
        term.write(b":exit\n")
        assert proc.wait(timeout=30) == 0
        assert proc.stderr.read() == b"[Ctrl-D or :exit to leave]\n"


def test_an_answer_that_fails_midway_ends_its_line_before_the_error(tmp_path):
    """The model breaks on a token it wrote itself (its embedding row is NaN, so the step after it has
    NaN logits): the error began on the answer's own line ("Hello world booming: the model produced...")."""
    from factories import write_tiny_chat_model
    from safetensors.torch import load_file, save_file

    from qwenkit.generate import tokenizer_for

    model = write_tiny_chat_model(tmp_path / "breaks", tie_word_embeddings=False)
    tokenizer = tokenizer_for(model)
    said = [tokenizer.encode(piece)[0] for piece in ("Hello", " world", " boom")]
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"][said[-1]] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    bias = [(token, 100.0 - 2 * k) for k, token in enumerate(said)]
    greedy = ["--temperature", "0", "--repetition-penalty", "10", "--max-new-tokens", "8"]
    error = "error: the model produced NaN/inf logits in float32: the checkpoint may be corrupt"

    script = f":conf logit_bias={bias}\nhi\n:history\n"
    r = run_chat(model, script, *greedy, "--dtype", "float32")
    assert (r.returncode, r.stderr) == (1, f"{error}\n")
    assert (
        "\nHello world boom\nuser: hi\nassistant: Hello world boom\n" in r.stdout
    )  # the part that came stays
    # both streams into one (a terminal, 2>&1): the error on its own line, after the answer's part
    merged = subprocess.run(
        [*QWENKIT, "chat", str(model), *greedy, "--dtype", "float32"],
        input=script,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert f"\nHello world boom\n{error}\nuser: hi\n" in merged.stdout
    # a question asked once (-p) that fails is a failed command: one line on stderr, exit 2
    r = run_chat(model, "", "-p", "say boom", *greedy, "--dtype", "float32")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"{error}\n")


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


def test_an_answer_cut_off_says_so_on_stderr(tiny_chat_model):
    """An answer that stopped at max_tokens ended as if the model had finished: now one line on stderr
    says which limit cut it and how to raise it; an answer the model ends itself gets none."""
    r = run_chat(tiny_chat_model, "", "-p", "hi", "--max-new-tokens", "3", "--temperature", "0")
    assert (r.returncode, r.stderr) == (0, "[stopped at max_tokens=3; raise it with --max-new-tokens N]\n")
    assert r.stdout.endswith("\n")
    # the window, not max_tokens, cut it
    r = run_chat(
        tiny_chat_model, "hi\n", "--max-new-tokens", "500", "--max-context", "40", "--temperature", "0"
    )
    assert (r.returncode, r.stderr) == (0, "[stopped: the 40-token context window is full]\n")
    # the bundled model (the default) ends this answer itself: nothing on stderr
    question = "What is 2+2? Answer in one short sentence."
    r = subprocess.run(
        [*QWENKIT, "chat", "-p", question, "--temperature", "0", "--max-new-tokens", "64"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (r.returncode, r.stderr) == (0, "")
    assert "4" in r.stdout


def test_a_tool_chat_that_outgrows_the_window_drops_its_oldest_turns():
    """A plain chat leaves its oldest turns out of the prompt when the window fills; a tool chat did not,
    so once it outgrew the window every message failed ("the prompt has 423 tokens; the context window
    is 400 ...") until :clear-history. Now it fits as a plain chat does, and :history keeps every turn."""
    questions = ["hi", "hello again, tell me more", "and more"]
    script = "\n".join([*questions, ":history"]) + "\n"
    args = ["--code-interpreter", "--max-context", "400", "--temperature", "0", "--max-new-tokens", "60"]
    r = subprocess.run(  # the bundled model (the default), whose answers fill the window
        [*QWENKIT, "chat", *args], input=script, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "error" not in r.stderr, r.stderr
    asked = [line for line in r.stdout.splitlines() if line.startswith("user: ")]
    assert asked == [f"user: {q}" for q in questions]


STEERED_TOOL_CHAT = """
import sys
sys.path.insert(0, {tools!r})
from scripted import ScriptedModel, steer_next_request
from qwenkit.cli import chat as chat_cli
from qwenkit.generate import LLM
loaded = LLM.load({model!r}, dtype="float32", max_batch_size=2, progress=False)
model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens["<|im_end|>"])
llm = LLM(model, loaded.tokenizer, max_batch_size=2, max_seq_len=8192)
call = '<tool_call>\\n{{"name": "code_interpreter", "arguments": {{"code": "print(6*7)"}}}}\\n</tool_call>'
long = "It printed 42." * 1000  # tens of seconds of the answer, for Ctrl-C to stop
steer_next_request(llm, model).extend(llm.tokenizer.encode(r, allow_special=True) for r in (call, long))
chat_cli.load_llm = lambda args: llm
sys.exit(chat_cli.main(["--code-interpreter", "--temperature", "1", "--max-new-tokens", "6000"]))
"""


def test_ctrl_c_in_a_tool_chat_keeps_the_code_that_ran(tiny_chat_model, tmp_path):
    """`chat --code-interpreter`: Ctrl-C in the answer after the code ran dropped the whole turn, the run
    included (the next question's prompt did not know the code had run). Now, as in a plain chat, the turn
    stays as far as it went: :history shows the question, the call, its output and the answer so far."""
    from pathlib import Path

    script = STEERED_TOOL_CHAT.format(tools=str(Path(__file__).parent / "tools"), model=str(tiny_chat_model))
    with in_a_terminal([sys.executable, "-c", script]) as (proc, term):
        term.read_until(b">>> ")
        term.write(b"What is 6*7?\n")
        term.read_until(b"[output]\r\nstdout:\r\n\r\n```\r\n42\r\n\r\n```\r\n")
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        term.read_until(b">>> ")
        term.write(b":history\n")
        lines = term.read_until(b">>> ").split(b"\r\n")
        assert lines[1:9] == [
            b"user: What is 6*7?",
            b'assistant: [calls code_interpreter({"code": "print(6*7)"})]',
            b"tool: stdout:",
            b"",
            b"```",
            b"42",
            b"",
            b"```",
        ], lines
        assert lines[9].startswith(b"assistant: It printed 42.It printed 42.")
        term.write(b":exit\n")
        assert proc.wait(timeout=30) == 0
        assert proc.stderr.read() == b"[interrupted]\n"
