"""``qwenkit <command>``: dispatches lazily to one module per command, so ``--help`` is instant.

Errors a user can cause (bad paths, bad values, models that do not fit, a file that cannot be read or
written) print one line and exit 2; Ctrl-C exits 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

from qwenkit.library_threads import quiet_library_threads

COMMANDS = {
    "generate": "continue a prompt (streams text, then a speed summary)",
    "chat": "interactive chat (or one answer with -p)",
    "info": "architecture, parameter count, memory needs and license of a model",
    "tokenize": "show token ids and pieces of a text",
    "template": "print the exact prompt a chat template builds",
    "embed": "print the embedding of each text (JSON lines or an OpenAI-shaped object)",
    "convert": "convert checkpoints: Qwen v1 -> Qwen1.5 layout, GGUF -> Hugging Face",
    "quantize": "quantize a model to int8/int4 (GPTQ or round-to-nearest)",
    "profile": "measure tokens/s and peak memory per precision",
    "serve": "OpenAI-compatible API server with a web chat page",
    "eval": "benchmarks (MMLU, C-Eval, GSM8K, HumanEval, tool use, passkey, ppl) on a model or an endpoint",
    "finetune": "supervised fine-tuning: LoRA, QLoRA or full (one or many processes)",
    "dpo": "preference tuning (DPO, IPO, SLiC, rDPO, SimPO, ORPO) of an adapter or a whole model",
    "merge": "fold a LoRA adapter into the model and write a plain checkpoint",
    "filter": "find and mask or drop sensitive data in training files",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: qwenkit <command> [options]   (qwenkit --version: the installed version)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run `qwenkit <command> --help` for a command's options."]
    return "\n".join(lines)


def _unknown(command: str) -> str:
    """One line for a command that is not one: the command meant, when it is a near miss, else them all."""
    import difflib

    close = difflib.get_close_matches(command, COMMANDS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"the commands: {', '.join(COMMANDS)}"
    return f"unknown command {command!r} ({hint})"


def _version() -> str:
    """The installed distribution's version (pyproject.toml's), without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwenkit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _closed_streams_to_devnull() -> None:
    """``qwenkit generate ... >&-``: Python starts with ``sys.stdout`` None where its descriptor is closed,
    and the first write was an AttributeError traceback. Output to a closed stream is discarded, as it is
    for a reader gone (a broken pipe); the descriptor is held on /dev/null, so that no file the command
    opens later takes its number (and a library's writes to it). A closed standard input reads as an
    empty one (``</dev/null``): the chat ends at once, ``-p -`` is an empty question (both were
    tracebacks)."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if getattr(sys, name) is not None:
            continue
        null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)  # the lowest free descriptor
        try:
            os.fstat(fd)  # open after all (a host that set it None): left as it is
        except OSError:
            os.dup2(null, fd)
        if null != fd:
            os.close(null)
        setattr(sys, name, open(os.devnull, mode, encoding="utf-8", errors="replace"))  # noqa: SIM115


def main(argv: list[str] | None = None) -> int:
    _closed_streams_to_devnull()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "-V", "--version"):
        text = f"qwenkit {_version()}" if argv and argv[0] in ("-V", "--version") else _usage()
        try:  # `qwenkit --help | head -1`: a reader gone before the text is no error of the user's
            print(text, flush=True)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: {_unknown(command)}; see `qwenkit --help`", file=sys.stderr)
        return 2
    try:  # the import takes torch's (most of a second): Ctrl-C in it is as quiet as later
        module = _import_without_gc(f"qwenkit.cli.{command}")
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return run_command(module.main, rest)


def _import_without_gc(name: str):
    """Import a command (and torch) with cyclic garbage collection off, then freeze what was imported.

    Importing torch creates ~300k objects that live as long as the process; each full collection on the
    way scans all of them (0.1-0.2 s of a start), and so would every later one (0.2 s while a model
    loads). Frozen objects are never scanned again; collection works as usual for everything after.
    """
    if "torch" in sys.modules or not gc.isenabled():  # a caller in Python that did its own imports
        return importlib.import_module(name)
    gc.disable()
    try:
        with quiet_library_threads():
            return importlib.import_module(name)
    finally:
        gc.freeze()
        gc.enable()


def run_command(entry, argv: list[str]) -> int:
    """Run a command's main(), turning user errors into one line on stderr."""
    from qwenkit.errors import QwenkitError

    try:
        return int(entry(argv) or 0)
    except QwenkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a path that cannot be read or written, a full disk: the user's to mend
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2


def os_error_line(e: OSError) -> str:
    """``Permission denied: /data/out`` rather than ``[Errno 13] Permission denied: '/data/out'``."""
    what = e.strerror or str(e)
    if e.filename is not None and e.filename2 is not None:
        return f"{what}: {e.filename} -> {e.filename2}"
    return f"{what}: {e.filename}" if e.filename is not None else what


if __name__ == "__main__":
    sys.exit(main())
