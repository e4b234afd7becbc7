"""Long-text plans: sliding-window perplexity over a text file, and synthetic passkey retrieval at
chosen prompt lengths and depths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwenkit.evaluate import passkey
from qwenkit.evaluate.backends import Backend
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.plans.settings import Plan, Scoring, Settings, chunk_size
from qwenkit.evaluate.results import sha256_text
from qwenkit.tokenizer.thinking import split_thinking


@dataclass(frozen=True)
class _Document:
    id: str
    text: str


def _ppl_aggregate(rows: list[dict]) -> dict:
    keys = ("token_perplexity", "byte_perplexity", "bits_per_byte", "tokens_scored", "bytes", "windows")
    return {**{k: rows[0][k] for k in keys}, "bos": rows[0].get("bos")}  # how the count was made


def ppl_plan(s: Settings) -> Plan:
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

    def run_chunk(
        backend: Backend, chunk: list[_Document], report: Callable[[int, int], None] | None = None
    ) -> list[dict]:
        return [
            {"id": d.id, **perplexity(backend, d.text, s.window, s.stride, chunk_size(s), report)}
            for d in chunk
        ]

    return Plan([doc], run_chunk, ppl_scoring(), record, reports_within=True)


def _passkey_verdict(output: str, key: str) -> dict:
    """The key read from a reply (its thinking stripped) and whether it is the hidden one."""
    extracted = passkey.extract(split_thinking(output)[1])
    return {"extracted": extracted, "gold": key, "correct": extracted == key}


def passkey_plan(s: Settings, max_context: int | None) -> Plan:
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
            thinking = split_thinking(out)[0]
            if thinking is not None:
                row["thinking"] = thinking
            rows.append(row)
        return rows

    return Plan(items, run_chunk, passkey_scoring(), record)


def ppl_scoring() -> Scoring:
    return Scoring(_ppl_aggregate, cannot_rejudge="perplexity has no answer to extract again")


def passkey_scoring() -> Scoring:
    return Scoring(passkey.aggregate, lambda row: _passkey_verdict(row["output"], row["gold"]))
