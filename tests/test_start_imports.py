"""What a start imports: `qwenkit chat -p` and `qwenkit generate` on the bundled GGUF model load no module
they never use (issue 13's start-up goal; each one costs milliseconds before the first token)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import qwenkit.quant

# Never used by a start on the bundled model: GPTQ, calibration and the GPTQ checkpoint writer (quant's
# side work), Qwen v1's tiktoken tokenizer, psutil (the free RAM is read from /proc/meminfo), the
# server's and the evaluators' libraries, gguf-py.
NEVER = (
    "qwenkit.quant.gptq",
    "qwenkit.quant.checkpoint_io",
    "qwenkit.quant.calibration",
    "tiktoken",
    "psutil",
    "qwenkit.server",
    "fastapi",
    "pydantic",
    "uvicorn",
    "gguf",
    "transformers",
    "llguidance",
)

RUN = (
    "import sys\n"
    "from qwenkit.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(code, sorted(m for m in sys.modules if m.split('.')[0] in {} or m in {}), file=sys.stderr)\n"
)


def start(argv: list[str], watched: tuple[str, ...]) -> tuple[str, str]:
    """(stdout, the exit code and the watched modules the run imported) of one `qwenkit` run."""
    tops = {m for m in watched if "." not in m}
    code = RUN.format(sorted(tops), sorted(set(watched) - tops))
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return out.stdout, out.stderr.strip().splitlines()[-1]


def test_chat_imports_no_side_work() -> None:
    out, imported = start(["chat", "-p", "What is the capital of France?", "--max-tokens", "2"], NEVER)
    assert out.strip(), "the answer's first tokens"
    assert imported == "0 []"


def test_generate_imports_no_chat_template_engine() -> None:
    """A plain continuation renders no chat template, so jinja2 (about 20 ms to import) stays out."""
    argv = ["generate", "-p", "The capital of France is", "--max-tokens", "2"]
    out, imported = start(argv, (*NEVER, "jinja2"))
    assert out.strip()
    assert imported == "0 []"


@pytest.mark.parametrize("name", qwenkit.quant.__all__)
def test_quant_package_names_are_the_modules_own(name: str) -> None:
    """`from qwenkit.quant import X` (imported on first use) is the very object its module defines."""
    module = importlib.import_module(f"qwenkit.quant.{qwenkit.quant._EXPORTS[name]}")
    assert getattr(qwenkit.quant, name) is getattr(module, name)


def test_quant_package_exports_every_name_it_lists() -> None:
    assert sorted(qwenkit.quant.__all__) == sorted(qwenkit.quant._EXPORTS)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = qwenkit.quant.nope
