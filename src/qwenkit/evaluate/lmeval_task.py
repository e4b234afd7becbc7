"""Write items as an lm-evaluation-harness task reading local files (no hub), so lm-eval can score the
exact prompts ``qwenkit eval`` scores: the cross-check and the benchmark peer.

The YAML is written as JSON (a subset of YAML), with ``dataset_path: json`` and ``data_files``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_multiple_choice_task(
    directory: Path, name: str, prompts: Sequence[str], gold: Sequence[str], delimiter: str = " "
) -> Path:
    """A 4-letter task: lm-eval scores ``delimiter + letter`` after each prompt (" A" after "Answer:")."""
    rows = [{"prompt": p, "gold": "ABCD".index(g)} for p, g in zip(prompts, gold, strict=True)]
    task = {
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "{{gold}}",
        "target_delimiter": delimiter,
        "metric_list": [{"metric": "acc"}],
    }
    return _write_task(directory, name, rows, task)


def write_generation_task(
    directory: Path,
    name: str,
    prompts: Sequence[str],
    gold: Sequence[str],
    until: Sequence[str],
    max_tokens: int,
) -> Path:
    """A greedy generation task with the given stop strings and token budget."""
    rows = [{"prompt": p, "gold": g} for p, g in zip(prompts, gold, strict=True)]
    task = {
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": list(until), "do_sample": False, "max_gen_toks": max_tokens},
        "metric_list": [{"metric": "exact_match"}],
    }
    return _write_task(directory, name, rows, task)


def _write_task(directory: Path, name: str, rows: list[dict[str, Any]], task: dict[str, Any]) -> Path:
    """Write ``rows`` as ``name.jsonl`` and the task reading them, ``task``'s fields after the data's."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        **task,
    }
    (directory / f"{name}.yaml").write_text(json.dumps(task, ensure_ascii=False, indent=1), encoding="utf-8")
    return directory
