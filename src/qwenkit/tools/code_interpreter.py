"""The built-in ``code_interpreter`` tool: model-written Python run in a persistent sandboxed kernel
(``qwenkit.sandbox_kernel``: time, memory, process and output limits, no network, its own scratch
directory), whose variables live on from call to call as in the Jupyter kernel behind Qwen-Agent's code
interpreter, the tool Qwen's models were trained with. The outcome goes back to the model in that tool's
words: a fenced block per kind of output (``stdout``, ``stderr``, ``execute_result``, ``error``), "Timeout:
Code execution exceeded the time limit." past the limit, "Finished execution." when there was nothing.
A matplotlib figure the code shows (or leaves open) is saved as a PNG file in the work directory and named
as Qwen-Agent names it, ``![fig-001](path)``, where the interpreter's Python has matplotlib.
"""

from __future__ import annotations

import json
import math
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qwenkit.errors import QwenkitError
from qwenkit.sandbox_kernel import TIMEOUT_MESSAGE, CellResult, PythonKernel

if TYPE_CHECKING:
    from qwenkit.tools.agent import Tool

# Qwen-Agent's spec, word for word and key for key: the tools block of the prompt is the one Qwen's
# models saw beside this tool in training.
SCHEMA = {
    "type": "object",
    "properties": {"code": {"description": "The python code.", "type": "string"}},
    "required": ["code"],
}
FUNCTION = {
    "name": "code_interpreter",
    "description": "Python code sandbox, which can be used to execute Python code.",
    "parameters": SCHEMA,
}


class InterpreterError(QwenkitError, ValueError):
    """A code interpreter setting, or code to run, that is unusable."""


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class CodeInterpreter:
    """Callable as a tool: ``interpreter(code=...)`` -> text for the model. Variables and files persist
    between calls (files in ``workdir``, a scratch directory of its own when none is given, removed with
    the interpreter), as in a notebook."""

    timeout: float = 10.0  # seconds per call
    memory_mb: int = 512
    max_output: int = 8_000  # bytes kept: stdout's first, stderr's last (where the error is named)
    workdir: Path | None = None
    python: str | None = None  # the sandbox's interpreter (None: this one, or the system's if out of reach)
    kernel: PythonKernel = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # each failed later, deep in the kernel (a str in its arithmetic, in prlimit's exec, in a read), or
        # came back to the model as the sandbox's own failure
        timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise InterpreterError(f"timeout must be a number of seconds > 0, got {timeout!r:.60}")
        for name in ("memory_mb", "max_output"):
            if not _positive_int(getattr(self, name)):
                raise InterpreterError(f"{name} must be an integer >= 1, got {getattr(self, name)!r:.60}")
        if self.workdir is not None and not isinstance(self.workdir, str | os.PathLike):
            raise InterpreterError(f"workdir must be a path or None, got {self.workdir!r:.60}")
        if self.python is not None and not isinstance(self.python, str | os.PathLike):
            raise InterpreterError(
                f"python must be a path to an interpreter or None, got {self.python!r:.60}"
            )
        self.kernel = PythonKernel(memory_mb=self.memory_mb, workdir=self.workdir, python=self.python)
        self.workdir = self.kernel.workdir
        weakref.finalize(self, self.kernel.close)  # the process and a scratch directory go with it

    def __call__(self, code: str) -> str:
        if not isinstance(code, str):  # None ran, and came back as a traceback of the kernel's own code
            raise InterpreterError(f"code must be a string, got {code!r:.60}")
        return report(
            self.kernel.run(code, timeout=self.timeout, max_output=self.max_output), self.max_output
        )

    def close(self) -> None:
        self.kernel.close()

    def tool(self) -> Tool:
        """This interpreter as an Agent's ``code_interpreter`` tool (the Agent takes Tools, not callables)."""
        from qwenkit.tools.agent import Tool  # the agent loads the model stack; the sandbox alone does not

        return Tool(FUNCTION["name"], self, FUNCTION["description"], FUNCTION["parameters"], code_arguments)

    @staticmethod
    def arguments(text: str) -> str:
        return json.dumps({"code": text}, ensure_ascii=False)


FENCED = re.compile(r"```[^\n]*\n(.+?)```", re.DOTALL)
# ANSI (ECMA-48) escape sequences: CSI (colours, cursor moves; 8-bit CSI too), OSC (a title or a link, up
# to BEL, ST or the line's end), a charset choice (ESC ( B), any other ESC and the character after it.
# Qwen-Agent takes them out of the error it sends the model (IPython colours tracebacks), and leaves the
# cell's streams as they are.
ANSI = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)?|\x1b[ -/]+[0-~]|\x1b[0-~]"
)


def code_arguments(text: str) -> dict[str, str]:
    """Arguments that are not a JSON object, read as Qwen-Agent's code interpreter reads them: the first
    fenced block's body, else the whole text as code. Qwen v1 writes its ReAct ``Action Input`` for this
    tool as a fenced block, the form it was trained on."""
    fenced = FENCED.search(text)
    return {"code": fenced.group(1) if fenced else text}


def _block(kind: str, body: str) -> str:
    return f"{kind}:\n\n```\n{body}\n```"


def _places(cell: CellResult) -> list[int | None]:
    """Each figure's place in stdout (None: at the end), for a result that may not say."""
    return cell.figures_at if len(cell.figures_at) == len(cell.figures) else [None] * len(cell.figures)


def report(cell: CellResult, max_output: int) -> str:
    """A cell's outcome as Qwen-Agent's code interpreter words it, plus what it cannot know: a cut, a kernel
    that stopped, variables lost to a restart."""
    pieces: list[str] = []  # in the order Qwen-Agent's Jupyter messages come: a figure show() drew
    done = 0  # between two prints comes between their outputs; those left open come after everything
    shown = [
        (f"![fig-{i:03d}]({path})", at)
        for i, (path, at) in enumerate(zip(cell.figures, _places(cell), strict=True), 1)
    ]
    for figure, at in shown:
        if at is not None:
            pieces += [_block("stdout", cell.stdout[done:at])] if cell.stdout[done:at] else []
            pieces.append(figure)
            done = max(done, at)
    blocks = [("stdout", cell.stdout[done:]), ("stderr", cell.stderr)]
    if cell.result is not None:
        blocks.append(("execute_result", cell.result))
    if cell.error is not None:
        blocks.append(("error", ANSI.sub("", cell.error) + "\n"))  # IPython's line ends in a newline
    if cell.timed_out:
        blocks.append(("error", TIMEOUT_MESSAGE))
    pieces += [_block(kind, body) for kind, body in blocks if body]
    pieces += [figure for figure, at in shown if at is None]
    text = "\n\n".join(pieces)
    notes = []
    if cell.unsaved_figures:
        notes.append(f"[{cell.unsaved_figures} more figures not saved: at most {len(cell.figures)} a call]")
    if cell.output_truncated:
        notes.append(f"[output cut at {max_output} bytes]")
    if cell.stopped is not None and not cell.timed_out:
        notes.append(f"[stopped: {cell.stopped}; its variables are gone]")
    elif cell.stopped is not None:
        notes.append("[the interpreter was restarted: its variables are gone]")
    if cell.restarted:
        notes.insert(0, "[a new interpreter: variables from earlier calls are gone]")
    return "\n\n".join(x for x in [text, *notes] if x) or "Finished execution."
