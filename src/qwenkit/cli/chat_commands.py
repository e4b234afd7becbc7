"""The chat's ``:commands`` (``:help``, ``:history``, ``:seed``, ``:conf``, ...), carried out on the session:
``:conf``'s ``key=value`` settings read into SamplingParams and shown back as ``:conf`` takes them. Apart
from the chat loop (``qwenkit.cli.chat``), which reads the lines and streams the answers."""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from qwenkit.cli.common import SAMPLING_FLAG_KEYS
from qwenkit.cli.terminal import for_terminal
from qwenkit.engine import SamplingParams, SamplingParamsError

if TYPE_CHECKING:
    from qwenkit.chat import ChatSession
    from qwenkit.cli.chat import ToolChatSession

HELP = """commands:
  :help                 this help
  :clear                clear the screen
  :clear-history        forget the conversation so far
  :history              show the conversation so far
  :seed [N]             show or set the sampling seed
  :conf key=value ...   change sampling settings (e.g. :conf temperature=0.5 top_k=20); :conf alone shows them
  :reset-conf           back to the settings the chat started with
  :system TEXT          set the system prompt (empty to remove; \"\"\" for several lines), clear the history
  :exit                 leave (also Ctrl-D)
  ::TEXT                send :TEXT as a message (e.g. ::) thanks)
  \"\"\"                   begin a message of several lines; a line that ends with \"\"\" sends it
Ctrl-C stops the current answer."""

# The sampling settings a chat user sets with :conf (Qwen's cli_demo shows its generation config, the
# sampling knobs); SamplingParams' other fields are the front ends' own (grammar, adapter, logprobs, ...).
CONF_KEYS = (*SAMPLING_FLAG_KEYS, "stop", "include_stop_str_in_output", "logit_bias")
INTERNAL_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name not in CONF_KEYS)


class CommandError(ValueError):
    """A chat command could not be carried out; the chat goes on."""


CLOSERS = {"[": "]", "(": ")", "{": "}"}


def split_assignments(text: str) -> list[str]:
    """``key=value`` items split on spaces outside quotes and brackets, which are kept: ``stop='a b'``,
    ``stop=['a', 'b c']`` and ``logit_bias={9707: 5.0, 1879: -100}`` are one item each (brackets nest)."""
    items: list[str] = []
    item: list[str] = []
    closers: list[str] = []  # the brackets open here, innermost last
    quote = ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in CLOSERS:
            closers.append(CLOSERS[char])
        elif closers and char == closers[-1]:
            closers.pop()
        elif char.isspace() and not closers:
            if item:
                items.append("".join(item))
                item = []
            continue
        item.append(char)
    if quote or closers:
        raise CommandError(f"a quote or bracket is not closed in {text!r}")
    return [*items, "".join(item)] if item else items


def conf_key(item: str) -> str:
    """The setting a ``key=value`` item names (``top-k`` is ``top_k``)."""
    return item.partition("=")[0].strip().replace("-", "_")


def parse_conf(params: SamplingParams, assignments: list[str]) -> SamplingParams:
    """Apply ``key=value`` pairs. Values are Python literals (never evaluated as code)."""
    changes: dict[str, object] = {}
    for item in assignments:
        key, (_, sep, raw) = conf_key(item), item.partition("=")
        if not sep:
            raise CommandError(f"expected key=value, got {item!r}")
        if key in INTERNAL_KEYS:
            raise CommandError(
                f":conf cannot set {key}: it is not a chat setting; known: {', '.join(CONF_KEYS)}"
            )
        if key not in CONF_KEYS:
            raise CommandError(f"unknown :conf key {key!r}; known: {', '.join(CONF_KEYS)}")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            raise CommandError(
                f"value for {key} must be a literal such as 0.7, 20, None or 'text'; got {raw!r}"
            ) from None
        changes[key] = () if key == "stop" and value is None else value
    try:
        return dataclasses.replace(params, **changes)
    except (SamplingParamsError, TypeError) as e:
        raise CommandError(str(e)) from None


def conf_values(params: SamplingParams) -> dict[str, object]:
    """The settings :conf takes, each as it is typed to :conf: stop a list and logit_bias a dict, not
    the tuples the engine keeps."""
    values = {key: getattr(params, key) for key in CONF_KEYS}
    return values | {"stop": list(params.stop), "logit_bias": dict(params.logit_bias)}


def conf_lines(params: SamplingParams, keys: Iterable[str] = CONF_KEYS) -> str:
    """``keys``' settings, one ``key=value`` a line, as :conf takes them back."""
    values = conf_values(params)
    return "\n".join(f"{key}={values[key]!r}" for key in keys)


def run_command(session: ChatSession | ToolChatSession, initial: SamplingParams, line: str) -> bool:
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
            calls = [
                f"[calls {f['name']}({json.dumps(f['arguments'], ensure_ascii=False)})]"
                for f in (c["function"] for c in m.get("tool_calls") or ())
            ]
            print(for_terminal(f"{m['role']}: " + " ".join(filter(None, [m.get("content"), *calls]))))
    elif name == "seed" and not arg:
        print(f"[seed = {session.params.seed}]")
    elif name == "seed":
        try:
            seed = int(arg)
        except ValueError:
            raise CommandError(f":seed needs an integer, got {arg!r}") from None
        try:  # the range is the engine's to say: a huge integer is still an integer
            session.params = dataclasses.replace(session.params, seed=seed)
        except SamplingParamsError as e:
            raise CommandError(str(e)) from None
        print(f"[seed = {session.params.seed}]")
    elif name == "conf":
        items = split_assignments(arg)
        session.params = parse_conf(session.params, items)
        # alone: every setting; after a change, the ones set (as Qwen's cli_demo, not the whole list)
        set_keys = dict.fromkeys(conf_key(item) for item in items)
        print(conf_lines(session.params, set_keys or CONF_KEYS))
    elif name == "reset-conf":
        session.params = initial
        print("[settings reset]")
    elif name == "system":
        session.system = arg or None
        session.history.clear()
        print(f"[system prompt {'set' if arg else 'removed'}; history cleared]")
    else:
        raise CommandError(f"unknown command :{name}; type :help, or :{line} to send it as a message")
    return True
