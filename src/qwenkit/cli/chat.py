"""``qwenkit chat [MODEL]``: an interactive terminal chat with streaming, history and Qwen's demo commands.

``-p QUESTION`` answers once and exits (for scripts and pipes). Ctrl-C stops the current answer and
returns to the prompt; Ctrl-D or ``:exit`` leaves.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys

from qwenkit.chat import ChatSession
from qwenkit.cli.common import (
    add_model_args,
    add_sampling_args,
    add_tensor_parallel_arg,
    lead_tensor_parallel,
    load_llm,
    sampling_overrides,
    wants_tensor_parallel,
)
from qwenkit.command_parser import CommandParser
from qwenkit.engine import SamplingParams, SamplingParamsError

HELP = """commands:
  :help                 this help
  :clear                clear the screen
  :clear-history        forget the conversation so far
  :history              show the conversation so far
  :seed N               set the sampling seed
  :conf key=value ...   change sampling settings (e.g. :conf temperature=0.5 top_k=20); :conf alone shows them
  :reset-conf           back to the settings the chat started with
  :system TEXT          set the system prompt (empty to remove) and clear the history
  :exit                 leave (also Ctrl-D)
Ctrl-C stops the current answer."""

CONF_KEYS = tuple(
    f.name for f in dataclasses.fields(SamplingParams) if f.name not in ("stop_token_ids", "logprobs")
)


class CommandError(ValueError):
    """A chat command could not be carried out; the chat goes on."""


def parse_conf(params: SamplingParams, assignments: list[str]) -> SamplingParams:
    """Apply ``key=value`` pairs. Values are Python literals (never evaluated as code)."""
    changes: dict[str, object] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise CommandError(f"expected key=value, got {item!r}")
        if key not in CONF_KEYS:
            raise CommandError(f"unknown :conf key {key!r}; known: {', '.join(CONF_KEYS)}")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            raise CommandError(
                f"value for {key} must be a literal such as 0.7, 20, None or 'text'; got {raw!r}"
            ) from None
        if key == "stop":
            value = (value,) if isinstance(value, str) else tuple(value or ())
        changes[key] = value
    try:
        return dataclasses.replace(params, **changes)
    except (SamplingParamsError, TypeError) as e:
        raise CommandError(str(e)) from None


def run_command(session: ChatSession, initial: SamplingParams, line: str) -> bool:
    """Carry out one ``:command``; return False to leave the chat."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("exit", "quit", "q"):
        return False
    if name in ("help", "h"):
        print(HELP)
    elif name == "clear":
        if sys.stdout.isatty():  # no terminal codes in a pipe or a file
            print("\033[2J\033[H", end="")
    elif name == "clear-history":
        session.history.clear()
        print("[history cleared]")
    elif name == "history":
        if not session.history:
            print("[history is empty]")
        for m in session.history:
            print(f"{m['role']}: {m['content']}")
    elif name == "seed":
        try:
            session.params = dataclasses.replace(session.params, seed=int(arg))
        except ValueError:
            raise CommandError(f":seed needs an integer, got {arg!r}") from None
        print(f"[seed = {session.params.seed}]")
    elif name == "conf":
        if arg:
            session.params = parse_conf(session.params, arg.split())
        print("[" + ", ".join(f"{k}={getattr(session.params, k)!r}" for k in CONF_KEYS) + "]")
    elif name == "reset-conf":
        session.params = initial
        print("[settings reset]")
    elif name == "system":
        session.system = arg or None
        session.history.clear()
        print(f"[system prompt {'set' if arg else 'removed'}; history cleared]")
    else:
        raise CommandError(f"unknown command :{name}; type :help")
    return True


def answer(session: ChatSession, text: str) -> None:
    stream = session.ask(text)
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
    except KeyboardInterrupt:
        stream.close()
        print("\n[interrupted]")


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
    add_sampling_args(parser)
    add_tensor_parallel_arg(parser)
    args = parser.parse_args(argv)
    tools = chat_tools(args) if args.tools or args.code_interpreter else None  # file errors first
    if wants_tensor_parallel(args):
        return lead_tensor_parallel(args, lambda llm: run(args, llm, tools))
    return run(args, load_llm(args), tools)


def run(args: argparse.Namespace, llm, tools: list | None = None) -> int:
    if tools is not None:
        return tool_chat(args, llm, tools)
    params = llm.default_params(**sampling_overrides(args))
    session = ChatSession(llm, params, system=args.system)
    if args.prompt is not None:
        question = sys.stdin.read() if args.prompt == "-" else args.prompt
        for piece in session.ask(question):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        return 0

    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()

        print("qwenkit chat: type a message, :help for commands, Ctrl-D to leave.")
    while True:
        try:
            line = input("\n>>> " if interactive else "")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n[Ctrl-D or :exit to leave]")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            try:
                if not run_command(session, params, line):
                    return 0
            except CommandError as e:
                print(f"error: {e}")
            continue
        answer(session, line)


def ask_tool_result(name: str, arguments: str) -> str:
    print(f"[tool call] {name}({arguments})")
    try:
        return input(f"[result of {name}] > ")
    except EOFError:
        return ""


def chat_tools(args: argparse.Namespace) -> list:
    """The tools of ``--tools FILE`` (calls shown, results typed) and ``--code-interpreter`` (runs)."""
    from qwenkit.tools.agent import Tool, load_tool_specs, typed_tools
    from qwenkit.tools.code_interpreter import FUNCTION, CodeInterpreter

    tools = typed_tools(load_tool_specs(args.tools), ask_tool_result) if args.tools else []
    if args.code_interpreter:
        interpreter = CodeInterpreter()

        def run_code(code: str) -> str:
            print(f"[code_interpreter]\n{code}")
            out = interpreter(code)
            print(f"[output]\n{out}")
            return out

        tools.append(Tool(FUNCTION["name"], run_code, FUNCTION["description"], FUNCTION["parameters"]))
    return tools


def tool_chat(args: argparse.Namespace, llm, tools: list) -> int:
    """Chat where the model may call tools: calls are printed; you type results (the code interpreter
    runs by itself). Each turn is one agent run over the whole history."""
    from qwenkit.tools.agent import Agent

    agent = Agent(llm, tools, params=llm.default_params(**sampling_overrides(args)))
    history = [{"role": "system", "content": args.system}] if args.system else []
    questions = [sys.stdin.read() if args.prompt == "-" else args.prompt] if args.prompt is not None else None
    while True:
        if questions is not None:
            if not questions:
                return 0
            line = questions.pop()
        else:
            try:
                line = input("\n>>> ").strip()
            except EOFError:
                print()
                return 0
            if not line:
                continue
        result = agent.run([*history, {"role": "user", "content": line}])
        history = result.messages
        print(result.answer if result.answer is not None else f"[stopped after {result.rounds} rounds]")
