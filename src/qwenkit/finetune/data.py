"""Training data files -> records in one shape: OpenAI ``messages`` (with tools), or plain ``text``.

Accepted per record (JSONL, one object a line; or a .json file holding a list of objects, or
one object a line as JSONL):

- ``{"messages": [{"role", "content", "tool_calls"?, "reasoning_content"?}, ...], "tools"?: [...]}``
- ``{"conversations": [{"from": "user"|"human"|"assistant"|"gpt"|"system", "value": ...}]}`` (Qwen's
  ``finetune.py`` and ShareGPT)
- ``{"text": "..."}`` for continued pre-training (every token is labelled)

Every problem is reported as ``FILE:LINE: field ...: what is wrong``; nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenkit.errors import QwenkitError
from qwenkit.jsonl import BadLine, NotAnArray, json_array, json_lines
from qwenkit.paths import not_a_file

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "observation": "tool",
    "tool": "tool",
}


class DataError(QwenkitError, ValueError):
    """A training file is unreadable or a record does not have the expected fields."""


@dataclass
class Record:
    """One example: chat ``messages`` (+ optional ``tools``) or plain ``text``; ``where`` is FILE:LINE."""

    where: str
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    text: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def read_objects(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``FILE:LINE``, object) for each record of a JSONL file, or of a .json file (a list, or JSONL)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a JSONL (or .json) data file")
    if (why := not_a_file(path)) is not None:
        raise DataError(f"{path}: no such file" if why == "does not exist" else f"{path} {why}")
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
        try:
            for line, item in json_array(text):
                where = f"{path}:{line}"  # the line the record starts on, as a JSONL record's
                if not isinstance(item, dict):
                    raise DataError(f"{where}: each record must be a JSON object")
                yield where, item
            return
        except BadLine as e:
            raise DataError(f"{path}:{e.line}: {e.problem}") from None
        except NotAnArray:
            pass  # one object a line under a .json name (as `datasets` reads it, and `filter` writes it)
    try:
        for n, obj in json_lines(data):
            yield f"{path}:{n}", obj
    except BadLine as e:
        hint = (
            " (a .json data file holds a list of records, or one record a line)"
            if path.suffix == ".json"
            else ""
        )
        raise DataError(f"{path}:{e.line}: {e.problem}{hint}") from None


def read_records(path: str | Path) -> list[Record]:
    """All records of a data file, checked; an empty file is an error."""
    records = [to_record(where, obj) for where, obj in read_objects(path)]
    if not records:
        raise DataError(f"{path}: no records")
    return records


def to_record(where: str, obj: dict[str, Any]) -> Record:
    if "messages" in obj:
        messages = check_messages(where, obj["messages"], "messages")
        tools = obj.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise DataError(f"{where}: field 'tools' must be a list of objects")
        return Record(where, messages=messages, tools=tools, raw=obj)
    if "conversations" in obj:
        return Record(where, messages=conversations_to_messages(where, obj["conversations"]), raw=obj)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}: field 'text' must be a non-empty string")
        return Record(where, text=obj["text"], raw=obj)
    keys = ", ".join(sorted(obj)) or "none"
    raise DataError(f"{where}: expected a 'messages', 'conversations' or 'text' field (found: {keys})")


def check_messages(where: str, messages: Any, name: str, need_assistant: bool = True) -> list[dict[str, Any]]:
    """OpenAI-shaped messages with known roles and string content (None only beside tool calls)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{name}' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        f = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{f}' must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: field '{f}.role' is {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI text parts, joined as chat requests join them
            content = _joined_parts(where, f, content)
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            said = "is null" if "content" in m else "is missing"  # null only beside an assistant's calls
            raise DataError(f"{where}: field '{f}.content' {said}")
        if content is not None and not isinstance(content, str):
            raise DataError(f"{where}: field '{f}.content' must be a string")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise DataError(f"{where}: field '{f}.tool_calls' must be a list on an assistant message")
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise DataError(f"{where}: field '{f}.tool_calls[{j}].function.name' is missing")
        out.append({**m, "content": content or ""})  # templates read .content even beside tool calls
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field '{name}' has no assistant turn to learn from")
    return out


def _joined_parts(where: str, field: str, parts: list[Any]) -> str:
    """A content of OpenAI text parts as one string (the server's join); another part is refused by index."""
    from qwenkit.tokenizer import TokenizerError
    from qwenkit.tokenizer.chat_template import join_text_parts

    texts = []
    for j, part in enumerate(parts):
        try:
            texts.append(join_text_parts([{"content": [part]}])[0]["content"])
        except TokenizerError:
            raise DataError(
                f"{where}: field '{field}.content[{j}]' must be a text part "
                f'({{"type": "text", "text": "..."}}), got {part!r:.60}'
            ) from None
    return "".join(texts)


def sharegpt_turn(where: str, turn: Any, name: str) -> dict[str, Any]:
    """One Qwen/ShareGPT ``{"from", "value"}`` turn as an OpenAI message; ``name`` is its field's path."""
    if not isinstance(turn, dict):
        raise DataError(f"{where}: field '{name}' must be an object")
    who = turn.get("from")
    if who not in SHAREGPT_ROLES:
        raise DataError(
            f"{where}: field '{name}.from' is {who!r}; expected one of {', '.join(SHAREGPT_ROLES)}"
        )
    if not isinstance(turn.get("value"), str):
        raise DataError(f"{where}: field '{name}.value' must be a string")
    return {"role": SHAREGPT_ROLES[who], "content": turn["value"]}


def conversations_to_messages(where: str, turns: Any, need_assistant: bool = True) -> list[dict[str, Any]]:
    """Qwen/ShareGPT ``from``/``value`` turns -> OpenAI messages."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list")
    messages = [sharegpt_turn(where, t, f"conversations[{i}]") for i, t in enumerate(turns)]
    return check_messages(where, messages, "conversations", need_assistant)
