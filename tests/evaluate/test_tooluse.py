"""Tool use on BFCL v4: the AST matcher on real BFCL items (and against BFCL's own checker, read from the
wheel as a reference), the OpenAI tool schemas, and whole runs on a steered tiny model, locally and
through ``qwenkit serve`` with the OpenAI ``tools`` field."""

from __future__ import annotations

import collections
import copy
import importlib
import itertools
import json
import random
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
sys.path.insert(0, str(Path(__file__).parents[1] / "server"))

from factories import with_named_templates
from scripted import ScriptedModel, steered_server

from qwenkit.cli import main as qwenkit_main
from qwenkit.evaluate import data, tooluse
from qwenkit.evaluate import results as results_module
from qwenkit.evaluate.backends import LocalBackend
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.endpoint import EndpointBackend
from qwenkit.evaluate.results import sha256_text
from qwenkit.evaluate.runner import Settings, rescore_dir, run
from qwenkit.generate import LLM
from qwenkit.tokenizer import load_tokenizer
from qwenkit.tokenizer.chat_template import chatml_template
from qwenkit.tools.react import react_messages


@pytest.fixture(scope="module")
def items() -> dict[str, tooluse.ToolItem]:
    return {i.id: i for i in tooluse.read_bfcl()}


def test_bfcl_categories_from_the_wheel(items):
    counts = collections.Counter(i.category for i in items.values())
    assert counts == {
        "simple": 400,
        "multiple": 200,
        "parallel": 200,
        "parallel_multiple": 200,
        "irrelevance": 240,
    }
    first = items["simple_python_0"]
    assert first.messages == [
        {
            "role": "user",
            "content": "Find the area of a triangle with a base of 10 units and height of 5 units.",
        }
    ]
    assert first.answer == [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]
    assert items["irrelevance_0"].answer is None
    with pytest.raises(EvalDataError, match="unknown tool-use categories: live_simple"):
        tooluse.read_bfcl(["live_simple"])


def test_openai_tools_use_json_schema_types(items):
    (tool,) = tooluse.openai_tools(items["simple_python_0"].functions)
    assert tool["type"] == "function" and tool["function"]["name"] == "calculate_triangle_area"
    params = tool["function"]["parameters"]
    assert params["type"] == "object" and params["required"] == ["base", "height"]
    assert {k: v["type"] for k, v in params["properties"].items()} == {
        "base": "integer",
        "height": "integer",
        "unit": "string",
    }
    assert items["simple_python_0"].functions[0]["parameters"]["type"] == "dict"  # the item is untouched
    types_seen = set()
    for item in items.values():
        for t in tooluse.openai_tools(item.functions):
            for prop in t["function"]["parameters"]["properties"].values():
                types_seen.add(prop["type"])
                types_seen.add((prop.get("items") or {}).get("type", "string"))
    assert types_seen == {"integer", "number", "string", "boolean", "array", "object"}


def verdict(item, *calls):
    return tooluse.check(item, list(calls))


def test_simple_call_rules(items):
    item = items["simple_python_0"]
    assert verdict(item, ("calculate_triangle_area", {"base": 10, "height": 5})).valid  # unit optional
    assert verdict(item, ("calculate_triangle_area", {"base": 10, "height": 5, "unit": " Units."})).valid
    wrong = verdict(item, ("calculate_triangle_area", {"base": 10, "height": 6}))
    assert not wrong.valid and wrong.error == "'height': 6 not among [5]"
    assert (
        verdict(item, ("calculate_triangle_area", {"base": 10})).error
        == "missing required parameter 'height'"
    )
    extra = verdict(item, ("calculate_triangle_area", {"base": 10, "height": 5, "color": "red"}))
    assert extra.error == "unexpected parameter 'color'"
    assert verdict(item, ("calculate_triangle_area", {"base": "10", "height": 5})).error == (
        "'base': '10' is not of type integer"
    )
    assert not verdict(item, ("calculate_triangle_area", {"base": True, "height": 5})).valid  # bool is no int
    assert verdict(item, ("triangle_area", {"base": 10, "height": 5})).error.startswith("wrong function")
    two = verdict(item, *[("calculate_triangle_area", {"base": 10, "height": 5})] * 2)
    assert two.error == "wrong number of calls: 2, expected 1"
    assert not verdict(item, ("calculate_triangle_area", "{not json")).valid


def test_float_takes_an_int_and_dicts_compare_by_key(items):
    hypot = items["simple_python_2"]  # z: ["", 0] -- optional
    assert verdict(hypot, ("math.hypot", {"x": 4, "y": 5})).valid
    records = items["simple_python_89"]
    args = {
        "database_name": "StudentDB",
        "table_name": "students",
        "conditions": {"department": "science", "school": "Bluebird HS"},
    }
    assert verdict(records, ("db_fetch_records", args)).valid
    args["conditions"] = {"department": "Science"}
    assert verdict(records, ("db_fetch_records", args)).error == "'conditions': missing key 'school'"
    floats = next(
        i
        for i in items.values()
        if i.category == "simple"
        and any(p.get("type") == "float" for p in i.functions[0]["parameters"]["properties"].values())
        and all(
            not isinstance(v, float) or v == int(v)
            for vs in i.answer[0][i.functions[0]["name"]].values()
            for v in vs
        )
    )
    name, possible = next(iter(floats.answer[0].items()))
    call = {p: int(v[0]) if isinstance(v[0], float) else v[0] for p, v in possible.items() if v[0] != ""}
    assert verdict(floats, (name, call)).valid


def test_lists_of_dicts_and_variables(items):
    query = items["simple_python_96"]
    name, possible = next(iter(query.answer[0].items()))
    conditions = [
        {"field": "age", "operation": ">", "value": "25"},
        {"field": "job", "operation": "=", "value": "engineer"},
    ]
    call = {p: v[0] for p, v in possible.items() if p != "conditions" and v[0] != ""}
    assert verdict(query, (name, {**call, "conditions": conditions})).valid
    assert not verdict(query, (name, {**call, "conditions": conditions[::-1]})).valid  # order matters
    plot = items["parallel_multiple_21"]  # x, y declared arrays; the answer is a variable name (a string)
    x_call = next(a for a in plot.answer if "x" in next(iter(a.values())))
    name, possible = next(iter(x_call.items()))
    good = {p: v[0] for p, v in possible.items() if v[0] != ""}
    doc = tooluse._doc(plot, x_call)
    assert tooluse.match_call(doc, (name, good), x_call).valid
    assert not tooluse.match_call(doc, (name, {**good, "x": "data['other']"}), x_call).valid


def test_parallel_any_order_multiple_and_irrelevance(items):
    play = items["parallel_0"]
    taylor = ("spotify.play", {"artist": "Taylor Swift", "duration": 20})
    maroon = ("spotify.play", {"artist": "Maroon 5", "duration": 15})
    assert verdict(play, maroon, taylor).valid and verdict(play, taylor, maroon).valid
    assert verdict(play, taylor).error == "wrong number of calls: 1, expected 2"
    swapped = verdict(play, ("spotify.play", {"artist": "Taylor Swift", "duration": 15}), maroon)
    assert not swapped.valid and swapped.error.startswith("no call matches spotify.play")
    triangle = items["multiple_0"]
    assert verdict(triangle, ("triangle_properties.get", {"side1": 5, "side2": 4, "side3": 3})).valid
    other = [("circle_properties.get", {"radius": 3})]
    assert not verdict(triangle, *other).valid and not tooluse.selects_functions(triangle, other)
    assert tooluse.selects_functions(triangle, [("triangle_properties.get", {"side1": 1})])
    bmi = items["irrelevance_0"]
    assert verdict(bmi).valid and tooluse.selects_functions(bmi, [])
    called = verdict(bmi, ("determine_body_mass_index", {"weight": 70.0, "height": 1.8}))
    assert not called.valid and called.error == "called a function where none fits"


def test_aggregation_by_hand():
    rows = [
        {"subject": "simple", "correct": True, "selected": True},
        {"subject": "simple", "correct": False, "selected": True},
        {"subject": "parallel", "correct": True, "selected": True},
        {"subject": "irrelevance", "correct": False, "selected": False},
        {"subject": "irrelevance", "correct": True, "selected": True},
        {"subject": "irrelevance", "correct": True, "selected": True},
    ]
    s = tooluse.aggregate(rows)
    assert s["acc"] == pytest.approx((0.5 + 1.0) / 2) and s["acc_micro"] == pytest.approx(2 / 3)
    assert s["n"] == 3 and s["selection"] == 1.0
    assert s["false_positive_rate"] == pytest.approx(1 / 3) and s["irrelevance"] == pytest.approx(2 / 3)
    assert list(s["categories"]) == ["simple", "parallel", "irrelevance"]
    only = tooluse.aggregate(rows[3:])
    assert only["acc"] == pytest.approx(2 / 3) and only["aggregation"].startswith("irrelevance")


# ---- against BFCL's own checker --------------------------------------------------------------------


def bfcl_reference_checker(tmp_path: Path):
    """BFCL's ``ast_checker`` read out of the cached wheel (its model table stubbed: no name rewriting)."""
    root = tmp_path / "bfcl"
    with zipfile.ZipFile(data.wheel_path(data.BFCL)) as wheel:
        for name in wheel.namelist():
            if name.startswith(
                (
                    "bfcl_eval/eval_checker/ast_eval/",
                    "bfcl_eval/constants/type_mappings.py",
                    "bfcl_eval/constants/enums.py",
                )
            ):
                wheel.extract(name, root)
    saved = {k: v for k, v in sys.modules.items() if k.startswith("bfcl_eval")}
    sys.path.insert(0, str(root))
    for pkg in ("bfcl_eval", "bfcl_eval.constants", "bfcl_eval.eval_checker"):
        module = types.ModuleType(pkg)
        module.__path__ = [str(root / pkg.replace(".", "/"))]
        sys.modules[pkg] = module
    config = types.ModuleType("bfcl_eval.constants.model_config")
    config.MODEL_CONFIG_MAPPING = collections.defaultdict(
        lambda: types.SimpleNamespace(underscore_to_dot=False)
    )
    sys.modules["bfcl_eval.constants.model_config"] = config
    try:
        checker = importlib.import_module("bfcl_eval.eval_checker.ast_eval.ast_checker")
        python = importlib.import_module("bfcl_eval.constants.enums").Language.PYTHON
    finally:
        sys.path.remove(str(root))
    for k in [k for k in sys.modules if k.startswith("bfcl_eval")]:
        if k not in saved:
            del sys.modules[k]
    return checker.ast_checker, python


def _answer_calls(item: tooluse.ToolItem, pick: int) -> list[tuple[str, dict]]:
    def value(v):
        if isinstance(v, dict):
            return {k: value(x[pick % len(x)]) for k, x in v.items() if x and x[pick % len(x)] != ""}
        if isinstance(v, list) and v and isinstance(v[0], dict):
            return [value(x) for x in v]
        return v

    calls = []
    for expected in item.answer or []:
        name, params = next(iter(expected.items()))
        args = {p: value(vs[pick % len(vs)]) for p, vs in params.items() if vs and vs[pick % len(vs)] != ""}
        calls.append((name, args))
    return calls


def _mutate(calls: list, kind: str, rng: random.Random) -> list:
    calls = copy.deepcopy(calls)
    if kind == "reverse":
        return calls[::-1]
    if kind == "drop_call":
        return calls[1:]
    if kind == "dup_call":
        return calls + calls[:1]
    name, args = calls[rng.randrange(len(calls))]
    if kind == "rename":
        calls[0] = (name + "_x", args)
    elif kind == "extra":
        args["foo_bar"] = 1
    elif args:
        k = rng.choice(sorted(args))
        v = args[k]
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if kind == "drop":
            del args[k]
        elif kind == "case" and isinstance(v, str):
            args[k] = " " + v.upper().replace(" ", "_") + "."
        elif kind == "wrong":
            args[k] = (
                v + 1 if number else v + "zz" if isinstance(v, str) else not v if isinstance(v, bool) else {}
            )
        elif kind == "to_str":
            args[k] = str(v)
        elif kind == "to_int" and isinstance(v, float) and v == int(v):
            args[k] = int(v)
        elif kind == "to_float" and number:
            args[k] = float(v)
        elif kind == "bool":
            args[k] = True
        elif kind == "list_float" and isinstance(v, list):
            args[k] = [float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
    return calls


@pytest.mark.slow
def test_verdicts_equal_bfcls_own_checker_on_every_ast_item(items, tmp_path):
    """Every AST item of the four categories, answered with two readings of its answer and thirteen kinds of
    damage each: our verdict equals BFCL's ``ast_checker`` on all of them."""
    ast_checker, python = bfcl_reference_checker(tmp_path)
    stems = tooluse.CATEGORIES
    kinds = ["none", "reverse", "drop_call", "dup_call", "rename", "extra", "drop", "case", "wrong"]
    kinds += ["to_str", "to_int", "to_float", "bool", "list_float"]
    rng, cases, valid, differ = random.Random(0), 0, 0, []
    for item in items.values():
        if item.category == "irrelevance":
            continue
        for pick in (0, 1):
            for kind in kinds:
                calls = _answer_calls(item, pick)
                calls = calls if kind == "none" else _mutate(calls, kind, rng)
                reference = ast_checker(
                    copy.deepcopy(item.functions),
                    [{name: copy.deepcopy(args)} for name, args in calls],
                    copy.deepcopy(item.answer),
                    python,
                    stems[item.category],
                    "qwenkit",
                )["valid"]
                ours = tooluse.check(item, calls).valid
                cases, valid = cases + 1, valid + reference
                if ours != reference:
                    differ.append((item.id, kind, calls))
    assert cases == 1000 * 2 * len(kinds) and 0.3 * cases < valid < 0.7 * cases  # both verdicts well mixed
    assert differ == []


# ---- whole runs on a steered model ----------------------------------------------------------------


class ScriptBook(ScriptedModel):
    """Several scripted replies at once, each keyed by its prompt's length (the prompts' windows must not
    overlap): a batch of tool requests gets the replies a trained model might give."""

    def __init__(self, inner: torch.nn.Module, end_id: int) -> None:
        super().__init__(inner, end_id)
        self.book: dict[int, list[int]] = {}

    def forward(self, ids, *, positions, logits_index, **kwargs):
        logits = self.inner(ids, positions=positions, logits_index=logits_index, **kwargs)
        self.steer(logits, positions, logits_index, list(self.book.items()))
        return logits


def call_text(*calls: tuple[str, dict]) -> str:
    return "\n".join(
        f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls
    )


REPLIES = {  # one item per category, chosen so that the scripted windows do not overlap
    "simple_python_1": call_text(("math.factorial", {"number": 5})),
    "multiple_0": call_text(("circle_properties.get", {"radius": 3})),  # the wrong function
    "parallel_2": "<think>\nTwo metals.\n</think>\n\n"
    + call_text(
        ("calculate_resistance", {"length": 5, "area": 0.01, "resistivity": "aluminum"}),
        ("calculate_resistance", {"length": 5, "area": 0.01}),  # copper is the default
    ),
    "parallel_multiple_1": "I cannot do that.",
    "irrelevance_0": call_text(("determine_body_mass_index", {"weight": 70, "height": 1.8})),
}
EXPECTED = {  # id: (correct, selected, called)
    "simple_python_1": (True, True, True),
    "multiple_0": (False, False, True),
    "parallel_2": (True, True, True),
    "parallel_multiple_1": (False, False, False),
    "irrelevance_0": (False, False, True),
}


@pytest.fixture(scope="module")
def bfcl_subset(tmp_path_factory) -> Path:
    """The chosen items in BFCL's own layout (what --data takes), copied from the wheel."""
    root = tmp_path_factory.mktemp("bfcl")
    (root / "possible_answer").mkdir()
    for stem in tooluse.CATEGORIES.values():
        for sub in ("", "possible_answer/"):
            if sub and stem == "irrelevance":
                continue
            name = f"{sub}BFCL_v4_{stem}.json"
            lines = data.read_member(data.BFCL, member=data.BFCL.member + name).decode().splitlines()
            kept = [line for line in lines if json.loads(line)["id"] in REPLIES]
            (root / name).write_text("\n".join(kept) + "\n")
    return root


@pytest.fixture(scope="module")
def steered_local(tiny_chat_model, items):
    """A tiny model that answers each chosen item with its scripted reply, all in one batch."""
    loaded = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=8, progress=False)
    model = ScriptBook(loaded.model, loaded.tokenizer.added_tokens["<|im_end|>"])
    llm = LLM(model, loaded.tokenizer, max_batch_size=8, max_seq_len=2048)
    spans = []
    for item_id, reply in REPLIES.items():
        item = items[item_id]
        prompt = llm.tokenizer.apply_chat_template(item.messages, tools=tooluse.openai_tools(item.functions))
        seq = [*llm.tokenizer.encode(reply, allow_special=True), model.end_id]
        model.book[len(prompt)] = seq
        spans.append((len(prompt), len(prompt) + len(seq)))
    spans.sort()
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans)), "scripted windows overlap"
    return llm


def run_rows(backend, data_dir: Path, tmp_path: Path) -> tuple[dict, list[dict]]:
    settings = Settings(task="tooluse", data=str(data_dir), max_new_tokens=120, batch_size=8)
    results = run(backend, settings, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    return results, rows


def test_local_run_scores_the_parsed_calls(steered_local, bfcl_subset, tmp_path):
    results, rows = run_rows(LocalBackend(steered_local, batch_size=8), bfcl_subset, tmp_path)
    assert [r["id"] for r in rows] == list(REPLIES)
    for r in rows:
        assert (r["correct"], r["selected"], r["called"]) == EXPECTED[r["id"]], r
    parallel = rows[2]
    assert parallel["thinking"] == "Two metals." and parallel["output"] == REPLIES["parallel_2"]
    assert [json.loads(c["arguments"]) for c in parallel["calls"]] == [
        {"length": 5, "area": 0.01, "resistivity": "aluminum"},
        {"length": 5, "area": 0.01},
    ]
    assert rows[3]["content"] == "I cannot do that." and rows[3]["calls"] == []
    s = results["scores"]
    assert s["acc"] == pytest.approx(0.5) and s["acc_micro"] == pytest.approx(0.5)  # 2 of 4 AST categories
    assert s["selection"] == pytest.approx(0.5) and s["false_positive_rate"] == 1.0
    assert results["record"]["data"] == str(bfcl_subset)
    # rescoring from the samples alone gives the same scores
    same = json.dumps(rescore_dir(tmp_path)["scores"], sort_keys=True) == json.dumps(s, sort_keys=True)
    assert same  # NaN standard errors (one item) compare equal as text


def test_endpoint_run_through_qwenkit_serve_matches_local(
    tiny_chat_model, steered_local, bfcl_subset, tmp_path
):
    local_rows = run_rows(LocalBackend(steered_local), bfcl_subset, tmp_path / "local")[1]
    with steered_server(tiny_chat_model) as served:
        live, llm, pending = served
        pending.append(llm.tokenizer.encode("hi", allow_special=True))  # the run's system_fingerprint ask
        for reply in REPLIES.values():
            pending.append(llm.tokenizer.encode(reply, allow_special=True))
        results, rows = run_rows(EndpointBackend(live.url, concurrency=1), bfcl_subset, tmp_path / "endpoint")
    assert results["record"]["backend"] == "endpoint"
    for local, remote in zip(local_rows, rows, strict=True):
        assert (remote["correct"], remote["selected"], remote["called"]) == EXPECTED[remote["id"]]
        assert [(c["name"], json.loads(c["arguments"])) for c in remote["calls"]] == [
            (c["name"], json.loads(c["arguments"])) for c in local["calls"]
        ]
    assert json.loads(rows[2]["output"])["reasoning_content"] == "Two metals."


def test_cli_tooluse_one_line_errors(tiny_chat_model, capsys):
    args = ["eval", str(tiny_chat_model), "--task", "tooluse", "--subjects", "exec_simple"]
    assert qwenkit_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown tool-use categories: exec_simple") and err.count("\n") == 1
    assert qwenkit_main(["eval", str(tiny_chat_model), "--task", "tooluse", "--method", "loglik"]) == 2
    assert "drop --method loglik" in capsys.readouterr().err


def test_a_template_without_tools_goes_through_react(tiny_chat_model, items, bfcl_subset, tmp_path):
    """Qwen v1's ChatML cannot render tools: the ReAct instruction is the prompt, ``Observation:`` the stop
    word, and ``Action``/``Action Input`` the call -- as the server does it."""
    loaded = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=2, progress=False)
    loaded.tokenizer.chat_template = chatml_template()
    model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens["<|im_end|>"])
    llm = LLM(model, loaded.tokenizer, max_batch_size=2, max_seq_len=2048)
    item = items["simple_python_1"]
    functions = [t["function"] for t in tooluse.openai_tools(item.functions)]
    prompt = llm.tokenizer.apply_chat_template(react_messages(item.messages, functions))
    text = llm.tokenizer.decode(prompt)
    assert "Action: the action to take, should be one of [math.factorial]" in text and '"object"' in text
    reply = 'Thought: a factorial.\nAction: math.factorial\nAction Input: {"number": 5}\nObservation: 120'
    model.play(len(prompt), llm.tokenizer.encode(reply))
    settings = Settings(task="tooluse", data=str(bfcl_subset), subjects=["simple"], max_new_tokens=60)
    results = run(LocalBackend(llm), settings, tmp_path, progress=False)
    row = json.loads((tmp_path / "samples.jsonl").read_text())
    assert row["output"].endswith('Action Input: {"number": 5}\n')  # cut at the stop word
    assert row["calls"] == [{"name": "math.factorial", "arguments": '{"number": 5}'}]
    assert row["content"] == "a factorial." and row["correct"] and results["scores"]["acc"] == 1.0


def test_an_irrelevance_only_run_prints_its_scores():
    """`--subjects irrelevance` has no AST category, so no micro AST accuracy: the summary leaves that line
    out (it used to end the run in a TypeError traceback after results.json was written)."""
    from qwenkit.cli.eval import format_results

    rows = [{"subject": "irrelevance", "correct": c, "selected": c} for c in (False, True, True)]
    results = {"task": "tooluse", "scores": tooluse.aggregate(rows), "record": {"method": "chat-tools"}}
    assert format_results(results).splitlines() == [
        "tooluse: chat-tools ()",
        "  overall  66.67 ± 33.33  (irrelevance accuracy (1 - false-positive rate), n=3)",
        "  irrelevance: false-positive rate 33.33",
        "  irrelevance      66.67 ± 33.33  (n=3, selection 66.67)",
    ]


def test_a_resumed_run_notices_an_edited_tool_use_template(tiny_chat_model, bfcl_subset, tmp_path, capsys):
    """A model with a "default" and a "tool_use" template renders "tool_use" for BFCL's items: the run's
    recorded template hash covers it, so resuming after it was edited is refused (the hash was the default
    one's alone, and the run went on mixing prompts of two templates). A run without tools keeps the
    default's hash, the value runs have always recorded."""
    plain = "{%- for m in messages %}{{ m.content }}\n{% endfor %}"
    model = with_named_templates(tiny_chat_model, tmp_path / "model", plain)
    tool_use = (model / "additional_chat_templates" / "tool_use.jinja").read_text()
    out = tmp_path / "run"
    args = ["eval", str(model), "--task", "tooluse", "--data", str(bfcl_subset), "--subjects", "simple"]
    args += ["--limit", "1", "--max-new-tokens", "2", "--dtype", "float32", "--no-progress"]
    assert qwenkit_main([*args, "--output", str(out)]) == 0
    recorded = json.loads((out / "results.json").read_text())["record"]["chat_template_sha256"]
    assert recorded != sha256_text(plain)
    capsys.readouterr()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use + "{#- edited #}")
    assert qwenkit_main([*args, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another model (chat_template_sha256 differs)" in err and err.count("\n") == 1
    tok = load_tokenizer(model)
    assert results_module.chat_template_sha256(tok, tools=False) == sha256_text(plain)
    assert results_module.chat_template_sha256(tok, tools=True) == sha256_text(
        f"{plain}\0tool_use\0{tok.chat_template_for([])}"
    )
