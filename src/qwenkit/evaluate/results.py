"""Results records: the atomic JSON writer, the reproducibility record of a model and of the
environment, and the comparison table across runs (the model card's quantization table)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwenkit.evaluate.data import EvalDataError

SAMPLES, RESULTS, SETTINGS = "samples.jsonl", "results.json", "settings.json"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Strict JSON (NaN written as null), replaced in one step so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def environment() -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        qwenkit_version = version("qwenkit")
    except PackageNotFoundError:
        qwenkit_version = "unknown"
    return {
        "qwenkit_version": qwenkit_version,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def model_record(path: str | Path, llm: Any, dtype: str, quantize: str | None) -> dict[str, Any]:
    """Model identity for the results: a content hash of the weight and config files, dtype, quantization,
    chat template hash."""
    p = Path(path)
    files = (
        [p]
        if p.is_file()
        else sorted(
            f
            for f in p.iterdir()
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".gguf", ".tiktoken", ".model")
        )
    )
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    template = getattr(llm.tokenizer, "chat_template", None)
    return {
        "backend": "local",
        "model_path": str(p),
        "model_files_sha256": digest.hexdigest(),
        "dtype": str(next(llm.model.parameters()).dtype).replace("torch.", ""),
        "dtype_requested": dtype,
        "quantization": quantize,
        "adapter": None,
        "chat_template_sha256": sha256_text(template) if template else None,
    }


def compare(paths: Sequence[str | Path]) -> str:
    """The model card's quantization table: rows are runs, columns are tasks, with the difference from the
    first run and '*' where it exceeds the combined standard error."""
    runs = []
    for path in paths:
        p = Path(path)
        p = p / RESULTS if p.is_dir() else p
        if not p.is_file():
            raise EvalDataError(f"{p} is not a results file")
        runs.append((p, json.loads(p.read_text())))
    names: dict[str, dict[str, dict]] = {}
    for p, r in runs:
        label = _run_label(p, r)
        names.setdefault(label, {})[r["task"]] = r["scores"]
    tasks = sorted({t for scores in names.values() for t in scores})
    first = next(iter(names.values()))
    lines = ["run".ljust(44) + "".join(t.rjust(22) for t in tasks)]
    for label, scores in names.items():
        cells = []
        for t in tasks:
            s = scores.get(t)
            if s is None or s.get("acc") is None:
                cells.append("-".rjust(22))
                continue
            cell = f"{100 * s['acc']:.2f}" + plus_minus(s.get("stderr")).replace(" ", "")
            base = first.get(t)
            if base is not None and base is not s and base.get("acc") is not None:
                diff = s["acc"] - base["acc"]
                errors = [_known(s.get("stderr")), _known(base.get("stderr"))]
                beyond = None not in errors and abs(diff) > math.hypot(*errors)  # unknown: no verdict
                cell += f" ({100 * diff:+.2f}{'*' if beyond else ''})"
            cells.append(cell.rjust(22))
        lines.append(label[:43].ljust(44) + "".join(cells))
    lines.append(
        "accuracy %, ± standard error; (difference from the first run, * beyond the combined stderr)"
    )
    return "\n".join(lines)


def _run_label(path: Path, results: dict) -> str:
    rec = results.get("record", {})
    model = Path(rec.get("model_path") or rec.get("url") or path.parent.name).stem
    precision = rec.get("quantization") or rec.get("dtype") or ""
    return f"{model} {precision}".strip()


def _known(stderr: float | None) -> float | None:
    """A standard error, or None where it is not known (one item: none to estimate it from)."""
    return None if stderr is None or math.isnan(stderr) else stderr


def plus_minus(stderr: float | None) -> str:
    """``± 1.23`` (percent), or ``± n/a`` where the standard error is not known."""
    known = _known(stderr)
    return "± n/a" if known is None else f"± {100 * known:.2f}"
