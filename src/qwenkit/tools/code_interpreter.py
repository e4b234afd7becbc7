"""The built-in ``code_interpreter`` tool: model-written Python run in ``qwenkit.sandbox`` (a separate
process with time, memory, process and output limits, no network, its own scratch directory), and the
outcome reported back to the model as text: what it printed, and why it stopped if it did not finish.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwenkit.sandbox import run_python

if TYPE_CHECKING:
    from qwenkit.tools.agent import Tool

SCHEMA = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": "Python code to run; print what you need."}},
    "required": ["code"],
}
FUNCTION = {
    "name": "code_interpreter",
    "description": "Run Python code in a sandbox (no network, limited time and memory) and see its output.",
    "parameters": SCHEMA,
}


@dataclass
class CodeInterpreter:
    """Callable as a tool: ``interpreter(code=...)`` -> text for the model. Files persist between calls
    in one scratch directory (``workdir``), as in a notebook."""

    timeout: float = 10.0
    memory_mb: int = 512
    max_output: int = 8_000  # bytes kept: stdout's first, stderr's last (where the error is named)
    workdir: Path | None = None  # None: a scratch directory of its own

    def __post_init__(self) -> None:
        if self.workdir is None:  # removed with the interpreter (or at exit), not left behind in /tmp
            self.workdir = Path(tempfile.mkdtemp(prefix="qwenkit-ci-"))
            weakref.finalize(self, shutil.rmtree, self.workdir, ignore_errors=True)

    def __call__(self, code: str) -> str:
        result = run_python(
            code,
            timeout=self.timeout,
            memory_mb=self.memory_mb,
            max_output=self.max_output,
            workdir=self.workdir,
        )
        parts = []
        if result.stdout:
            parts.append(result.stdout.rstrip("\n"))
        if result.stderr:
            parts.append("stderr:\n" + result.stderr.rstrip("\n"))
        if result.output_truncated:
            parts.append(f"[output cut at {self.max_output} bytes]")
        if not result.ok:
            parts.append(f"[stopped: {result.reason}]")
        return "\n".join(parts) if parts else "[no output]"

    def tool(self) -> Tool:
        """This interpreter as an Agent's ``code_interpreter`` tool (the Agent takes Tools, not callables)."""
        from qwenkit.tools.agent import Tool  # the agent loads the model stack; the sandbox alone does not

        return Tool(FUNCTION["name"], self, FUNCTION["description"], FUNCTION["parameters"])

    @staticmethod
    def arguments(text: str) -> str:
        return json.dumps({"code": text}, ensure_ascii=False)
