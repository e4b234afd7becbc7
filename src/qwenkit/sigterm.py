"""SIGTERM (``kill``, ``timeout``, a container stop) as an exception, so a command unwinds before it exits.

The default action ends a process at once: no ``finally`` runs, so a half-written model directory stays
behind, and a command cannot say what it kept. While ``terminate_unwinds`` holds, SIGTERM raises
``Terminated`` in the main thread instead. A leaf like ``errors.py``: every layer may use it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(SystemExit):
    """SIGTERM arrived. Uncaught, the process exits 143 (128 + 15, what the default action reports) after
    the cleanup on the way ran; a command may catch it to say first what it kept. A SystemExit, so no
    ``except Exception`` on the way swallows it."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextmanager
def terminate_unwinds() -> Iterator[None]:
    """Have SIGTERM raise ``Terminated`` for the block's duration. A handler the program installed itself
    (the server's, or an outer block's) is left alone, and so is a thread other than the main one (only
    it may set handlers, and signals reach only it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def unwinding() -> bool:
    """Whether SIGTERM now raises ``Terminated`` (``terminate_unwinds`` holds, no other handler over it)."""
    return signal.getsignal(signal.SIGTERM) is _stop


def _stop(_signum: int, _frame: object) -> None:
    raise Terminated
