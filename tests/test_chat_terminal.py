"""The chat on a pseudo-terminal, Ctrl-C: it stops the answer (interactive, one-shot, a tool chat's)
or a block being typed, never the chat."""

from __future__ import annotations

import select
import signal
import sys
import time

from chat_driver import NO_END, QWENKIT, in_a_terminal


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
