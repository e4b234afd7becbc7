"""The comparison table across runs (the model card's quantization table).

One row per run given (labelled by its directory), one column per task: the score with its standard
error and its difference from the first run of that task, marked ``*`` where it exceeds the combined
standard error. A difference is judged only between like runs: where the settings a task reads or the
number of items differ, the cell says ``!`` and a note below names what differs.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qwenkit.checkpoint.gguf_split import model_stem
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.plans import TASKS, Settings, used_settings
from qwenkit.evaluate.results import RESULTS, SAMPLES, known_stderr


@dataclass(frozen=True)
class _Run:
    label: str  # which directory: what tells the rows apart
    model: str  # what it measured
    task: str
    scores: dict[str, Any]
    measured: dict[str, Any]  # the settings the task reads, and n: runs compare only where these agree


def compare(paths: Sequence[str | Path]) -> str:
    """The table for the runs (directories or their results.json), in the order given."""
    runs = _load(paths)
    tasks = list(dict.fromkeys(r.task for r in runs))
    first = {t: next(r for r in runs if r.task == t) for t in tasks}
    notes: list[str] = []
    table = [["run", "model", *tasks]]
    for run in runs:
        cells = [_cell(run, first[t], notes) if run.task == t else "-" for t in tasks]
        table.append([run.label, run.model, *cells])
    lines = _aligned(table)
    lines.append(
        "accuracy %, ± standard error; (difference from the first run of the task, "
        "* beyond the combined stderr)"
    )
    if "ppl" in tasks:
        lines.append("ppl: perplexity per token (lower is better; no standard error)")
    unscored = [r for r in runs if r.scores.get("unanswered")]
    if unscored:
        lines.append("unscored: questions without an answer in the data (C-Eval's test split is graded by")
        lines.append("  submission): predictions only, counted neither right nor wrong")
        lines += [f"  {r.label} ({r.task}): {r.scores['unanswered']} unscored" for r in unscored]
    if notes:
        lines.append("! not like the first run of the task, so no difference is marked:")
        lines += [f"  {note}" for note in notes]
    return "\n".join(lines)


def _load(paths: Sequence[str | Path]) -> list[_Run]:
    files = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise EvalDataError(f"{p} does not exist")
        if p.is_dir() and not (p / RESULTS).exists():
            if (p / SAMPLES).exists():  # stopped (Ctrl-C, a kill) or still running
                raise EvalDataError(
                    f"{p} holds an unfinished run (samples, no {RESULTS} yet): rerun its command to "
                    "finish it, or give finished runs"
                )
            raise EvalDataError(f"{p} has no {RESULTS}: not a qwenkit eval --output directory")
        p = p / RESULTS if p.is_dir() else p
        if not p.is_file():
            raise EvalDataError(f"{p} is not a results file")
        files.append(p)
    runs = []
    for label, p in zip(_labels(paths, files), files, strict=True):
        try:
            results = json.loads(p.read_text(encoding="utf-8"))
            task, scores, record = results["task"], results["scores"], results["record"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            task = scores = record = None
        if (
            task not in TASKS
            or not isinstance(scores, dict)
            or not isinstance(record, dict)
            or not isinstance(record.get("settings", {}), dict)
        ):
            raise EvalDataError(f"{p} is not a qwenkit eval results file")
        runs.append(_Run(label, _model_label(record), task, scores, _measured(task, scores, record)))
    return runs


def _labels(given: Sequence[str | Path], files: list[Path]) -> list[str]:
    """Each run's directory name; where two share one, the paths as given; where those are the same
    too, numbered."""
    labels = [p.resolve().parent.name for p in files]
    repeated = Counter(labels)
    labels = [str(g) if repeated[label] > 1 else label for g, label in zip(given, labels, strict=True)]
    seen: Counter[str] = Counter()
    numbered = []
    for label in labels:
        seen[label] += 1
        numbered.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return numbered


def _model_label(record: dict[str, Any]) -> str:
    """``Qwen2.5-0.5B int4``, or ``qwen2.5 @ 127.0.0.1:8000`` for an endpoint."""
    if record.get("url"):
        where = urlsplit(record["url"]).netloc or record["url"]
        return f"{record['model']} @ {where}" if record.get("model") else where
    path = Path(record.get("model_path") or "?")
    # not .stem for a directory ("Qwen2.5-0.5B"); a split GGUF's model name, without "-00001-of-00003"
    name = model_stem(path) if path.suffix == ".gguf" else path.name
    precision = record.get("quantization") or record.get("dtype") or ""
    adapter = f" + {Path(record['adapter_path']).name}" if record.get("adapter_path") else ""
    return f"{name} {precision}".strip() + adapter


def _measured(task: str, scores: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    settings = Settings.from_saved({"task": task, **record.get("settings", {})})
    measured = {k: getattr(settings, k) for k in used_settings(settings)}
    if record.get("items_sha256"):  # the same --data path edited between runs: other questions
        measured["items"] = record["items_sha256"][:12]
    return measured | {"n": scores.get("n", scores.get("tokens_scored"))}


def _cell(run: _Run, base: _Run, notes: list[str]) -> str:
    value, error = _value(run.scores)
    if value is None:
        return "unscored" if run.scores.get("unanswered") else "-"
    digits = 3 if run.task == "ppl" else 2
    shown = (
        f"{value:.{digits}f}"
        if run.task == "ppl"
        else f"{value:.2f}±" + (f"{error:.2f}" if error is not None else "n/a")
    )
    base_value, base_error = _value(base.scores)
    if run is base or base_value is None:
        return shown
    diff = f"{value - base_value:+.{digits}f}"
    unlike = [
        k
        for k in run.measured | base.measured
        if run.measured.get(k) != base.measured.get(k)
        and (k != "items" or (k in run.measured and k in base.measured))  # not recorded before: not known
    ]
    if unlike:
        what = ", ".join(f"{k} {_show(run.measured.get(k))} vs {_show(base.measured.get(k))}" for k in unlike)
        notes.append(f"{run.label} ({run.task}) differs from {base.label}: {what}")
        return f"{shown} ({diff}!)"
    beyond = (
        error is not None
        and base_error is not None
        and abs(value - base_value) > math.hypot(error, base_error)
    )
    return f"{shown} ({diff}{'*' if beyond else ''})"  # a standard error not known: no verdict


def _value(scores: dict[str, Any]) -> tuple[float | None, float | None]:
    """The score shown (accuracy in %, or perplexity per token) and its standard error in the same unit,
    None where not known."""
    if scores.get("acc") is not None:
        stderr = known_stderr(scores.get("stderr"))
        return 100 * scores["acc"], None if stderr is None else 100 * stderr
    return scores.get("token_perplexity"), None


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    return [
        "  ".join(
            cell.ljust(width) if c < 2 else cell.rjust(width)
            for c, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    ]
