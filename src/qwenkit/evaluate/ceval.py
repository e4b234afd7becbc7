"""C-Eval: the published ``{dev,val,test}/{subject}_{split}.csv`` layout (header
``id,question,A,B,C,D,answer[,explanation]``); Qwen's prompts.

Base: the first ``shots`` dev rows in file order as ``问题：…\\nA. …\\n答案：X\\n\\n``, then the question,
scored on the letter right after ``答案：`` (``A``..``D``, no space). Chat: the bare question and options,
extractor ``qwen-ceval-chat``. Aggregation: macro over subjects (C-Eval's and Qwen's), micro beside it;
categories STEM / Social Science / Humanities / Other, and "Hard".
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path

from qwenkit.evaluate.data import EvalDataError, utf8
from qwenkit.evaluate.multiple_choice import MCItem, check_answer

SUBJECT_INFO: dict[str, dict[str, str]] = json.loads(
    resources.files("qwenkit.evaluate").joinpath("prompts/ceval_subjects.json").read_text(encoding="utf-8")
)
HARD = (
    "advanced_mathematics",
    "discrete_mathematics",
    "probability_and_statistics",
    "college_physics",
    "college_chemistry",
    "high_school_mathematics",
    "high_school_physics",
    "high_school_chemistry",
)
LETTER_SPELLING = ("A", "B", "C", "D")
HEADLINE = "macro"
COLUMNS = ("id", "question", "A", "B", "C", "D", "answer")


def category_of(subject: str) -> str:
    info = SUBJECT_INFO.get(subject)
    return info["category"] if info else "Other"


def read_split(data_dir: str | Path, split: str, subjects: list[str] | None = None) -> list[MCItem]:
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise EvalDataError(
            f"no C-Eval {split} split under {data_dir} (expected {split}/<subject>_{split}.csv)"
        )
    wanted = set(subjects or [])
    items = []
    for path in sorted(folder.glob(f"*_{split}.csv")):
        subject = path.name[: -len(f"_{split}.csv")]
        if wanted and subject not in wanted:
            continue
        reader = csv.DictReader(io.StringIO(utf8(path.read_bytes(), str(path)), newline=""))
        missing = [
            c
            for c in COLUMNS
            if c not in (reader.fieldnames or []) and not (c == "answer" and split == "test")
        ]
        if missing:
            raise EvalDataError(
                f"{path}: header lacks {', '.join(missing)} (C-Eval layout: {','.join(COLUMNS)})"
            )
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if any(row.get(c) is None for c in COLUMNS if c in reader.fieldnames):
                raise EvalDataError(f"{where}: the row has fewer columns than the header")
            answer = check_answer(row.get("answer") or "", where, optional=split == "test")
            choices = (row["A"], row["B"], row["C"], row["D"])
            items.append(MCItem(f"{subject}/{split}/{row['id']}", subject, row["question"], choices, answer))

    if wanted - {i.subject for i in items}:
        raise EvalDataError(
            f"no C-Eval {split} data for: {', '.join(sorted(wanted - {i.subject for i in items}))}"
        )
    return items


def format_question(item: MCItem, answer: str | None) -> str:
    text = "问题：" + item.question
    for letter, choice in zip("ABCD", item.choices, strict=True):
        text += f"\n{letter}. {choice}"
    return text + (f"\n答案：{answer}\n\n" if answer is not None else "\n答案：")


def base_prompt(item: MCItem, dev: list[MCItem]) -> str:
    return "".join(format_question(d, d.answer) for d in dev) + format_question(item, None)


def chat_prompt(item: MCItem) -> str:
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip("ABCD", item.choices, strict=True))
    return f"{item.question}\n\n{options}"


def hard_accuracy(subject_scores: dict[str, dict]) -> float | None:
    values = [subject_scores[s]["acc"] for s in HARD if s in subject_scores]
    return sum(values) / len(values) if values else None
