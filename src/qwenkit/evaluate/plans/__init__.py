"""What each task asks of the model: its items, how a chunk of them runs on a backend and is scored,
and how the rows aggregate (a :class:`Plan` per task, from :class:`Settings`).

How rows are judged and summed up is a task's :class:`Scoring`, which ``--rescore`` uses too: a run and
its rescoring compute every score with the same code. ``runner`` drives a plan (resume, samples,
results); the task modules hold each benchmark's data, prompts and scoring. Here: the settings and their
checks (``settings``), and a plan per kind of task: multiple choice (``choice``: MMLU, C-Eval), generated
answers (``generation``: GSM8K, HumanEval), long text (``longtext``: perplexity, passkey) and tool use
(``tools``).
"""

from __future__ import annotations

from typing import Any

from qwenkit.evaluate import humaneval
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.plans.choice import mc_plan, mc_scoring
from qwenkit.evaluate.plans.generation import gsm8k_plan, gsm8k_scoring, humaneval_plan, humaneval_scoring
from qwenkit.evaluate.plans.longtext import passkey_plan, passkey_scoring, ppl_plan, ppl_scoring
from qwenkit.evaluate.plans.settings import (
    TASKS,
    Plan,
    Scoring,
    Settings,
    check_settings,
    chunk_size,
    default_max_new_tokens,
    used_settings,
    without_unused,
)
from qwenkit.evaluate.plans.tools import tooluse_plan, tooluse_scoring

__all__ = [
    "TASKS",
    "Plan",
    "Scoring",
    "Settings",
    "check_settings",
    "chunk_size",
    "default_max_new_tokens",
    "item_id",
    "needs_model",
    "plan",
    "scoring",
    "used_settings",
    "without_unused",
]


def _scoring(s: Settings) -> Scoring:
    """The task's scoring (see :class:`Scoring`); settings are taken as checked."""
    if s.task in ("mmlu", "ceval"):
        return mc_scoring(s)
    if s.task == "gsm8k":
        return gsm8k_scoring(s)
    if s.task == "tooluse":
        return tooluse_scoring(s)
    if s.task == "passkey":
        return passkey_scoring()
    if s.task == "humaneval":
        return humaneval_scoring()
    return ppl_scoring()


def scoring(settings: Settings) -> Scoring:
    """How rows of a run with these settings are judged and aggregated (``--rescore`` uses this)."""
    check_settings(settings)
    return _scoring(settings)


def plan(settings: Settings, max_context: int | None = None) -> Plan:
    """The task's items and how to run and score them (``max_context``: the model's, where known). Only
    passkey needs the model (its context) to make them: every other task's data is read, and refused,
    before a model loads."""
    p = _task_plan(settings, max_context)
    if not p.items:  # an empty file, or a folder without the split's files: no score to report
        raise EvalDataError(f"{p.record['data']} holds no {settings.task} items: nothing to evaluate")
    seen: set[str] = set()
    for item in p.items:  # samples are kept by id: two items of one id would be scored as one on resume
        if (key := item_id(item)) in seen:
            raise EvalDataError(
                f"{p.record['data']} holds {settings.task} item {key!r} twice: each item needs its own id"
            )
        seen.add(key)
    return p


def needs_model(settings: Settings) -> bool:
    """Whether the task's items depend on the model (passkey's default lengths: what its context holds)."""
    return settings.task == "passkey"


def _task_plan(settings: Settings, max_context: int | None) -> Plan:
    check_settings(settings)
    if settings.task == "tooluse":
        return tooluse_plan(settings)
    if settings.task == "passkey":
        return passkey_plan(settings, max_context)
    if settings.task == "ppl":
        return ppl_plan(settings)
    if settings.task in ("mmlu", "ceval"):
        return mc_plan(settings)
    if settings.task == "gsm8k":
        return gsm8k_plan(settings)
    return humaneval_plan(settings)


def item_id(item: Any) -> str:
    return item.task_id if isinstance(item, humaneval.Problem) else item.id
