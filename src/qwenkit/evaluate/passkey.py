"""Long-context retrieval: a five-digit passkey hidden at a chosen depth of filler text, asked for at the end.

No long-context benchmark data (LongBench and the like) ships in a reachable package, so this is the
synthetic passkey-retrieval test that long-context reports use: reproducible (each key comes from a seeded
generator named by the item id), scored exactly (the first number in the reply equals the key), at prompt
lengths counted in the model's own tokens. Base models complete ``... The passkey is``; chat models get the
same text as one user message through their chat template.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.stats import mean_stderr

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
INTRO = (
    "A passkey is hidden somewhere in the long text below, among many sentences that do not matter. "
    "Find it and keep it in mind: you will be asked for it at the end.\n\n"
)
FILLER = "The wind moves over the field. The stones by the road are warm. A dog sleeps in the shade. "
NEEDLE = "The passkey is {key}. Keep it in mind: {key} is the passkey. "
QUESTION = "\n\nWhat is the passkey?"
BASE_ANSWER = " The passkey is"
CHAT_RESERVE = 64  # tokens the chat template adds around the user message, at most
BASE_MAX_TOKENS = 16  # a five-digit key and a full stop
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Needle:
    length: int  # tokens the prompt and the answer may take together
    depth: float  # 0: the needle opens the haystack; 1: it closes it
    trial: int

    @property
    def id(self) -> str:
        return f"passkey/{self.length}/{self.depth:g}/{self.trial}"

    @property
    def subject(self) -> str:
        return str(self.length)

    @property
    def key(self) -> str:
        return str(random.Random(self.id).randint(10000, 99999))


def needles(
    lengths: list[int] | None, depths: list[float] | None, trials: int, max_context: int | None
) -> list[Needle]:
    """The grid of items. Without ``lengths``: the default lengths the model's context holds."""
    if lengths is None:
        lengths = [n for n in LENGTHS if max_context is None or n <= max_context]
        if not lengths:
            raise EvalDataError(
                f"the model's context ({max_context} tokens) is shorter than 1024: pass --lengths"
            )
    elif max_context is not None and max(lengths) > max_context:
        raise EvalDataError(f"--lengths {max(lengths)} exceeds the model's context of {max_context} tokens")
    check_grid(lengths, depths, trials)
    depths = list(DEPTHS) if depths is None else depths
    # a length or depth given twice is one cell, as a subject given twice is one subject
    lengths, depths = list(dict.fromkeys(lengths)), list(dict.fromkeys(depths))
    return [Needle(n, d, t) for n in lengths for d in depths for t in range(trials)]


def check_grid(lengths: list[int] | None, depths: list[float] | None, trials: int) -> None:
    """Refuse a grid no model could fill (checked before the model loads, and again by ``needles``)."""
    short = [n for n in lengths or () if n < 256]
    if short:
        raise EvalDataError(f"--lengths must be at least 256 tokens, got {short[0]}")
    outside = [d for d in depths or () if not 0.0 <= d <= 1.0]  # nan too
    if outside:
        raise EvalDataError(f"--depths must lie between 0 and 1, got {outside[0]:g}")
    if trials < 1:
        raise EvalDataError(f"--trials must be at least 1, got {trials}")


def haystack(needle: Needle, units: int) -> str:
    """``units`` filler sentences with the needle after ``round(depth * units)`` of them."""
    before = round(needle.depth * units)
    return FILLER * before + NEEDLE.format(key=needle.key) + FILLER * (units - before)


def prompt_text(needle: Needle, units: int, chat: bool) -> str:
    text = INTRO + haystack(needle, units).rstrip() + QUESTION
    return text if chat else text + BASE_ANSWER


def build(needle: Needle, encode: Callable[[str], list[int]], chat: bool, max_tokens: int) -> tuple[str, int]:
    """The prompt and its token count: as many filler sentences as fit in ``length`` tokens with room for
    the answer (and, for chat, the template's own tokens)."""
    budget = needle.length - max_tokens - (CHAT_RESERVE if chat else 0)
    fixed = len(encode(prompt_text(needle, 0, chat)))
    per_unit = len(encode(FILLER * 64)) / 64
    units = max(0, int((budget - fixed) / per_unit))
    while True:
        text = prompt_text(needle, units, chat)
        n = len(encode(text))
        if n <= budget or units == 0:
            break
        units = max(0, units - 1 - int((n - budget) / per_unit))
    if n > budget:
        # the answer's room is the likelier culprit: chat runs keep --max-new-tokens (512 by default) free
        reserved = f"{max_tokens} tokens for the answer (--max-new-tokens)"
        reserved += f" and {CHAT_RESERVE} for the chat template" if chat else ""
        advice = "use longer --lengths or a smaller --max-new-tokens" if chat else "use longer --lengths"
        raise EvalDataError(
            f"passkey length {needle.length} leaves no room for filler beside {reserved}: {advice}"
        )
    return text, n


def extract(reply: str) -> str:
    """The first number in the reply (commas inside it removed); "" if none."""
    found = _NUMBER.search(reply.replace(",", ""))
    return found.group() if found else ""


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy over all items, per length and per depth, each with a standard error."""

    def group(key: str) -> dict[str, Any]:
        values: dict[Any, list[float]] = {}
        for r in rows:
            values.setdefault(r[key], []).append(float(r["correct"]))
        return {
            str(k): {"acc": mean_stderr(v)[0], "stderr": mean_stderr(v)[1], "n": len(v)}
            for k, v in sorted(values.items())
        }

    acc, se = mean_stderr([float(r["correct"]) for r in rows])
    return {
        "acc": acc,
        "stderr": se,
        "aggregation": "mean over items (every length and depth equally many)",
        "n": len(rows),
        "lengths": group("length"),
        "depths": group("depth"),
    }
