"""JSON-lines files (one JSON object a line): the one reader of benchmark data (``evaluate``) and training
data (``finetune``), so a bad line is refused the same way, with its line number, wherever it is read.

A leaf like ``errors.py``: it imports nothing of qwenkit, so every layer may use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false"}


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's pairs as a dict; a key given twice is refused (``json.loads`` keeps the last value, so a
    turn's ``"role"`` written twice would silently change whose turn it is)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


# tokenizer/base.py's LONE_SURROGATE (this leaf imports no qwenkit module): JSON's "\ud800" escape parses
# to a string that is no Unicode text, which no tokenizer encodes and no UTF-8 file can hold
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _surrogate_problem(value: Any, path: str = "") -> str | None:
    """Why ``value`` is no text where a string in it holds a lone surrogate (its field path), else None."""
    if isinstance(value, str):
        found = _LONE_SURROGATE.search(value)
        if found is None:
            return None
        code = f"\\u{ord(found.group()):04x}"
        return f"field '{path}' holds a lone UTF-16 surrogate ({code}), which is no text (half of a pair?)"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        problem = _surrogate_problem(key, where) if isinstance(key, str) else None
        if problem := problem or _surrogate_problem(item, where):
            return problem
    return None


class BadLine(ValueError):
    """Line ``line`` (1-based) is not one JSON object; ``problem`` says how. Each reader names the file
    in its own way (``FILE:LINE:`` for training data, ``FILE line N`` for benchmark data) and raises its
    own error type, so this one never reaches a user."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line
        self.problem = problem


def json_lines(raw: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of ``raw``, or BadLine at the first bad one.

    Lines end at ``\\n`` only: ``str.splitlines`` would also cut at U+2028, U+0085 and the like, which a
    JSON string may hold unescaped (``json.dumps(..., ensure_ascii=False)`` writes them so). Each line is
    decoded alone, so a byte that is not UTF-8 is named by its line. A key given twice in one object is
    refused rather than resolved to one of its values. A UTF-8 byte-order mark before the first line (as
    Windows editors save) is skipped."""
    for n, line in enumerate(raw.removeprefix(BOM).split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadLine(n, f"not valid UTF-8 (byte {e.start} of the line)") from None
        try:
            value = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise BadLine(n, f"invalid JSON: {e.msg} (column {e.colno})") from None
        except _DuplicateKey as e:
            raise BadLine(n, str(e)) from None
        if not isinstance(value, dict):
            kind = "null" if value is None else _JSON_TYPES[type(value)]
            raise BadLine(n, f"not a JSON object ({kind})")
        if _SURROGATE_ESCAPE.search(text) and (problem := _surrogate_problem(value)):
            raise BadLine(n, problem)
        yield n, value


_SPACE = re.compile(r"[ \t\n\r]*")


class NotAnArray(ValueError):
    """The text does not start with ``[`` (a .json training file may hold JSON lines instead)."""


def json_array(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, item) for each item of ``text``, one JSON array, or BadLine at the first bad one.

    Each item is decoded alone, so a key given twice (refused as in ``json_lines``) is named by the line
    its item starts on. NotAnArray, before any item, where ``text`` does not start with ``[``."""
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)
    text = text.removeprefix(BOM.decode())  # a byte-order mark, as Windows editors save one
    pos = _SPACE.match(text).end()
    if not text.startswith("[", pos):
        raise NotAnArray
    pos = _SPACE.match(text, pos + 1).end()
    line, counted = 1, 0  # newlines are counted once, up to `counted`
    escapes = _SURROGATE_ESCAPE.search(text) is not None

    def line_at(at: int) -> int:
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, at), at
        return line

    if not text.startswith("]", pos):
        while True:
            start = line_at(pos)
            try:
                item, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise BadLine(e.lineno, f"invalid JSON: {e.msg}") from None
            except _DuplicateKey as e:
                raise BadLine(start, str(e)) from None
            if escapes and (problem := _surrogate_problem(item)):
                raise BadLine(start, problem)
            yield start, item
            pos = _SPACE.match(text, pos).end()
            if not text.startswith(",", pos):
                break
            pos = _SPACE.match(text, pos + 1).end()
        if not text.startswith("]", pos):
            raise BadLine(line_at(pos), "invalid JSON: Expecting ',' delimiter")
    pos = _SPACE.match(text, pos + 1).end()
    if pos < len(text):
        raise BadLine(line_at(pos), "invalid JSON: Extra data")
