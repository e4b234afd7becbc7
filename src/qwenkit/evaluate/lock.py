"""One writer per run directory: two runs appending to one ``samples.jsonl`` would interleave their
rows (and a rescore would rewrite it under a run), so a run or rescore holds ``run.lock`` there.

``flock`` rather than a pid file: the kernel drops the lock when its holder dies, however it dies, so a
killed run never leaves the directory locked; the file keeps the holder's pid only to name it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qwenkit.evaluate.data import EvalDataError

LOCK = "run.lock"


class OutputInUseError(EvalDataError):
    """Another process is writing a run into the same directory."""


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the run directory ``out`` (which must exist) while inside, or refuse at once, naming the
    process that holds it."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise OutputInUseError(
                f"{out} is in use by another qwenkit eval (pid {holder}); wait for it to finish or give "
                "another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_free(out: Path) -> None:
    """Refuse now (before a model loads) if another run holds ``out``; nothing is held after."""
    if out.is_dir():
        with output_lock(out):
            pass
