"""``--compare``: one row per run directory (runs of one model and precision no longer overwrite each
other), differences judged only between like runs, perplexity shown, endpoint and dotted model names
labelled whole."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from qwenkit.cli import main as qwenkit_main
from qwenkit.evaluate.compare import compare
from qwenkit.evaluate.runner import Settings

MODEL = {"backend": "local", "model_path": "/models/Qwen2.5-0.5B-Instruct", "dtype": "bfloat16"}


def write_run(root: Path, name: str, scores: dict, settings: Settings, **record) -> Path:
    out = root / name
    out.mkdir()
    results = {
        "task": settings.task,
        "scores": scores,
        "record": {**MODEL, **record, "settings": asdict(settings)},
    }
    (out / "results.json").write_text(json.dumps(results))
    return out


def test_one_row_per_directory_and_unlike_runs_are_not_marked(tmp_path):
    mmlu = Settings(task="mmlu", limit=10)
    runs = [
        write_run(tmp_path, "bf16", {"acc": 0.60, "stderr": 0.01, "n": 570}, mmlu),
        write_run(
            tmp_path, "bf16-again", {"acc": 0.55, "stderr": 0.01, "n": 570}, mmlu
        ),  # same model + dtype
        write_run(tmp_path, "int4", {"acc": 0.50, "stderr": 0.01, "n": 570}, mmlu, quantization="int4"),
        write_run(
            tmp_path,
            "int4-5",
            {"acc": 0.40, "stderr": 0.02, "n": 285},
            Settings(task="mmlu", limit=5),
            quantization="int4",
        ),
    ]
    lines = compare(runs).splitlines()
    rows = {line.split()[0]: line for line in lines[1:5]}
    assert list(rows) == ["bf16", "bf16-again", "int4", "int4-5"]
    assert "Qwen2.5-0.5B-Instruct bfloat16" in rows["bf16-again"]  # the model's name whole, not cut at a dot
    assert rows["bf16"].endswith("60.00±1.00")
    assert rows["bf16-again"].endswith("55.00±1.00 (-5.00*)")  # beyond sqrt(1² + 1²)
    assert rows["int4"].split()[1:] == ["Qwen2.5-0.5B-Instruct", "int4", "50.00±1.00", "(-10.00*)"]
    assert rows["int4-5"].endswith("40.00±2.00 (-20.00!)")  # 285 questions against 570: no verdict
    assert lines[-2] == "! not like the first run of the task, so no difference is marked:"
    assert lines[-1] == "  int4-5 (mmlu) differs from bf16: limit 5 vs 10, n 285 vs 570"


def test_perplexity_and_endpoint_runs(tmp_path):
    ppl = Settings(task="ppl", data="corpus.txt", window=48, stride=16)
    scores = {
        "token_perplexity": 12.3456,
        "byte_perplexity": 2.1,
        "bits_per_byte": 1.07,
        "tokens_scored": 900,
    }
    local = write_run(tmp_path, "local", scores, ppl)
    remote = write_run(
        tmp_path,
        "served",
        {**scores, "token_perplexity": 12.5},
        ppl,
        backend="endpoint",
        url="http://127.0.0.1:8000",
        model="qwen2.5",
    )
    bare = write_run(
        tmp_path, "bare", scores, ppl, backend="endpoint", url="http://127.0.0.1:8000", model=None
    )
    lines = compare([local, remote, bare]).splitlines()
    assert lines[0].split() == ["run", "model", "ppl"]
    assert lines[1].split() == ["local", "Qwen2.5-0.5B-Instruct", "bfloat16", "12.346"]
    assert lines[2].split() == ["served", "qwen2.5", "@", "127.0.0.1:8000", "12.500", "(+0.154)"]  # never "*"
    assert lines[3].split()[:2] == ["bare", "127.0.0.1:8000"]
    assert "ppl: perplexity per token (lower is better; no standard error)" in lines


def test_the_same_run_twice_and_one_name_in_two_places(tmp_path, capsys):
    settings = Settings(task="gsm8k", limit=3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_run(tmp_path / "a", "gsm8k", {"acc": 1 / 3, "stderr": 0.33, "n": 3}, settings)
    second = write_run(tmp_path / "b", "gsm8k", {"acc": 2 / 3, "stderr": 0.33, "n": 3}, settings)
    assert qwenkit_main(["eval", "--compare", str(first), str(second), str(second / "results.json")]) == 0
    labels = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:4]]
    assert labels == [str(first), str(second), f"{second / 'results.json'}"]
    twice = compare([first, first]).splitlines()  # one directory given twice: numbered
    assert [line.split("  ")[0] for line in twice[1:3]] == [str(first), f"{first} #2"]


def test_a_damaged_results_file_is_one_line(tmp_path, capsys):
    """A results.json of another shape (edited by hand, another tool's, another task) is refused in one
    line naming it, never a traceback."""
    good = write_run(tmp_path, "good", {"acc": 0.5, "stderr": 0.1, "n": 4}, Settings(task="mmlu"))
    for n, text in enumerate(
        [
            '{"task": "mmlu", "scores": [], "record": {}}',
            '{"task": "mmlu", "scores": {}, "record": []}',
            '{"task": "squad", "scores": {}, "record": {}}',
            '{"task": "mmlu", "scores": {}, "record": {"settings": [1]}}',
            '{"results": {"gsm8k": {}}}',
            "[1]",
        ]
    ):
        bad = tmp_path / f"bad{n}.json"
        bad.write_text(text)
        assert qwenkit_main(["eval", "--compare", str(good), str(bad)]) == 2
        assert capsys.readouterr().err == f"error: {bad} is not a qwenkit eval results file\n"
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    assert qwenkit_main(["eval", "--compare", str(binary)]) == 2
    assert capsys.readouterr().err == f"error: {binary} is not a qwenkit eval results file\n"


def test_runs_of_edited_data_are_not_like(tmp_path):
    """Two runs of one --data path whose items differ (the file was edited between them) are not judged
    against each other; a run recorded before items were hashed is taken as like."""
    gsm8k = Settings(task="gsm8k", data="test.jsonl")
    scores = {"acc": 0.5, "stderr": 0.01, "n": 100}
    runs = [
        write_run(tmp_path, "a", scores, gsm8k, items_sha256="1" * 64),
        write_run(tmp_path, "b", {**scores, "acc": 0.4}, gsm8k, items_sha256="2" * 64),
        write_run(tmp_path, "c", {**scores, "acc": 0.4}, gsm8k),
    ]
    lines = compare(runs).splitlines()
    assert lines[2].endswith("40.00±1.00 (-10.00!)") and lines[3].endswith("40.00±1.00 (-10.00*)")
    assert lines[-1] == "  b (gsm8k) differs from a: items 222222222222 vs 111111111111"


def test_a_run_without_results_says_why(tmp_path, capsys):
    """A directory whose run was stopped before its end has samples but no results.json yet; a typo names
    nothing. Each says so, where both used to be "<dir>/results.json is not a results file"."""
    good = write_run(tmp_path, "good", {"acc": 0.5, "stderr": 0.1, "n": 4}, Settings(task="mmlu"))
    unfinished, empty, missing = tmp_path / "unfinished", tmp_path / "empty", tmp_path / "typo"
    unfinished.mkdir()
    (unfinished / "samples.jsonl").write_text('{"id": "virology/test/0"}\n')
    empty.mkdir()
    for path, message in (
        (
            unfinished,
            f"{unfinished} holds an unfinished run (samples, no results.json yet): rerun its command to "
            "finish it, or give finished runs",
        ),
        (empty, f"{empty} has no results.json: not a qwenkit eval --output directory"),
        (missing, f"{missing} does not exist"),
    ):
        assert qwenkit_main(["eval", "--compare", str(good), str(path)]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


def test_gguf_runs_are_labelled_by_the_model_not_the_first_part_of_a_split_file(tmp_path):
    ppl = Settings(task="ppl", data="corpus.txt", window=48, stride=16)
    scores = {"token_perplexity": 9.0, "tokens_scored": 900}
    split = write_run(tmp_path, "a", scores, ppl, model_path="/m/Qwen2.5-72B-Q4_K_M-00001-of-00002.gguf")
    whole = write_run(tmp_path, "b", scores, ppl, model_path="/m/Qwen2.5-0.5B.gguf")
    lines = compare([split, whole]).splitlines()
    assert lines[1].split()[:2] == ["a", "Qwen2.5-72B-Q4_K_M"]
    assert lines[2].split()[:2] == ["b", "Qwen2.5-0.5B"]


def test_questions_without_an_answer_are_unscored_not_wrong(tmp_path):
    """C-Eval's test split publishes no answers: a run of it has no accuracy, and its cell said "-", as
    for a task not run; a run with some such questions named none of them. Both say "unscored"."""
    val, test = Settings(task="ceval", split="val"), Settings(task="ceval", split="test")
    runs = [
        write_run(tmp_path, "val", {"acc": 0.5, "stderr": 0.1, "n": 20}, val),
        write_run(tmp_path, "test", {"acc": None, "stderr": None, "n": 0, "unanswered": 30}, test),
        write_run(tmp_path, "mixed", {"acc": 0.25, "stderr": 0.1, "n": 20, "unanswered": 5}, test),
    ]
    lines = compare(runs).splitlines()
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert rows["test"].endswith("  unscored")
    assert rows["mixed"].endswith("25.00±10.00 (-25.00!)")  # another split: no verdict
    at = lines.index("unscored: questions without an answer in the data (C-Eval's test split is graded by")
    assert lines[at + 1 : at + 4] == [
        "  submission): predictions only, counted neither right nor wrong",
        "  test (ceval): 30 unscored",
        "  mixed (ceval): 5 unscored",
    ]
