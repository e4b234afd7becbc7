"""Tool-use plan: BFCL v4 items through the model's own tool format (or an endpoint's ``tools``
field), judged by BFCL's AST rules.
"""

from __future__ import annotations

import functools

from qwenkit.evaluate import tooluse
from qwenkit.evaluate.backends import Backend
from qwenkit.evaluate.data import BFCL, EvalDataError
from qwenkit.evaluate.plans.settings import Plan, Scoring, Settings, first_per_subject


def tooluse_scoring(s: Settings) -> Scoring:
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


def tooluse_plan(s: Settings) -> Plan:
    items = first_per_subject(tooluse.read_bfcl(s.subjects, s.data), s.limit)
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

    return Plan(items, run_chunk, tooluse_scoring(s), record)
