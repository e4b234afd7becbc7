"""One-line notes to the user on stderr, each said once per process however often its cause recurs.

A leaf like ``errors.py``: every layer may use it. A server loads a model more than once (adapters,
tensor-parallel ranks, tests), and a note repeated per load reads as a new problem each time.
"""

from __future__ import annotations

import sys
from functools import cache


@cache
def say_once(note: str) -> None:
    """Print ``qwenkit: <note>`` to stderr unless this process already printed it."""
    print(f"qwenkit: {note}", file=sys.stderr)
