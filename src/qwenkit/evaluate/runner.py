"""One evaluation run: items -> prompts -> backend -> per-sample rows -> aggregate -> results.

Rows are appended to ``samples.jsonl`` as each chunk finishes, so an interrupted run resumes where it
stopped (same settings required), and ``rescore`` recomputes results from the rows without the model.
``results.json`` (written atomically) holds the scores and the reproducibility record. A run or rescore
holds its directory's lock (:mod:`qwenkit.evaluate.lock`) while it writes there.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from qwenkit.checkpoint.output_dir import atomic_file
from qwenkit.evaluate.backends import Backend
from qwenkit.evaluate.compare import compare
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.lock import output_lock
from qwenkit.evaluate.plans import (
    TASKS,
    Plan,
    Scoring,
    Settings,
    check_settings,
    chunk_size,
    default_max_new_tokens,
    item_id,
    needs_model,
    plan,
    scoring,
    used_settings,
    without_unused,
)
from qwenkit.evaluate.results import (
    RESULTS,
    SAMPLES,
    SETTINGS,
    environment,
    model_record,
    write_json_atomic,
)

__all__ = [
    "TASKS",
    "Settings",
    "check_settings",
    "compare",
    "default_max_new_tokens",
    "model_record",
    "needs_model",
    "plan",
    "read_samples",
    "rescore_dir",
    "run",
]

# ---- the run ---------------------------------------------------------------------------------------


def run(
    backend: Backend,
    settings: Settings,
    output: str | Path | None = None,
    progress: bool = True,
    model_record: dict[str, Any] | None = None,
    prepared: Plan | None = None,
    agree_done: Callable[[set[str]], set[str]] | None = None,
) -> dict[str, Any]:
    """Evaluate; with ``output``, write/extend samples.jsonl and write results.json there (holding the
    directory's lock throughout). ``prepared``: ``plan(settings)`` made before the model was loaded.
    ``agree_done(ids)``: the ids of the items already scored as the run's writer found them (under tensor
    parallelism rank 0 alone reads the output, and every rank must score the same items left)."""
    p = prepared or plan(settings, backend.max_context() if needs_model(settings) else None)
    record = model_record or backend.describe()
    if output is None:
        return _run(backend, settings, p, record, None, progress, agree_done)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        return _run(backend, settings, p, record, out, progress, agree_done)


def _run(
    backend: Backend,
    settings: Settings,
    p: Plan,
    record: dict[str, Any],
    out: Path | None,
    progress: bool,
    agree_done: Callable[[set[str]], set[str]] | None = None,
) -> dict[str, Any]:
    items_sha256 = p.items_sha256()
    made_by = {"items_sha256": items_sha256, "prompt_template_sha256": p.record.get("prompt_template_sha256")}
    rows = []
    if out is not None:

        def plan_at(limit: int | None) -> Plan:
            context = backend.max_context() if needs_model(settings) else None
            return plan(replace(settings, limit=limit), context)

        rows = _resume(out, settings, model_identity(record), made_by, plan_at)
        rows = _judged_again(out, rows, p.scoring)
    done = {r["id"] for r in rows}
    if agree_done is not None:
        done = agree_done(done)
    todo = [i for i in p.items if item_id(i) not in done]
    size = chunk_size(settings)
    started = time.perf_counter()
    # ppl is one item: its bar counts the windows scored instead, at the same cadence (chunk_size)
    bar = None if p.reports_within else _progress(len(p.items), len(rows), settings.task, progress)
    correct = sum(bool(r.get("correct")) for r in rows)
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        if p.reports_within:
            new = p.run_chunk(backend, chunk, _window_bar(settings.task, progress))
        else:
            new = p.run_chunk(backend, chunk)
        rows += new
        if out is not None:
            with open(out / SAMPLES, "a", encoding="utf-8") as f:
                for row in new:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        correct += sum(bool(r.get("correct")) for r in new)
        if bar is not None:
            bar.update(len(new))
            bar.set_postfix(acc=f"{correct / len(rows):.3f}")
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started
    order = {item_id(i): n for n, i in enumerate(p.items)}
    rows = sorted((r for r in rows if r["id"] in order), key=lambda r: order[r["id"]])
    results = {
        "task": settings.task,
        "scores": p.scoring.aggregate(rows),
        "record": {
            **environment(),
            **record,
            **p.record,
            "items_sha256": items_sha256,
            "settings": asdict(settings),
            "batch_size": settings.batch_size,
        },
        "timing": {
            "seconds": elapsed,
            "items_run": len(todo),
            "items_per_second": len(todo) / elapsed if elapsed else None,
        },
    }
    if out is not None:
        write_json_atomic(out / RESULTS, results)
    return results


# What names the model a run's samples came from: its files' hash and how it was loaded, or the endpoint.
IDENTITY_KEYS = (
    "model_files_sha256",
    "dtype",
    "quantization",
    "adapter",
    "chat_template_sha256",
    "url",
    "model",
    "system_fingerprint",
)


def model_identity(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in IDENTITY_KEYS if k in record}


def _resume(
    out: Path,
    settings: Settings,
    identity: dict[str, Any],
    made_by: dict[str, Any],
    plan_at: Callable[[int | None], Plan],
) -> list[dict]:
    """The rows a run into ``out`` already holds, refusing one of other settings, other data (an edited
    --data file), another prompt template or another model: its samples would be mixed into these results
    as if these had made them. A settings file without samples (a run refused or stopped before its first
    chunk) holds nothing to keep and is replaced.

    A larger --limit alone resumes, once the saved run's items (``plan_at`` its limit) are found
    unchanged: --limit takes the first items (per subject), so it adds items to the run. The settings file
    then says the larger limit and the smaller run's results.json goes: it no longer describes the
    directory's samples (``rescore_dir`` would score the new rows under the old settings). A smaller
    --limit is refused, as its results would leave rows out that the directory holds."""
    out.mkdir(parents=True, exist_ok=True)
    settings_path, samples = out / SETTINGS, out / SAMPLES
    wanted = {**settings.key(), "model": identity, **made_by}
    if settings_path.exists() and samples.exists() and samples.stat().st_size:
        # only what the task reads: a letter-scoring run given --max-new-tokens scored what one without did
        read = {*used_settings(settings), "model", *made_by}
        asked = {k: v for k, v in wanted.items() if k in read}
        # settings added since the run was written take their defaults; a run written before the model,
        # its items or its prompt were recorded is taken to be of these (at its own --limit)
        file = {**Settings(task=settings.task).key(), **_read_object(settings_path, "run's settings")}
        compared = _at_limit(asked, file.get("limit"), plan_at) if "limit" in read else asked
        saved = {**compared, **{k: v for k, v in file.items() if k in read}}
        if saved != compared:
            _refuse_resume(out, settings, saved, compared)
        if saved != asked:  # a larger --limit: the run grows
            write_json_atomic(settings_path, wanted)
            (out / RESULTS).unlink(missing_ok=True)
    else:
        write_json_atomic(settings_path, wanted)
    return read_samples(samples) if samples.exists() else []


def _at_limit(
    asked: dict[str, Any], limit: int | None, plan_at: Callable[[int | None], Plan]
) -> dict[str, Any]:
    """``asked`` as the saved run's --limit ``limit`` takes it, where this --limit takes more: --limit takes
    the first items (per subject), so the run grows if its items at ``limit`` are found unchanged."""
    if asked["limit"] == limit or not _covers(asked["limit"], limit):
        return asked
    return {**asked, "limit": limit, "items_sha256": plan_at(limit).items_sha256()}


def _covers(limit: int | None, other: int | None) -> bool:
    """Whether --limit ``limit`` takes every item --limit ``other`` takes (None: all items)."""
    return limit is None or (other is not None and limit > other)


def _judged_again(out: Path, rows: list[dict], scoring: Scoring) -> list[dict]:
    """The saved rows judged by this run's scoring, as its results will say: a ``--rescore`` with another
    extractor left them judged by that one. The samples file is rewritten where a verdict changed."""
    if scoring.rejudge is None or not rows:
        return rows
    judged = []
    for row in rows:
        try:
            judged.append(row | scoring.rejudge(row))
        except KeyError as e:  # a row edited, or written by another task
            raise EvalDataError(
                f"{out / SAMPLES}: sample {row['id']!r} lacks {e.args[0]!r}, which this run's scoring reads"
            ) from None
    if judged != rows:
        _write_samples(out / SAMPLES, judged)
    return judged


def _refuse_resume(out: Path, settings: Settings, saved: dict[str, Any], asked: dict[str, Any]) -> None:
    """Say what differs between the run in ``out`` and this one, and how to go on. The items and prompt
    follow from the settings (--limit, --subjects) and for passkey from the model: they are named only where
    nothing else differs."""
    changed = sorted(k for k in set(saved) | set(asked) if saved.get(k) != asked.get(k))
    start_over = f"use another --output, or delete {out} to start over"
    options = [k for k in changed if k not in ("items_sha256", "prompt_template_sha256")]
    if options == ["model"]:
        model, identity = saved["model"], asked["model"]
        fields = sorted(k for k in set(model) | set(identity) if model.get(k) != identity.get(k))
        verb = "differs" if len(fields) == 1 else "differ"
        raise EvalDataError(f"{out} holds a run of another model ({', '.join(fields)} {verb}); {start_over}")
    if options:
        raise EvalDataError(f"{out} holds a run with other settings ({', '.join(options)}); {start_over}")
    if "items_sha256" in changed:
        source = f"--data {settings.data}" if settings.data else "the bundled data"
        raise EvalDataError(
            f"{out} holds a run of other items: {source} changed since it was written (the questions, "
            f"answers or few-shot examples differ); {start_over}"
        )
    raise EvalDataError(
        f"{out} holds a run made with another prompt template (another qwenkit version); {start_over}"
    )


def read_samples(samples: Path) -> list[dict]:
    """The rows of a samples.jsonl, one per item. A last line cut short by an interruption is dropped,
    and a row written twice (identically: two runs appended the same item) is kept once, and the file
    rewritten without them; two different rows for one item are refused, as the scores would count both
    or pick one at random."""
    # at "\n" only: rows are written with ensure_ascii=False, so a U+2028 or U+0085 of a model's output
    # stands raw inside a row, where str.splitlines would cut it. Split as bytes: a last row cut short
    # may end inside a character, which only that line's decoding meets.
    data = samples.read_bytes()
    raw = data.split(b"\n")
    if raw[-1] == b"":
        raw.pop()  # the last row's newline
    lines = []
    for n, line in enumerate(raw, 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            if n != len(raw):
                raise EvalDataError(f"{samples} line {n} is not UTF-8 text") from None
            lines.append("")  # a line cut short inside a character: dropped below, as a cut JSON line is
    rows: dict[str, dict] = {}
    first: dict[str, tuple[int, str]] = {}  # id -> (line number, text) where it was first written
    dropped = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            dropped += 1
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n != len(lines):
                raise EvalDataError(f"{samples} line {n} is not JSON") from None
            dropped += 1  # a line cut short by an interruption
            continue
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise EvalDataError(f"{samples} line {n} is not a sample of qwenkit eval (no item id)")
        item = row["id"]
        if item in rows:
            if line.strip() != first[item][1]:  # as text: a NaN never equals itself
                raise EvalDataError(
                    f"{samples} has two different rows for {item!r} (lines {first[item][0]} and {n}): "
                    "keep one of them, or start again in another --output"
                )
            dropped += 1
            continue
        rows[item], first[item] = row, (n, line.strip())
    # a kill can cut the file just before a whole row's newline: rewritten, so appended rows start a line
    if dropped or (data and not data.endswith(b"\n")):
        _write_samples(samples, list(rows.values()))
    return list(rows.values())


def _read_object(path: Path, what: str) -> dict[str, Any]:
    """A run directory's JSON file, which must hold an object: one damaged (by hand, a full disk) is a
    one-line error naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        raise EvalDataError(f"{path} is damaged: not a JSON object ({what})")
    return value


def _write_samples(samples: Path, rows: list[dict]) -> None:
    with atomic_file(samples) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def rescore_dir(out: str | Path, extractor: str | None = None) -> dict[str, Any]:
    """Recompute results.json from samples.jsonl (optionally with another extractor), without the model:
    every verdict and score by the code a run uses (``plans.scoring``)."""
    out = Path(out)
    if (out / SAMPLES).exists() and not (out / RESULTS).exists():  # stopped (Ctrl-C, a kill) or running
        raise EvalDataError(
            f"{out} holds an unfinished run (samples, no {RESULTS} yet): rerun its command to finish it, "
            "then rescore it"
        )
    if not (out / SAMPLES).exists() or not (out / RESULTS).exists():
        raise EvalDataError(f"{out} has no {SAMPLES} and {RESULTS} to rescore")
    with output_lock(out):
        results = _read_object(out / RESULTS, "run's results")
        record = results.get("record")
        if results.get("task") not in TASKS or not isinstance(record, dict):
            raise EvalDataError(
                f"{out / RESULTS} is not the results of a qwenkit eval run (no task or record)"
            )
        saved = Settings.from_saved({"task": results["task"], **(record.get("settings") or {})})
        settings = without_unused(saved)
        if extractor:
            settings = replace(settings, extractor=extractor)
        how = scoring(settings)
        if how.rejudge is None:
            raise EvalDataError(f"--rescore cannot score {settings.task} again: {how.cannot_rejudge}")
        rows = read_samples(out / SAMPLES)
        for row in rows:
            try:
                row |= how.rejudge(row)
            except KeyError as e:  # a row edited, or written by another task
                raise EvalDataError(
                    f"{out / SAMPLES}: sample {row['id']!r} lacks {e.args[0]!r}, which {settings.task} "
                    "scoring reads"
                ) from None
        results["scores"] = how.aggregate(rows)
        results["record"] |= {**how.record, "settings": asdict(settings), "rescored": True}
        _write_samples(out / SAMPLES, rows)
        write_json_atomic(out / RESULTS, results)
    return results


def _window_bar(task: str, enabled: bool) -> Callable[[int, int], None] | None:
    """A ``report(done, total)`` drawing a bar of windows (ppl), made at the first report (the windows are
    counted once the text is tokenized), closed at the last."""
    if not enabled:
        return None
    bars: list[Any] = []

    def report(done: int, total: int) -> None:
        if not bars:
            bars.append(_progress(total, 0, task, True, unit="window"))
        bars[0].update(done - bars[0].n)
        if done == total:
            bars[0].close()

    return report


def _progress(total: int, done: int, task: str, enabled: bool, unit: str = "item"):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=task, unit=unit, dynamic_ncols=True)
