"""Calibration data for GPTQ that works offline: the help topics shipped with CPython.

``pydoc_data/topics.py`` is ~0.5 MB of real English prose with code (the language reference), present in
every CPython install. Tokenizing is the caller's job (the tokenizer lives elsewhere), so this module
takes a ``tokenize`` function and returns token-id windows.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol


class CalibrationTokenizer(Protocol):
    """What calibration needs of a tokenizer (``qwenkit.tokenizer``'s are such; quant/ sits below them)."""

    sequence_special_ids: tuple[tuple[int, ...], tuple[int, ...]]  # ids put before and after a prompt

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]: ...


def default_calibration_text() -> str:
    """All pydoc topics joined in a fixed order (sorted by name), so runs are reproducible."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def calibration_token_ids(
    tokenize: Callable[[str], list[int]],
    n_samples: int = 128,
    seq_len: int = 512,
    text: str | None = None,
    seed: int = 0,
    start_ids: Sequence[int] = (),
) -> list[list[int]]:
    """``n_samples`` windows of ``seq_len`` tokens drawn (seeded) from ``text`` (default: pydoc topics).

    Each window begins with ``start_ids``, the ids the tokenizer puts before every prompt (Llama's BOS),
    as AutoGPTQ's calibration examples do: a layer is calibrated on the activations it will see, and a
    BOS position's are unlike any text token's. Short texts give fewer windows rather than repeating
    data, and all of their tokens: a text of fewer than ``n_samples`` windows ends in a shorter one.
    """
    start = list(start_ids)
    ids = tokenize(default_calibration_text() if text is None else text)
    span = seq_len - len(start)
    if span < 1:
        raise ValueError(f"a calibration window of {seq_len} tokens has no room after {len(start)} start ids")
    if len(ids) <= span:
        return [start + ids] if ids else []
    starts = list(range(0, len(ids) - span + 1, span))
    if len(starts) < n_samples and len(ids) % span:  # every window is taken: the tail is one more
        starts.append(len(ids) - len(ids) % span)
    random.Random(seed).shuffle(starts)
    return [start + ids[s : s + span] for s in sorted(starts[:n_samples])]
