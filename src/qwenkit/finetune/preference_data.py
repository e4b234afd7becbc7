"""Preference pairs for DPO: each record is a prompt and two replies, rendered with the chat template.

The formats the field's tools write, one pair a JSONL line (or a .json list):

- trl's explicit prompt: ``{"prompt", "chosen", "rejected"}``, each a string or a list of messages (the
  replies end with an assistant message), or ``{"messages": [prompt turns], "chosen", "rejected"}``.
- trl's implicit prompt: ``{"chosen": [conversation], "rejected": [conversation]}``, two whole conversations
  that share every turn before their last reply (Anthropic HH's layout).
- LLaMA-Factory's alpaca style: ``{"instruction", "input"?, "chosen", "rejected", "system"?, "history"?}``
  (the prompt is instruction and input joined by a newline; ``history`` is ``[[query, reply], ...]``).
- LLaMA-Factory's ShareGPT style: ``{"conversations": [from/value turns], "chosen": {"from": "gpt",
  "value"}, "rejected": {...}, "system"?}``.

The completion is the last assistant turn and the template's text after it (the ``\n`` after its
``<|im_end|>``, which trl's completion holds): only its tokens are labelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenkit.finetune.data import (
    DataError,
    check_messages,
    conversations_to_messages,
    read_objects,
    sharegpt_turn,
)
from qwenkit.finetune.encode import IGNORE, encode_messages
from qwenkit.finetune.trainer import n_targets
from qwenkit.tokenizer import Tokenizer, TokenizerError


@dataclass
class Completion:
    ids: list[int]
    labels: list[int]

    @property
    def targets(self) -> int:
        """The completion's length: tokens predicted and labelled."""
        return n_targets(self)


@dataclass
class PreferencePair:
    chosen: Completion
    rejected: Completion
    where: str = ""
    truncated: bool = False  # a reply was cut at --max-len, losing its end (counted, as finetune's cuts)

    @property
    def chosen_ids(self) -> list[int]:
        return self.chosen.ids

    @property
    def rejected_ids(self) -> list[int]:
        return self.rejected.ids


def _reply(where: str, value: Any, name: str) -> dict[str, Any]:
    """A reply given as a string, one message (role/content or from/value) or messages ending in one."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict):
        value = [sharegpt_turn(where, value, name) if "from" in value else value]
    if not isinstance(value, list):  # check_messages would say "a non-empty list", hiding the string form
        raise DataError(
            f"{where}: field '{name}' must be a string, a message or a list of messages "
            f"(got {type(value).__name__})"
        )
    msgs = check_messages(where, value, name)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{name}' must end with an assistant message")
    return msgs[-1]


def _text(where: str, obj: dict[str, Any], name: str) -> str:
    value = obj.get(name, "")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string")
    return value


def _alpaca_prompt(where: str, obj: dict[str, Any]) -> list[dict[str, Any]]:
    instruction, extra = _text(where, obj, "instruction"), _text(where, obj, "input")
    if not instruction and not extra:
        raise DataError(f"{where}: fields 'instruction' and 'input' are both empty")
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history
    ):
        raise DataError(f"{where}: field 'history' must be a list of [query, reply] string pairs")
    turns = [
        {"role": role, "content": text} for q, a in history for role, text in (("user", q), ("assistant", a))
    ]
    return [*turns, {"role": "user", "content": "\n".join(t for t in (instruction, extra) if t)}]


def _split_conversations(where: str, obj: dict[str, Any]) -> tuple[list[dict[str, Any]], dict, dict]:
    """trl's implicit prompt: the turns both conversations share, and each one's last reply."""
    chosen = check_messages(where, obj["chosen"], "chosen")
    rejected = check_messages(where, obj["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(
            f"{where}: without a 'prompt', 'chosen' and 'rejected' must be whole conversations that share "
            "every turn before their last reply"
        )
    if len(chosen) < 2:
        raise DataError(f"{where}: field 'chosen' has no prompt turns before its reply (add a 'prompt')")
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{name}' must end with an assistant message")
    return chosen[:-1], chosen[-1], rejected[-1]


def pair_messages(where: str, obj: dict[str, Any]) -> tuple[list[dict[str, Any]], dict, dict]:
    """(prompt messages, chosen reply, rejected reply) of one record in any of the module's formats."""
    for name in ("chosen", "rejected"):
        if name not in obj:
            raise DataError(f"{where}: field '{name}' is missing")
    if "prompt" in obj:
        p = obj["prompt"]
        if isinstance(p, str):
            if not p:
                raise DataError(f"{where}: field 'prompt' is empty")
            prompt = [{"role": "user", "content": p}]
        else:
            prompt = check_messages(where, p, "prompt", need_assistant=False)
    elif "messages" in obj:
        prompt = check_messages(where, obj["messages"], "messages", need_assistant=False)
    elif "conversations" in obj:
        prompt = conversations_to_messages(where, obj["conversations"], need_assistant=False)
    elif "instruction" in obj or "input" in obj:
        prompt = _alpaca_prompt(where, obj)
    elif isinstance(obj["chosen"], list) and isinstance(obj["rejected"], list):
        return _split_conversations(where, obj)
    else:
        raise DataError(
            f"{where}: expected a 'prompt', 'messages', 'conversations' or 'instruction' field with 'chosen' "
            "and 'rejected', or 'chosen' and 'rejected' as whole conversations"
        )
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{where}: field 'system' must be a string")
        if system and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system}, *prompt]
    return prompt, _reply(where, obj["chosen"], "chosen"), _reply(where, obj["rejected"], "rejected")


def completion_labels(ids: list[int], labels: list[int]) -> list[int]:
    """The completion's labels: the last labelled run (the final reply and its ``<|im_end|>``; the prompt's
    own replies are context) and every token the template renders after it (the ``\n`` after
    ``<|im_end|>``), as trl's DPO takes the completion to be all of prompt + reply past the prompt."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return [IGNORE] * start + ids[start:]


def encode_pair(tokenizer: Tokenizer, where: str, obj: dict[str, Any], max_len: int) -> PreferencePair | None:
    """The pair's two token sequences, or None where a completion does not start within ``max_len``."""
    prompt, *replies = pair_messages(where, obj)
    seqs, truncated = [], False
    for reply in replies:
        try:
            ids, labels = encode_messages(tokenizer, [*prompt, reply], obj.get("tools"))
        except TokenizerError as e:
            raise DataError(f"{where}: {e}") from None
        labels = completion_labels(ids, labels)[:max_len]
        if all(label == IGNORE for label in labels[1:]):
            return None
        seqs.append(Completion(ids[:max_len], labels))
        truncated |= len(ids) > max_len
    return PreferencePair(seqs[0], seqs[1], where, truncated)


def load_pairs(
    tokenizer: Tokenizer, path: str | Path, max_len: int
) -> tuple[list[PreferencePair], dict[str, int]]:
    pairs, dropped, truncated = [], 0, 0
    for where, obj in read_objects(path):
        pair = encode_pair(tokenizer, where, obj, max_len)
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
            truncated += pair.truncated
    if not pairs and not dropped:  # not "within --max-len": there was nothing to cut
        raise DataError(f"{path}: no records")
    if not pairs:
        raise DataError(f"{path}: no preference pair has a completion within --max-len {max_len}")
    return pairs, {"pairs": len(pairs), "truncated": truncated, "dropped": dropped}
