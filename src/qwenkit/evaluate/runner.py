"""One evaluation run: items -> prompts -> backend -> per-sample rows -> aggregate -> results.

Rows are appended to ``samples.jsonl`` as each chunk finishes, so an interrupted run resumes where it
stopped (same settings required), and ``rescore`` recomputes results from the rows without the model.
``results.json`` (written atomically) holds the scores and the reproducibility record.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qwenkit.evaluate import ceval, mmlu, passkey, tooluse
from qwenkit.evaluate.backends import Backend
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.extract import CHOICE_EXTRACTORS, NUMBER_EXTRACTORS, strip_thinking
from qwenkit.evaluate.multiple_choice import MCItem, aggregate, rescore
from qwenkit.evaluate.plans import TASKS, Settings, item_id, number_fields, plan
from qwenkit.evaluate.results import (
    RESULTS,
    SAMPLES,
    SETTINGS,
    compare,
    environment,
    model_record,
    write_json_atomic,
)
from qwenkit.evaluate.stats import mean_stderr

__all__ = ["TASKS", "Settings", "compare", "model_record", "plan", "rescore_dir", "run"]

# ---- the run ---------------------------------------------------------------------------------------


def run(
    backend: Backend,
    settings: Settings,
    output: str | Path | None = None,
    progress: bool = True,
    model_record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate; with ``output``, write/extend samples.jsonl and write results.json there."""
    p = plan(settings, backend.max_context() if settings.task == "passkey" else None)
    out = Path(output) if output else None
    rows: list[dict] = []
    record = model_record or backend.describe()
    if out is not None:
        rows = _resume(out, settings, model_identity(record))
    done = {r["id"] for r in rows}
    todo = [i for i in p.items if item_id(i) not in done]
    chunk_size = max(settings.batch_size * 4, 16)
    started = time.perf_counter()
    bar = _progress(len(p.items), len(rows), settings.task, progress)
    correct = sum(bool(r.get("correct")) for r in rows)
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
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
        "scores": p.aggregate(rows),
        "record": {
            **environment(),
            **record,
            **p.record,
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
)


def model_identity(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in IDENTITY_KEYS if k in record}


def _resume(out: Path, settings: Settings, identity: dict[str, Any]) -> list[dict]:
    """The rows a run into ``out`` already holds, refusing one of other settings or another model (its
    samples would be mixed into these results under this model's name). A settings file without samples
    (a run refused or stopped before its first chunk) holds nothing to keep and is replaced."""
    out.mkdir(parents=True, exist_ok=True)
    settings_path, samples = out / SETTINGS, out / SAMPLES
    wanted = {**settings.key(), "model": identity}
    if settings_path.exists() and samples.exists() and samples.stat().st_size:
        # settings added since the run was written take their defaults; a run written before the model
        # was recorded is taken to be this model's
        defaults = {**Settings(task=settings.task).key(), "model": identity}
        saved = {**defaults, **json.loads(settings_path.read_text())}
        if saved != wanted:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            if changed == ["model"]:
                fields = sorted(
                    k for k in set(saved["model"]) | set(identity) if saved["model"].get(k) != identity.get(k)
                )
                raise EvalDataError(
                    f"{out} holds a run of another model ({', '.join(fields)} differ); use another --output"
                )
            raise EvalDataError(
                f"{out} holds a run with other settings ({', '.join(changed)}); use another --output"
            )
    else:
        write_json_atomic(settings_path, wanted)
    rows = []
    if samples.exists():
        lines = samples.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if n != len(lines) - 1:
                    raise EvalDataError(f"{samples} line {n + 1} is not JSON") from None
                # a line cut short by an interruption: drop it and its bytes
                samples.write_text("".join(x + "\n" for x in lines[:-1]), encoding="utf-8")
    return rows


def rescore_dir(out: str | Path, extractor: str | None = None) -> dict[str, Any]:
    """Recompute results.json from samples.jsonl (optionally with another extractor), without the model."""
    out = Path(out)
    if not (out / SAMPLES).exists() or not (out / RESULTS).exists():
        raise EvalDataError(f"{out} has no {SAMPLES} and {RESULTS} to rescore")
    results = json.loads((out / RESULTS).read_text())
    rows = [
        json.loads(line) for line in (out / SAMPLES).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    task = results["task"]
    if task in ("mmlu", "ceval"):
        name = extractor or results["record"].get("extractor")
        fn = CHOICE_EXTRACTORS.get(name) if name else None
        if name and fn is None:
            raise EvalDataError(f"unknown extractor {name!r}; choose from {', '.join(CHOICE_EXTRACTORS)}")
        items = {
            r["id"]: MCItem(r["id"], r["subject"], r["question"], tuple(r["choices"]), r["gold"])
            for r in rows
        }
        rescore(rows, fn, items)
        bench = mmlu if task == "mmlu" else ceval
        results["scores"] = aggregate(rows, bench.category_of, bench.HEADLINE)
        if name:
            results["record"]["extractor"] = name
    elif task == "gsm8k":
        name = extractor or results["record"]["extractor"]
        if name not in NUMBER_EXTRACTORS:
            raise EvalDataError(f"unknown extractor {name!r}; choose from {', '.join(NUMBER_EXTRACTORS)}")
        for row in rows:
            row |= number_fields(row["scored_text"], row["gold"], name)
        results["record"]["extractor"] = name
        results["scores"]["acc"] = mean_stderr([float(r["correct"]) for r in rows])[0]
        results["scores"]["stderr"] = mean_stderr([float(r["correct"]) for r in rows])[1]
        results["scores"]["extractor"] = name
    elif task == "tooluse":
        settings = results["record"]["settings"]
        by_id = {i.id: i for i in tooluse.read_bfcl(settings.get("subjects"), settings.get("data"))}
        for row in rows:
            if row["id"] not in by_id:
                raise EvalDataError(f"{out}: sample {row['id']} is not in the tool-use data")
            row |= tooluse.score_row(by_id[row["id"]], row["calls"])
        results["scores"] = tooluse.aggregate(rows)
    elif task == "passkey":
        for row in rows:
            row["extracted"] = passkey.extract(strip_thinking(row["output"])[0])
            row["correct"] = row["extracted"] == row["gold"]
        results["scores"] = passkey.aggregate(rows)
    else:
        raise EvalDataError(f"rescoring {task} needs its programs rerun; it is not supported")
    results["record"]["rescored"] = True
    tmp = out / (SAMPLES + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out / SAMPLES)
    write_json_atomic(out / RESULTS, results)
    return results


def _progress(total: int, done: int, task: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=task, unit="item", dynamic_ncols=True)
