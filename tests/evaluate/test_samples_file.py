"""samples.jsonl holds one row per item: a row written twice (two runs appended the same item) is kept
once when a run resumes or rescores, and two different rows for one item are refused."""

from __future__ import annotations

import json

import pytest

from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.runner import Settings, rescore_dir, run

SETTINGS = Settings(task="gsm8k", limit=3, max_new_tokens=4)


@pytest.fixture
def finished(local, tmp_path):
    out = tmp_path / "run"
    run(local, SETTINGS, out, progress=False)
    return out


def lines(out) -> list[str]:
    return (out / "samples.jsonl").read_text().splitlines()


def test_a_row_written_twice_counts_once_on_resume(local, finished):
    rows = lines(finished)
    (finished / "samples.jsonl").write_text("\n".join([*rows, rows[0], rows[2]]) + "\n")
    again = run(local, SETTINGS, finished, progress=False)
    assert again["timing"]["items_run"] == 0 and again["scores"]["n"] == 3
    assert lines(finished) == rows  # the file holds each item once again


def test_a_row_written_twice_counts_once_on_rescore(finished):
    rows = lines(finished)
    (finished / "samples.jsonl").write_text("\n".join([rows[1], *rows]) + "\n")
    assert rescore_dir(finished)["scores"]["n"] == 3
    assert sorted(lines(finished)) == sorted(rows)


def test_two_different_rows_for_one_item_are_refused(local, finished):
    rows = lines(finished)
    other = {**json.loads(rows[0]), "output": "something else"}
    (finished / "samples.jsonl").write_text("\n".join([*rows, json.dumps(other)]) + "\n")
    item = json.loads(rows[0])["id"]
    message = f"has two different rows for '{item}' \\(lines 1 and 4\\): keep one of them"
    with pytest.raises(EvalDataError, match=message):
        run(local, SETTINGS, finished, progress=False)
    with pytest.raises(EvalDataError, match=message):
        rescore_dir(finished)
    assert len(lines(finished)) == 4  # nothing was dropped on the user's behalf


def test_a_row_holding_a_line_separator_is_read_back(local, finished):
    """Rows are written with ensure_ascii=False, so a model's U+2028 or U+0085 stands raw in the line:
    resuming and rescoring read it as one row (str.splitlines cut it in two and refused the run)."""
    rows = lines(finished)
    odd = {**json.loads(rows[1]), "output": "first\u2028second\x85third"}
    text = "\n".join([rows[0], json.dumps(odd, ensure_ascii=False), rows[2]]) + "\n"
    (finished / "samples.jsonl").write_text(text, encoding="utf-8")
    again = run(local, SETTINGS, finished, progress=False)
    assert again["timing"]["items_run"] == 0 and again["scores"]["n"] == 3
    assert rescore_dir(finished)["scores"]["n"] == 3
    assert (finished / "samples.jsonl").read_text(encoding="utf-8") == text  # nothing rewritten


def test_a_last_row_cut_inside_a_character_is_dropped_and_run_again(local, finished):
    """A kill (or a full disk) can cut the last row inside a multi-byte character: resuming drops that row
    and runs its item again (it was a UnicodeDecodeError traceback)."""
    rows = lines(finished)
    cut = {**json.loads(rows[2]), "output": "答案是 18"}
    data = json.dumps(cut, ensure_ascii=False).encode()
    data = data[: data.index("答".encode()) + 1]  # one byte of a three-byte character
    (finished / "samples.jsonl").write_bytes(("\n".join(rows[:2]) + "\n").encode() + data)
    again = run(local, SETTINGS, finished, progress=False)
    assert again["timing"]["items_run"] == 1 and again["scores"]["n"] == 3
    assert lines(finished) == rows  # greedy: the item's row is the one the first run wrote


def test_a_row_that_is_not_utf8_before_the_last_is_one_line(local, finished):
    rows = lines(finished)
    (finished / "samples.jsonl").write_bytes(
        f"{rows[0]}\n".encode() + b"\xff\xfe\n" + f"{rows[2]}\n".encode()
    )
    with pytest.raises(EvalDataError, match=r"samples.jsonl line 2 is not UTF-8 text$"):
        run(local, SETTINGS, finished, progress=False)
    with pytest.raises(EvalDataError, match=r"samples.jsonl line 2 is not UTF-8 text$"):
        rescore_dir(finished)


def test_a_last_row_cut_just_before_its_newline_is_kept_and_the_next_rows_start_a_line(local, finished):
    """A kill that cuts the file right after a row's closing brace leaves a whole row without its newline:
    it is kept, and the rows the resumed run appends go on lines of their own (they were glued to it,
    so the next read dropped both as one cut line, or refused the run as 'line 2 is not JSON')."""
    rows = lines(finished)
    (finished / "samples.jsonl").write_text("\n".join(rows[:2]))  # rows 1 and 2, no final newline
    again = run(local, SETTINGS, finished, progress=False)
    assert again["timing"]["items_run"] == 1 and again["scores"]["n"] == 3
    assert [json.loads(line)["id"] for line in lines(finished)] == [json.loads(r)["id"] for r in rows]
    assert rescore_dir(finished)["scores"]["n"] == 3
    grown = run(local, Settings(task="gsm8k", limit=4, max_new_tokens=4), finished, progress=False)
    assert grown["timing"]["items_run"] == 1 and len(lines(finished)) == 4
