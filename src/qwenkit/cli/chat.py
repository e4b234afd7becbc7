"""``qwenkit chat [MODEL]``: an interactive terminal chat with streaming, history and Qwen's demo commands.

``-p QUESTION`` answers once and exits (for scripts and pipes). Ctrl-C stops the current answer and
returns to the prompt; Ctrl-D or ``:exit`` leaves. A thinking model's thinking (Qwen3's ``<think>``
block) is shown before its answer, dimmed on a terminal and between ``<think>`` lines elsewhere, or not at
all with ``--hide-thinking``; only the answer goes back to the model on the next turn.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

from qwenkit.chat import ChatSession, fit_messages
from qwenkit.checkpoint import open_checkpoint
from qwenkit.cli.chat_commands import CommandError, run_command
from qwenkit.cli.common import (
    NotUTF8Error,
    add_model_args,
    add_sampling_args,
    add_tensor_parallel_arg,
    lead_tensor_parallel,
    load_llm,
    read_stdin,
    resolve_model,
    sampling_overrides,
    stdin_keeps_bad_bytes,
    utf8_text,
    wants_tensor_parallel,
)
from qwenkit.cli.terminal import for_terminal
from qwenkit.command_parser import CommandParser
from qwenkit.delta_stream import DeltaStream
from qwenkit.engine import SamplingParams
from qwenkit.errors import ConfigError, QwenkitError
from qwenkit.generate import Delta, tokenizer_for
from qwenkit.sigterm import terminate_unwinds


class AnswerLine:
    """Whether standard output's last line is an answer still open (streamed text with no newline yet), so
    that what comes next (a tool's output, an error on standard error) starts a line of its own."""

    def __init__(self) -> None:
        self.open = False

    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(for_terminal(text))
            sys.stdout.flush()
            self.open = not text.endswith("\n")

    def style(self, code: str) -> None:
        """Our own terminal code (the thinking's dim), written as it is."""
        sys.stdout.write(code)
        sys.stdout.flush()

    def end(self) -> None:
        if self.open:
            print()
        self.open = False
        sys.stdout.flush()  # before a line on standard error: both show in order on a terminal


LINE = AnswerLine()


def report(error: Exception | str) -> None:
    """One ``error:`` line on standard error, on a line of its own."""
    LINE.end()
    print(f"error: {error}", file=sys.stderr, flush=True)


def show(stream: Iterator[str]) -> None:
    """Write the reply's pieces as they come, then end its line. An error after some text ends the line
    first, so that the error's own line does not begin in the middle of the answer."""
    try:
        for piece in stream:
            LINE.write(piece)
    except QwenkitError:
        LINE.end()
        raise
    print()
    LINE.open = False


DIM, UNDIM = "\x1b[2m", "\x1b[22m"


def with_thinking(deltas: Iterator[Delta], hide: bool) -> Iterator[str]:
    """A reply's text as the chat prints it: its thinking first, dimmed on a terminal and between
    ``<think>`` lines elsewhere (or left out: ``hide``), then its answer. A reply cut off while thinking
    ends there; the terminal's dim, or the pipe's block, ends with it, whatever stops it (Ctrl-C
    included)."""
    tty, thinking = sys.stdout.isatty(), False
    try:
        for delta in deltas:
            if delta.reasoning and not hide:
                if not thinking:
                    thinking = True
                    if tty:
                        LINE.style(DIM)
                    else:
                        yield "<think>\n"
                yield delta.reasoning
            if delta.text and thinking:
                thinking = False
                if tty:
                    LINE.style(UNDIM)
                yield "\n\n" if tty else "\n</think>\n\n"
            if delta.text:
                yield delta.text
    finally:
        if isinstance(deltas, Generator | DeltaStream):
            deltas.close()  # the session's turn joins its history now, not whenever the stream is freed
        if thinking and tty:
            LINE.style(UNDIM)
        elif thinking:  # written, not yielded: a closed generator (Ctrl-C) cannot yield
            LINE.write("\n</think>")


def reply(session: ChatSession | ToolChatSession, text: str, hide_thinking: bool) -> Iterator[str]:
    """The text to print for ``text``'s answer (a tool chat's agent shows its answers alone)."""
    if isinstance(session, ToolChatSession):
        return session.ask(text)
    return with_thinking(session.stream(text), hide_thinking)


def stop_notice(session: ChatSession | ToolChatSession, how: str) -> None:
    """Say so on standard error when the answer was cut off by ``max_tokens`` (``how``: how to raise it)
    or by the context window, not ended by the model, or a tool chat's rounds ran out."""
    rounds = getattr(session, "rounds_out", None)
    if rounds is not None:
        sys.stdout.flush()
        print(f"[stopped after {rounds} rounds of tool calls, with no answer]", file=sys.stderr, flush=True)
        return
    done = session.completion
    if done is None or done.finish_reason != "length":
        return
    limit = session.params.max_tokens
    if len(done.token_ids) >= limit:
        note = f"[stopped at max_tokens={limit}; raise it with {how}]"
    else:
        note = f"[stopped: the {len(done.prompt_ids) + len(done.token_ids)}-token context window is full]"
    sys.stdout.flush()
    print(note, file=sys.stderr, flush=True)


def answer(session: ChatSession | ToolChatSession, text: str, hide_thinking: bool = False) -> bool:
    """Print the reply as it comes. Ctrl-C stops it; an error (the message does not fit, a setting the
    engine refuses) is one line on standard error. Either way the chat goes on, its history as the
    session left it. Returns False when the answer failed."""
    stream = reply(session, text, hide_thinking)
    try:
        show(stream)
    except KeyboardInterrupt:
        interrupted(stream)
    except QwenkitError as e:
        report(e)
        return False
    else:
        stop_notice(session, ":conf max_tokens=N")
    return True


def interrupted(stream: Iterator[str]) -> None:
    """After Ctrl-C in an answer: the reply stops (its turn joins the history as far as it went), its line
    is ended, then the notice goes to standard error (as stop_notice's)."""
    stream.close()
    LINE.end()
    print("[interrupted]", file=sys.stderr, flush=True)


BLOCK = '"""'


def read_message(interactive: bool) -> tuple[str, bool]:
    """The next line typed, stripped, or a block of lines (ollama's convention): a line that starts with
    three double quotes opens it and the next line that ends with them closes it, the text between kept as
    typed (indentation, blank lines). Returns (text, whether it was a block: a message even when it
    starts with a colon). A command's block (``:system \"\"\"``) is read here too, so that Ctrl-C, Ctrl-D or
    a line that is not UTF-8 inside it is met as inside a message's (Ctrl-C there ended the chat)."""
    line = utf8_text(read_line("\n>>> " if interactive else ""), "the message")
    if not line.lstrip().startswith(BLOCK):
        return with_block(line.strip(), interactive), False
    return read_block(line.lstrip(), interactive, "the message", "was not sent"), True


def read_line(prompt: str) -> str:
    """The next line of input, without the CR of a CRLF line end (a script written on Windows, piped to
    the chat: its blocks kept a CR at the end of every line)."""
    return input(prompt).removesuffix("\r")


def read_block(first: str, interactive: bool, what: str, unsaid: str) -> str:
    """The text of a block whose first line (``first``, from its opening quotes on) was read: up to the
    line that ends with the closing quotes, as typed. ``what`` is the block (for errors: ``{what}
    {unsaid}`` when it is never closed)."""
    text, lines, bad = first[len(BLOCK) :], [], None
    while not text.rstrip().endswith(BLOCK):
        lines.append(text)
        try:
            text = read_line("... " if interactive else "")
        except EOFError:
            raise CommandError(f"{what} {unsaid}: its {BLOCK} block was not closed") from None
        try:
            utf8_text(text, f"line {len(lines) + 1} of {what}")
        except NotUTF8Error as e:  # read on to the block's end: its lines are not messages of their own
            bad = bad or e
    lines.append(text.rstrip()[: -len(BLOCK)])
    if bad is not None:
        raise bad
    return "\n".join(lines).lstrip("\n").rstrip()


def with_block(line: str, interactive: bool) -> str:
    """A command line, its argument read as a block where it opens one (``:system \"\"\"``)."""
    name, _, arg = line.partition(" ")
    if name != ":system" or not arg.lstrip().startswith(BLOCK):
        return line
    return f"{name} {read_block(arg.lstrip(), interactive, 'the system prompt', 'was not set')}"


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="qwenkit chat", description="Chat with a model in the terminal.")
    add_model_args(parser)
    parser.add_argument("-p", "--prompt", help="answer this one question and exit ('-' reads stdin)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument(
        "--tools",
        metavar="FILE",
        help="JSON file of tools (OpenAI `tools` array): tool calls are shown and you type each result",
    )
    parser.add_argument(
        "--code-interpreter", action="store_true", help="offer the built-in sandboxed Python tool (runs it)"
    )
    parser.add_argument(
        "--code-dir",
        metavar="DIR",
        help="the code interpreter's work directory (implies --code-interpreter): the code sees its files, "
        "and what it writes, figures included, stays (default: a scratch directory removed at exit)",
    )
    parser.add_argument(
        "--no-thinking",
        action="store_true",
        help="Qwen3: answer without thinking first (the chat template's enable_thinking=False; "
        "without it, /no_think or /think in a message switches it from that turn on (Qwen3 follows "
        "the latest))",
    )
    parser.add_argument(
        "--hide-thinking",
        action="store_true",
        help="Qwen3: show the answer only; the model still thinks first (shown dimmed by default)",
    )
    add_sampling_args(parser)
    add_tensor_parallel_arg(parser)
    args = parser.parse_args(argv)
    if args.prompt == "-":  # read now: an empty question is refused before the model loads
        # as a typed block: the blank lines around it and echo's newline are not the question's
        args.prompt = read_stdin().replace("\r\n", "\n").lstrip("\n").rstrip()  # CRLF lines, as typed
    elif args.prompt is not None:
        utf8_text(args.prompt, "the question")
    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("the question is empty")
    if args.system is not None:  # before the weights load: it failed every turn, naming no flag
        utf8_text(args.system, "--system")
    sampling_overrides(args)  # --stop's text checked now too
    args.code_interpreter = args.code_interpreter or args.code_dir is not None
    tools = chat_tools(args) if args.tools or args.code_interpreter else None  # file errors first
    if args.no_thinking:  # refused from the template alone, before the weights load (minutes for a big one)
        template_kwargs(
            args, tokenizer_for(open_checkpoint(resolve_model(args.model))).chat_template_for(tools)
        )
    # SIGTERM unwinds (exit 143, the tensor-parallel ranks stopped): its default action did that only
    # outside a PID namespace, and a container's PID 1 chatted on to the end of its answer or input.
    with terminate_unwinds():
        if wants_tensor_parallel(args):
            return lead_tensor_parallel(args, lambda llm: run(args, llm, tools))
        return run(args, load_llm(args), tools)


def template_kwargs(args: argparse.Namespace, chat_template: str | None) -> dict:
    """What the chat template is rendered with; ``--no-thinking`` is refused where the template has no
    such switch (a thinking-only model's, Qwen2.5's), which would silently ignore it."""
    if not getattr(args, "no_thinking", False):
        return {}
    if "enable_thinking" not in (chat_template or ""):
        raise ConfigError(
            "--no-thinking: this model's chat template has no thinking switch (enable_thinking)"
        )
    return {"enable_thinking": False}


def run(args: argparse.Namespace, llm, tools: list | None = None) -> int:
    """The chat. Exit status: an answer that fails under ``-p`` is an error (2, from the command's
    dispatcher); a chat typed on a terminal ends with 0; a chat read from a pipe or a file goes on after
    an error, as typed, and ends with 1 if any line failed, so a script can tell."""
    params = llm.default_params(**sampling_overrides(args))
    kwargs = template_kwargs(args, llm.tokenizer.chat_template_for(tools))
    if tools is None:
        session: ChatSession | ToolChatSession = ChatSession(
            llm, params, system=args.system, template_kwargs=kwargs
        )
    else:
        session = ToolChatSession(llm, tools, params, system=args.system, template_kwargs=kwargs)
    if args.prompt is not None:
        stream = reply(session, args.prompt, args.hide_thinking)
        try:
            show(stream)
        except KeyboardInterrupt:  # the answer's line ended, so the shell's prompt starts a line of its own
            interrupted(stream)
            return 130  # the status of a command Ctrl-C stopped, as the dispatcher's
        stop_notice(session, "--max-new-tokens N")
        return 0

    interactive = sys.stdin.isatty()
    stdin_keeps_bad_bytes()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()

        print('qwenkit chat: type a message, """ for several lines, :help for commands, Ctrl-D to leave.')
        if isinstance(session, ToolChatSession) and session.agent.style.react:
            print("Tools are on: this model's answers (ReAct) print whole, after the tool calls they make.")
    failed = False
    while True:
        try:
            line, block = read_message(interactive)
        except EOFError:
            print()
            return 1 if failed and not interactive else 0
        except KeyboardInterrupt:
            print()  # ends the prompt's line; the notice goes with the others, to standard error
            print("[Ctrl-D or :exit to leave]", file=sys.stderr)
            continue
        except (NotUTF8Error, CommandError) as e:  # the chat goes on
            report(e)
            failed = True
            continue
        if not line:
            continue
        if block:
            pass  # a block is a message, whatever it starts with
        elif line.startswith("::"):  # the escape for a message that begins with a colon
            line = line[1:]
        elif line.startswith(":"):
            try:
                if not run_command(session, params, line):
                    return 1 if failed and not interactive else 0
            except CommandError as e:
                report(e)
                failed = True
            continue
        failed = not answer(session, line, args.hide_thinking) or failed


class ToolChatSession:
    """A chat where the model may call tools, with ChatSession's history, system prompt and settings (so
    the chat commands work alike). Each turn is one agent run over the whole history; its text streams as
    the model writes it, tool-call markup held back (a ReAct model's reply comes whole, once parsed)."""

    def __init__(
        self,
        llm,
        tools: list,
        params: SamplingParams,
        system: str | None = None,
        template_kwargs: dict | None = None,
    ) -> None:
        from qwenkit.tools.agent import Agent

        self.agent = Agent(llm, tools, params=params, template_kwargs=template_kwargs)
        self.params, self.system = params, system
        self.history: list[dict] = []
        self.completion = None  # the last reply's, once a turn ends (as ChatSession.completion)
        self.rounds_out: int | None = None  # the rounds the last turn ran, when they ran out with no answer

    def ask(self, user_text: str) -> Iterator[str]:
        """The turn joins the history when the agent finishes, or as far as it went when Ctrl-C or an error
        stops it after it began (as a plain chat's): the calls that ran, with their results, and the reply it
        stopped in (``Agent.stream``). Stopped before its first reply began, the history is as it was."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        self.agent.params = self.params
        self.completion = self.rounds_out = None
        agent = self.agent
        messages = [*head, *self.history, {"role": "user", "content": user_text}]
        # the oldest turns the window cannot hold are left out of the prompt (not the history), as in a
        # plain chat: a long tool chat failed every turn once it outgrew the window
        fitted, _ = fit_messages(agent.llm, messages, self.params, agent.prompt)
        dropped = len(messages) - len(fitted)
        conversation: list[dict] = []
        try:
            result = yield from agent.stream(fitted, conversation=conversation)
        finally:  # the tools that ran did run (the interpreter's code, its files): the next prompt says so
            if conversation[len(fitted) :]:
                self.history = self.history[:dropped] + conversation[len(head) :]
        self.completion = result.completion
        if result.answer is None:  # stop_notice says so on standard error, not in the answer
            self.rounds_out = result.rounds


def ask_tool_result(name: str, arguments: str) -> str:
    LINE.end()
    print(for_terminal(f"[tool call] {name}({arguments})"))
    try:
        return read_line(for_terminal(f"[result of {name}] > "))
    except EOFError:
        return ""


def code_dir(path: str | None) -> Path | None:
    """``--code-dir``, made if missing (None: the interpreter's own scratch directory)."""
    if path is None:
        return None
    if not path.strip():
        raise ConfigError("--code-dir is empty")
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--code-dir {path}: not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--code-dir {path}: cannot create it ({e.strerror})") from None
    return directory


def chat_tools(args: argparse.Namespace) -> list:
    """The tools of ``--tools FILE`` (calls shown, results typed) and ``--code-interpreter`` (runs)."""
    from qwenkit.tools.agent import Tool, load_tool_specs, typed_tools
    from qwenkit.tools.code_interpreter import FUNCTION, CodeInterpreter

    tools = typed_tools(load_tool_specs(args.tools), ask_tool_result) if args.tools else []
    if args.code_interpreter:
        interpreter = CodeInterpreter(workdir=code_dir(args.code_dir))

        def run_code(code: str) -> str:
            LINE.end()
            print(f"[code_interpreter]\n{for_terminal(code)}")
            out = interpreter(code)
            print(f"[output]\n{for_terminal(out)}")
            return out

        tools.append(Tool(FUNCTION["name"], run_code, FUNCTION["description"], FUNCTION["parameters"]))
    return tools
