"""Tool use on the Berkeley Function Calling Leaderboard (BFCL v4) data, scored by AST matching.

Qwen's own tool-use set (ReAct, 2023-12-06) is not published; BFCL's non-live Python categories ship with
answers in the ``bfcl-eval`` wheel and stand in for it (labelled so in every results file). Each item is
one user turn and a list of functions; the model answers through its own tool format (the chat template's
``tools`` rendering and ``<tool_call>`` parsing locally, the OpenAI ``tools`` field on an endpoint).

Scoring follows BFCL's AST checker (re-implemented from its documented rules): the called function names,
every required parameter present, no parameter the function or the answer lacks, each value of the
declared type (an int is accepted for a float) and among the possible answers (strings compared lower-cased
without spaces and ``,./-_*^``; ``""`` among the possible answers marks an optional parameter). Simple and
multiple need exactly one call; parallel calls match in any order. On ``irrelevance`` (no function fits)
an item is right when the model calls nothing; its complement is the false-positive rate. Beside BFCL's
AST accuracy each row also records function selection (the called names equal the expected ones).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenkit.evaluate.data import BFCL, EvalDataError, json_lines, read_member
from qwenkit.evaluate.stats import macro_stderr, mean_stderr

# our name -> BFCL v4 file stem; the first four are BFCL's "non-live AST" group
CATEGORIES = {
    "simple": "simple_python",
    "multiple": "multiple",
    "parallel": "parallel",
    "parallel_multiple": "parallel_multiple",
    "irrelevance": "irrelevance",
}
AST_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")

# BFCL's parameter types -> JSON Schema types (what an OpenAI ``tools`` entry carries)
SCHEMA_TYPES = {
    "integer": "integer",
    "float": "number",
    "number": "number",
    "string": "string",
    "boolean": "boolean",
    "array": "array",
    "tuple": "array",
    "dict": "object",
    "object": "object",
    "any": "string",
}
# BFCL's parameter types -> the Python type a JSON-decoded argument must have
PYTHON_TYPES: dict[str, type] = {
    "integer": int,
    "float": float,
    "string": str,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
_STRIPPED = re.compile(r"[ ,./\-_*^]")


@dataclass(frozen=True)
class ToolItem:
    id: str
    category: str
    messages: list[dict[str, Any]]
    functions: list[dict[str, Any]]  # BFCL function docs (name, description, parameters)
    answer: (
        list[dict[str, dict[str, list[Any]]]] | None
    )  # [{name: {param: [possible values]}}]; None: no call

    @property
    def subject(self) -> str:
        return self.category


@dataclass
class Verdict:
    valid: bool
    error: str = ""


# ---- data ------------------------------------------------------------------------------------------


def read_bfcl(categories: list[str] | None = None, data: str | Path | None = None) -> list[ToolItem]:
    """Items of the chosen categories in file order, from the ``bfcl-eval`` wheel or a folder holding
    ``BFCL_v4_{stem}.json`` and ``possible_answer/BFCL_v4_{stem}.json`` (the package's ``data/``)."""
    chosen = categories or list(CATEGORIES)
    unknown = [c for c in chosen if c not in CATEGORIES]
    if unknown:
        raise EvalDataError(
            f"unknown tool-use categories: {', '.join(unknown)}; choose from {', '.join(CATEGORIES)}"
        )
    items: list[ToolItem] = []
    for category in chosen:
        stem = f"BFCL_v4_{CATEGORIES[category]}.json"
        questions = _read_lines(data, stem)
        answers = {} if category == "irrelevance" else _answers(_read_lines(data, f"possible_answer/{stem}"))
        for q in questions:
            turns = q.get("question") or []
            if len(turns) != 1 or not isinstance(q.get("function"), list):
                raise EvalDataError(f"{stem}: {q.get('id')} is not a one-turn item with functions")
            answer = None if category == "irrelevance" else answers.get(q["id"])
            if category != "irrelevance" and not isinstance(answer, list):
                raise EvalDataError(f"{stem}: {q['id']} has no possible answer")
            items.append(ToolItem(q["id"], category, turns[0], q["function"], answer))
    return items


def _read_lines(data: str | Path | None, name: str) -> list[dict[str, Any]]:
    if data is None:
        raw, where = read_member(BFCL, member=BFCL.member + name), BFCL.member + name
    else:
        path = Path(data) / name
        if not path.is_file():
            raise EvalDataError(f"BFCL file {path} does not exist (point --data at bfcl_eval/data)")
        raw, where = path.read_bytes(), str(path)
    rows = json_lines(raw, where)
    for n, row in rows:
        if not isinstance(row.get("id"), str):
            raise EvalDataError(f"{where} line {n} has no id")
    return [row for _, row in rows]


def _answers(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, dict[str, list[Any]]]]]:
    return {r["id"]: r.get("ground_truth") for r in rows}


def openai_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """BFCL function docs as OpenAI ``tools`` (JSON Schema types; names kept, dots included, as BFCL
    does for Qwen's function-calling handler)."""
    tools = []
    for fn in functions:
        fn = copy.deepcopy(fn)
        params = fn.setdefault("parameters", {})
        params["type"] = "object"
        params["properties"] = {k: _schema(v) for k, v in (params.get("properties") or {}).items()}
        tools.append({"type": "function", "function": fn})
    return tools


def _schema(prop: dict[str, Any]) -> dict[str, Any]:
    prop = dict(prop)
    prop["type"] = SCHEMA_TYPES.get(prop.get("type", "string"), "string")
    if isinstance(prop.get("properties"), dict):
        prop["properties"] = {k: _schema(v) for k, v in prop["properties"].items()}
    if isinstance(prop.get("items"), dict):
        prop["items"] = _schema(prop["items"])
    return prop


# ---- the AST matcher -------------------------------------------------------------------------------


def standardize(text: str) -> str:
    """BFCL's string comparison form: lower case, no spaces or ``,./-_*^``, double quotes."""
    return _STRIPPED.sub("", text).lower().replace("'", '"')


def check(item: ToolItem, calls: list[tuple[str, Any]]) -> Verdict:
    """BFCL's AST verdict for the model's ``calls`` (name, decoded arguments) on ``item``."""
    if item.category == "irrelevance":
        return Verdict(not calls, "called a function where none fits" if calls else "")
    answer = item.answer or []
    if len(calls) != len(answer):
        return Verdict(False, f"wrong number of calls: {len(calls)}, expected {len(answer)}")
    if item.category in ("simple", "multiple"):
        return match_call(_doc(item, answer[0]), calls[0], answer[0])
    matched: set[int] = set()
    for expected in answer:  # parallel: each expected call takes the first unmatched call that fits
        doc, last = _doc(item, expected), Verdict(False, "no call left")
        for k, call in enumerate(calls):
            if k in matched:
                continue
            last = match_call(doc, call, expected)
            if last.valid:
                matched.add(k)
                break
        if not last.valid:
            return Verdict(False, f"no call matches {next(iter(expected))}: {last.error}")
    return Verdict(True)


def selects_functions(item: ToolItem, calls: list[tuple[str, Any]]) -> bool:
    """Function selection: the called names equal the expected ones (as a multiset); none on irrelevance."""
    expected = sorted(next(iter(a)) for a in item.answer or [])
    return sorted(name for name, _ in calls) == expected


def _doc(item: ToolItem, expected: dict[str, Any]) -> dict[str, Any]:
    name = next(iter(expected))
    for fn in item.functions:
        if fn["name"] == name:
            return fn
    return item.functions[0]


def match_call(
    doc: dict[str, Any], call: tuple[str, Any], expected: dict[str, dict[str, list[Any]]]
) -> Verdict:
    """One call against one expected call (BFCL's simple-function check)."""
    name, args = call
    possible = next(iter(expected.values()))
    if name != doc["name"]:
        return Verdict(False, f"wrong function {name!r}, expected {doc['name']!r}")
    if not isinstance(args, dict):
        return Verdict(False, "arguments are not a JSON object")
    props = doc.get("parameters", {}).get("properties", {})
    for param in doc.get("parameters", {}).get("required", []):
        if param not in args:
            return Verdict(False, f"missing required parameter {param!r}")
    for param, value in args.items():
        if param not in props or param not in possible:
            return Verdict(False, f"unexpected parameter {param!r}")
        verdict = _match_value(param, value, props[param], possible[param])
        if not verdict.valid:
            return verdict
    for param, values in possible.items():
        if param not in args and "" not in values:
            return Verdict(False, f"parameter {param!r} is missing and not optional")
    return Verdict(True)


def _match_value(param: str, value: Any, prop: dict[str, Any], possible: list[Any]) -> Verdict:
    declared = prop.get("type", "string")
    expected_type = PYTHON_TYPES.get(declared, str)
    if declared == "float" and type(value) is int:
        value = float(value)  # Python would convert an int argument too
    item_type = None
    if declared in ("array", "tuple"):
        item_type = PYTHON_TYPES.get((prop.get("items") or {}).get("type", "string"), str)
    gold_type = next((type(v) for v in possible if v != ""), None)
    # a gold value of another type than declared is a variable name written as a string: compare as is
    is_variable = gold_type is not None and gold_type is not expected_type
    if type(value) is expected_type:
        if item_type is not None and not _items_typed(value, item_type, possible):
            return Verdict(False, f"{param!r}: items of {value!r} are not all {item_type.__name__}")
    elif gold_type is not None and type(value) is gold_type:
        is_variable = True
    else:
        return Verdict(False, f"{param!r}: {value!r} is not of type {declared}")
    if not is_variable:
        if expected_type is dict:
            return _match_dict(param, value, possible)
        if expected_type is list and item_type is dict:
            return _match_dict_list(param, value, possible)
        if expected_type is str:
            ok = standardize(value) in [standardize(v) for v in possible if isinstance(v, str)]
            return Verdict(ok, "" if ok else f"{param!r}: {value!r} not among {possible!r}")
        if expected_type is list:
            ok = _standard_list(value) in [_standard_list(v) for v in possible if isinstance(v, list)]
            return Verdict(ok, "" if ok else f"{param!r}: {value!r} not among {possible!r}")
    ok = value in possible
    return Verdict(ok, "" if ok else f"{param!r}: {value!r} not among {possible!r}")


def _items_typed(value: list[Any], item_type: type, possible: list[Any]) -> bool:
    """BFCL checks list items' types one level deep, against each possible answer that is a list: an item
    of the declared type, or of the type of that answer's items (a variable name), passes; an optional
    parameter (a non-list possible answer) passes."""
    for answer in possible:
        if not isinstance(answer, list):
            return True
        gold_type = next((type(v) for v in answer if v != ""), None)
        if all(type(v) is item_type or type(v) is gold_type for v in value):
            return True
    return False


def _standard_list(values: list[Any]) -> list[Any]:
    return [standardize(v) if isinstance(v, str) else v for v in values]


def _match_dict(param: str, value: dict[str, Any], possible: list[Any]) -> Verdict:
    last = Verdict(False, f"{param!r}: no possible dict")
    for answer in possible:
        if answer == "":
            continue
        last = _dict_fits(param, value, answer)
        if last.valid:
            return last
    return last


def _dict_fits(param: str, value: dict[str, Any], answer: dict[str, list[Any]]) -> Verdict:
    for key, v in value.items():
        if key not in answer:
            return Verdict(False, f"{param!r}: unexpected key {key!r}")
        got = standardize(v) if isinstance(v, str) else v
        if got not in [standardize(a) if isinstance(a, str) else a for a in answer[key]]:
            return Verdict(False, f"{param!r}: {key!r}={v!r} not among {answer[key]!r}")
    for key, values in answer.items():
        if key not in value and "" not in values:
            return Verdict(False, f"{param!r}: missing key {key!r}")
    return Verdict(True)


def _match_dict_list(param: str, value: list[Any], possible: list[Any]) -> Verdict:
    last = Verdict(False, f"{param!r}: no possible list")
    for answer in possible:
        if not isinstance(answer, list) or len(answer) != len(value):
            last = Verdict(False, f"{param!r}: wrong number of dicts")
            continue
        for got, want in zip(value, answer, strict=True):
            last = _dict_fits(param, got, want) if isinstance(got, dict) else Verdict(False, "not a dict")
            if not last.valid:
                break
        else:
            return Verdict(True)
    return last


# ---- rows and aggregation --------------------------------------------------------------------------


def decoded_calls(raw_calls: list[dict[str, str]]) -> list[tuple[str, Any]]:
    """(name, arguments) with the JSON arguments decoded; undecodable arguments stay a string (and fail)."""
    out = []
    for call in raw_calls:
        try:
            args = json.loads(call["arguments"])
        except (TypeError, ValueError):
            args = call["arguments"]
        out.append((call["name"], args))
    return out


def score_row(item: ToolItem, raw_calls: list[dict[str, str]]) -> dict[str, Any]:
    calls = decoded_calls(raw_calls)
    verdict = check(item, calls)
    return {
        "correct": verdict.valid,
        "selected": selects_functions(item, calls),
        "called": bool(calls),
        "error": verdict.error,
    }


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """BFCL's non-live AST summary (unweighted mean of the AST categories present), micro beside it; per
    category AST accuracy and function selection; irrelevance accuracy and false-positive rate apart."""
    by_category: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_category.setdefault(row["subject"], []).append(row)
    per = {}
    for name, group in by_category.items():
        acc, se = mean_stderr([float(r["correct"]) for r in group])
        sel, sel_se = mean_stderr([float(r["selected"]) for r in group])
        per[name] = {"acc": acc, "stderr": se, "n": len(group), "selection": sel, "selection_stderr": sel_se}
        if name == "irrelevance":
            per[name]["false_positive_rate"] = 1.0 - acc
    ast = [[float(r["correct"]) for r in by_category[c]] for c in AST_CATEGORIES if c in by_category]
    ast_rows = [r for c in AST_CATEGORIES for r in by_category.get(c, [])]
    macro = macro_stderr(ast) if ast else (None, None)
    micro = mean_stderr([float(r["correct"]) for r in ast_rows]) if ast_rows else (None, None)
    selection = mean_stderr([float(r["selected"]) for r in ast_rows]) if ast_rows else (None, None)
    out: dict[str, Any] = {
        "acc": macro[0],
        "stderr": macro[1],
        "aggregation": "macro over the AST categories (BFCL non-live AST summary)",
        "acc_micro": micro[0],
        "stderr_micro": micro[1],
        "selection": selection[0],
        "selection_stderr": selection[1],
        "n": len(ast_rows),
        "categories": {k: per[k] for k in CATEGORIES if k in per},
    }
    if "irrelevance" in per:
        out["irrelevance"] = per["irrelevance"]["acc"]
        out["false_positive_rate"] = per["irrelevance"]["false_positive_rate"]
    if not ast_rows and "irrelevance" in per:  # only irrelevance asked for: it is the headline
        out |= {"acc": per["irrelevance"]["acc"], "stderr": per["irrelevance"]["stderr"], "n": len(rows)}
        out["aggregation"] = "irrelevance accuracy (1 - false-positive rate)"
    return out
