"""A missing or malformed --data is refused before the model loads (which takes minutes for a large one):
given a model that cannot load at all, the data's error is what the user sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenkit.cli import main as qwenkit_main

CASES = [
    # (task, files under data/, what --data names, extra options, message with {d} for --data)
    ("gsm8k", {}, "test.jsonl", [], "GSM8K file {d} does not exist (expected test.jsonl)"),
    (
        "gsm8k",
        {"t.jsonl": '{"question": "x"\n'},
        "t.jsonl",
        [],
        "{d} line 1: invalid JSON: Expecting ',' delimiter (column 17)",
    ),
    ("humaneval", {"h.jsonl": "[]\n"}, "h.jsonl", [], "{d} line 1: not a JSON object (an array)"),
    (
        "humaneval",
        {},
        ".",
        [],
        "HumanEval file {d}/HumanEval.jsonl.gz does not exist (expected HumanEval.jsonl.gz)",
    ),
    (  # Qwen's chat prompt quotes the docstring: a problem without one is refused before the model loads
        "humaneval",
        {
            "h.jsonl": '{"task_id": "X/0", "prompt": "def f(x):\\n", "entry_point": "f", '
            '"canonical_solution": "    return x\\n", "test": "def check(c):\\n    assert c(1) == 1\\n"}\n'
        },
        "h.jsonl",
        ["--method", "generate"],
        "X/0: no signature or docstring for f",
    ),
    (
        "mmlu",
        {"data/test/README": "x"},
        ".",
        ["--shots", "0"],
        "{d} (test) holds no mmlu items: nothing to evaluate",
    ),
    (  # a dev split with fewer rows than --shots: refused, never run as fewer shots recorded as 5
        "mmlu",
        {
            "data/test/anatomy_test.csv": "What is x?,a,b,c,d,A\n",
            "data/dev/anatomy_dev.csv": "Q1?,a,b,c,d,B\nQ2?,a,b,c,d,C\n",
        },
        ".",
        [],
        "--shots 5 needs 5 dev examples per subject; {d} dev has fewer for anatomy (2)",
    ),
    (
        "ceval",
        {},
        ".",
        ["--shots", "0"],
        "no C-Eval val split under {d} (expected val/<subject>_val.csv)",
    ),
    (
        "tooluse",
        {},
        ".",
        ["--subjects", "simple"],
        "BFCL file {d}/BFCL_v4_simple_python.json does not exist (point --data at bfcl_eval/data)",
    ),
    ("ppl", {}, "corpus.txt", [], "perplexity needs a text file: {d} does not exist"),
]


@pytest.mark.parametrize(("task", "files", "given", "extra", "message"), CASES)
def test_the_data_error_comes_before_the_model_loads(tmp_path, capsys, task, files, given, extra, message):
    root = tmp_path / "data"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    data = str(root / given) if given != "." else str(root)
    missing_model = tmp_path / "no-such-model"
    argv = ["eval", str(missing_model), "--task", task, "--data", data, *extra, "--no-progress"]
    assert qwenkit_main(argv) == 2
    assert capsys.readouterr().err == "error: " + message.format(d=data) + "\n"


def test_good_data_then_the_model_error(tmp_path, capsys):
    """The model's own error still comes when the data is fine (the data is read first, not instead)."""
    data = Path(tmp_path / "test.jsonl")
    data.write_text('{"question": "What is 2+2?", "answer": "#### 4"}\n')
    argv = ["eval", str(tmp_path / "no-such-model"), "--task", "gsm8k", "--data", str(data)]
    assert qwenkit_main(argv) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'no-such-model'} does not exist\n"


def test_the_model_is_not_loaded_for_bad_data(tiny_chat_model, tmp_path, capsys, monkeypatch):
    """With a model that would load, it is never loaded: the data is refused first."""
    from qwenkit.generate import LLM

    loads = []
    monkeypatch.setattr(LLM, "load", classmethod(lambda cls, *a, **k: loads.append(a)))
    data = tmp_path / "t.jsonl"
    data.write_bytes(b'{"question": "x", "answer": "#### 1"}\n{"question": "\xff"}\n')
    argv = [
        "eval",
        str(tiny_chat_model),
        "--task",
        "gsm8k",
        "--data",
        str(data),
        "--output",
        str(tmp_path / "o"),
    ]
    assert qwenkit_main(argv) == 2
    assert capsys.readouterr().err == f"error: {data} line 2: not valid UTF-8 (byte 14 of the line)\n"
    assert loads == [] and not (tmp_path / "o").exists()
