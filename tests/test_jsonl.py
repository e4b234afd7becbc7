"""One JSON-lines reader for benchmark and training data: the same line is refused with the same problem
by both, each naming the file and line its own way, and a JSON string may hold any character."""

from __future__ import annotations

import json

import pytest

from qwenkit.evaluate import gsm8k
from qwenkit.evaluate.data import EvalDataError
from qwenkit.finetune.data import DataError, read_records

GOOD = b'{"text": "fine", "question": "q", "answer": "#### 1"}\n'


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b'{"text": "cut', "invalid JSON: Unterminated string starting at (column 10)"),
        (b"[1, 2]", "not a JSON object (an array)"),
        (b'"a string"', "not a JSON object (a string)"),
        (b"null", "not a JSON object (null)"),
        (b'{"text": "caf\xe9"}', "not valid UTF-8 (byte 13 of the line)"),
        # json.loads keeps the last value: this user turn silently became an assistant reply to learn
        (
            b'{"messages": [{"role": "user", "content": "hi", "role": "assistant"}]}',
            "the key 'role' appears twice in one object",
        ),
        (
            b'{"text": "a", "question": "q", "answer": "#### 1", "answer": "#### 2"}',
            "the key 'answer' appears twice in one object",
        ),
        # JSON's escape of half a surrogate pair (an emoji cut in two) parses to no text: it reached the
        # tokenizer (a TypeError traceback), or `filter`'s UTF-8 output (UnicodeEncodeError)
        (
            b'{"text": "a\\ud800b"}',
            "field 'text' holds a lone UTF-16 surrogate (\\ud800), which is no text (half of a pair?)",
        ),
        (
            b'{"messages": [{"role": "user", "content": "\\uDC00"}]}',
            "field 'messages[0].content' holds a lone UTF-16 surrogate (\\udc00), which is no text (half of "
            "a pair?)",
        ),
    ],
)
def test_benchmark_and_training_readers_refuse_a_line_alike(tmp_path, line, problem):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + b"\n" + line + b"\n")  # a blank line between: line numbers count it
    with pytest.raises(EvalDataError) as bench:
        gsm8k.read_jsonl(path)
    assert str(bench.value) == f"{path} line 3: {problem}"
    with pytest.raises(DataError) as train:
        read_records(path)
    assert str(train.value) == f"{path}:3: {problem}"


def test_line_separators_inside_json_strings_are_text(tmp_path):
    """U+2028, U+2029 and U+0085 may stand unescaped in a JSON string (Python's ensure_ascii=False writes
    them so); a reader that cut lines with str.splitlines took each for a line end."""
    question = "first\u2028second\u2029third\x85fourth"
    rows = [{"question": question, "answer": "#### 4", "text": question}] * 2
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [p.question for p in gsm8k.read_jsonl(path)] == [question, question]
    assert [r.text for r in read_records(path)] == [question, question]
    assert [r.where for r in read_records(path)] == [f"{path}:1", f"{path}:2"]


def test_a_byte_order_mark_before_the_first_line_is_skipped(tmp_path):
    """Windows editors save UTF-8 with a BOM; json.loads refused the first line ("Unexpected UTF-8 BOM")."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + GOOD)
    assert [p.question for p in gsm8k.read_jsonl(path)] == ["q", "q"]
    assert [r.text for r in read_records(path)] == ["fine", "fine"]
    array = tmp_path / "d.json"
    array.write_bytes(b"\xef\xbb\xbf[" + GOOD.strip() + b"]")
    assert [r.text for r in read_records(array)] == ["fine"]


def test_a_whole_surrogate_pair_is_text_and_a_lone_half_in_a_json_list_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "smile \\ud83d\\ude00"}\n')
    assert read_records(path)[0].raw == {"text": "smile \U0001f600"}
    listed = tmp_path / "d.json"
    listed.write_bytes(b'[{"text": "fine"},\n {"text": "\\ud83d cut"}]')
    with pytest.raises(DataError) as e:
        read_records(listed)
    assert str(e.value) == (
        f"{listed}:2: field 'text' holds a lone UTF-16 surrogate (\\ud83d), which is no text "
        "(half of a pair?)"
    )


def test_a_bad_record_of_a_json_list_is_named_by_the_line_it_starts_on(tmp_path):
    """Once ``d.json:record 2``, counted from 0, where every other error names a line: a user counting
    records from 1 looked at the record before the bad one."""
    listed = tmp_path / "d.json"
    rows = [{"text": "one"}, {"text": "two"}, {"messages": [{"role": "robot", "content": "x"}]}]
    listed.write_text(json.dumps(rows, indent=2))
    with pytest.raises(DataError) as e:
        read_records(listed)
    starts = [n for n, text in enumerate(json.dumps(rows, indent=2).splitlines(), 1) if text == "  {"]
    assert str(e.value).startswith(f"{listed}:{starts[2]}: field 'messages[0].role' is 'robot'")
    listed.write_text('[\n{"text": "one"},\n{"text": "two"},\n"three"\n]')
    with pytest.raises(DataError, match=rf"^{listed}:4: each record must be a JSON object$"):
        read_records(listed)
