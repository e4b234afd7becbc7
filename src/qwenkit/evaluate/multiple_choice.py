"""Four-option multiple choice (MMLU, C-Eval): items, the two scoring methods, aggregation.

- ``loglik`` (base models, Qwen's ``evaluate_{mmlu,ceval}.py``): few-shot prompt ending at the answer
  position; the prediction is the letter whose token is most probable next. Each letter must be one
  token. We record each letter's log-probability and the probabilities renormalised over the four.
- ``generate`` (chat models, Qwen's ``evaluate_chat_*.py``): 0-shot question through the chat template,
  greedy, thinking stripped, then the benchmark's extractor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qwenkit.evaluate.backends import Backend
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.extract import LETTERS
from qwenkit.evaluate.stats import macro_stderr, mean_stderr
from qwenkit.tokenizer.thinking import split_thinking


@dataclass(frozen=True)
class MCItem:
    id: str
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"; "" where the split publishes none (C-Eval test)


def check_row(row: Sequence[str], where: str) -> None:
    if len(row) < 6:
        raise EvalDataError(f"{where}: expected question, A, B, C, D, answer; got {len(row)} columns")


def check_answer(answer: str, where: str, optional: bool = False) -> str:
    """The gold letter, which must be one of A..D (or empty where the split publishes none, ``optional``;
    "-", as some copies of C-Eval's test split mark it, is read as empty): another (a 0-3 index, a
    lower-case letter) would make every prediction wrong."""
    answer = answer.strip()
    if optional and answer == "-":
        return ""
    if answer not in LETTERS and not (optional and not answer):
        raise EvalDataError(f"{where}: the answer {answer!r} is not one of A, B, C, D")
    return answer


def letter_token_ids(backend: Backend, spelling: Sequence[str]) -> list[int]:
    """The token id of each letter spelling (" A" after "Answer:", "A" after "答案："); must be one each."""
    ids = []
    for s in spelling:
        encoded = backend.encode(s)
        if len(encoded) != 1:
            raise EvalDataError(
                f"{s!r} is {len(encoded)} tokens for this tokenizer; letter scoring needs one"
            )
        ids.append(encoded[0])
    return ids


def score_loglik(
    backend: Backend, items: Sequence[MCItem], prompts: Sequence[str], spelling: Sequence[str]
) -> list[dict]:
    """Per item: the letter log-probabilities, renormalised probabilities and the argmax letter."""
    letter_ids = letter_token_ids(backend, spelling)
    contexts = [backend.encode_prompt(p) for p in prompts]
    rows = []
    for item, prompt, lps in zip(
        items, prompts, backend.next_token_logprobs(contexts, letter_ids), strict=True
    ):
        top = max(lps)
        weights = [math.exp(v - top) for v in lps]
        probs = [w / sum(weights) for w in weights]
        pred = LETTERS[lps.index(top)]
        rows.append(
            _row(
                item,
                prompt,
                output=None,
                pred=pred,
                scores=dict(zip(LETTERS, lps, strict=True)),
                probs=dict(zip(LETTERS, probs, strict=True)),
            )
        )
    return rows


def score_generate(
    backend: Backend,
    items: Sequence[MCItem],
    prompts: Sequence[str],
    extractor: Callable[..., str],
    max_tokens: int,
) -> list[dict]:
    replies = backend.chat([[{"role": "user", "content": p}] for p in prompts], max_tokens)
    rows = []
    for item, prompt, reply in zip(items, prompts, replies, strict=True):
        pred = _extract(reply, item.choices, item.question, extractor)
        rows.append(_row(item, prompt, output=reply, pred=pred, thinking=split_thinking(reply)[0]))
    return rows


def _extract(reply: str, choices: Sequence[str], question: str, extractor: Callable[..., str]) -> str:
    """The letter a chat reply chose: its thinking stripped, then the extractor ("" for no answer)."""
    _, answer = split_thinking(reply)
    return extractor(answer, tuple(choices), question) if answer.strip() else ""


def _row(item: MCItem, prompt: str, output: str | None, pred: str, **extra) -> dict:
    return {
        "id": item.id,
        "subject": item.subject,
        "prompt": prompt,
        "output": output,
        **{k: v for k, v in extra.items() if v is not None},
        "extracted": pred,
        "gold": item.answer,
        "correct": bool(item.answer) and pred == item.answer,
    }


def rejudge(row: dict, extractor: Callable[..., str] | None) -> dict:
    """A saved row's prediction and verdict again, without the model: the most probable letter of its
    saved scores (loglik), or ``extractor`` on its saved reply (generate)."""
    if row.get("scores"):
        scores = row["scores"]
        pred = max(LETTERS, key=lambda letter: scores[letter])
    elif extractor is not None and row.get("output") is not None:
        pred = _extract(row["output"], row["choices"], row["question"], extractor)
    else:
        pred = row["extracted"]
    return {"extracted": pred, "correct": bool(row["gold"]) and pred == row["gold"]}


def aggregate(rows: Sequence[dict], category_of: Callable[[str], str], headline: str) -> dict:
    """Accuracy micro (over questions) and macro (over subjects), per subject and per category, each with
    a standard error; ``headline`` ("micro" or "macro") names the benchmark authors' choice. Rows without
    a gold letter (C-Eval's test split, graded by submission) are predictions only, never counted wrong:
    where no row has one there is no score."""
    unanswered = sum(1 for row in rows if row.get("gold") == "")
    if unanswered and unanswered == len(rows):
        return {
            "acc": None,
            "stderr": None,
            "aggregation": "none: the split publishes no answers (predictions in samples.jsonl)",
            "n": 0,
            "unanswered": unanswered,
            "categories": {},
            "subjects": {},
        }
    by_subject: dict[str, list[float]] = {}
    for row in rows:
        if row.get("gold") != "":
            by_subject.setdefault(row["subject"], []).append(float(row["correct"]))
    micro = mean_stderr([v for vs in by_subject.values() for v in vs])
    macro = macro_stderr(list(by_subject.values()))
    categories: dict[str, dict[str, list[float]]] = {}
    for subject, values in by_subject.items():
        categories.setdefault(category_of(subject), {})[subject] = values
    per_category = {}
    for name, subjects in sorted(categories.items()):
        cmicro = mean_stderr([v for vs in subjects.values() for v in vs])
        cmacro = macro_stderr(list(subjects.values()))
        chosen = cmacro if headline == "macro" else cmicro
        per_category[name] = {"acc": chosen[0], "stderr": chosen[1], "n": sum(map(len, subjects.values()))}
    chosen, other = (macro, micro) if headline == "macro" else (micro, macro)
    return {
        **({"unanswered": unanswered} if unanswered else {}),
        "acc": chosen[0],
        "stderr": chosen[1],
        "aggregation": headline,
        f"acc_{'micro' if headline == 'macro' else 'macro'}": other[0],
        f"stderr_{'micro' if headline == 'macro' else 'macro'}": other[1],
        "n": len(rows) - unanswered,
        "categories": per_category,
        "subjects": {
            s: {"acc": mean_stderr(v)[0], "stderr": mean_stderr(v)[1], "n": len(v)}
            for s, v in sorted(by_subject.items())
        },
    }
