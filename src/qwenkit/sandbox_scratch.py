"""Harness directories of sandboxed runs, which a caller killed with ``kill -9`` cannot leave behind.

A run's harness (a 0700 directory of ours in the system temp directory, holding its output files) keeps
``owner.lock``, flocked by the creating process for the run's life, and the path of the scratch work
directory the run made for itself, if any. The kernel drops the lock when the process ends, however it
ends; the next run started by anyone of the same user sweeps harnesses whose lock is free, with their
work directories. A flock is seen across PID namespaces, where a check of the creator's pid would not be.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

HARNESS_PREFIX = "qwenkit-harness-"
WORKDIR_PREFIXES = ("qwenkit-kernel-", "qwenkit-sandbox-")  # the scratch work directories runs make
LOCK_NAME = "owner.lock"
WORKDIR_NOTE = "workdir"


@dataclass
class Harness:
    path: Path
    _lock_fd: int

    def release(self) -> None:
        """Remove the directory, then let go of the lock (a sweeper that takes it finds nothing)."""
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def claim_harness(own_workdir: Path | None = None) -> Harness:
    """A new harness directory, locked by this process; ``own_workdir``: the scratch work directory the
    run made, swept with the harness if this process dies without removing them."""
    sweep_stale_once()
    path = Path(tempfile.mkdtemp(prefix=HARNESS_PREFIX))
    # locked under another name, then renamed: a sweeper never sees an owner.lock that is not yet held
    pending = path / f"{LOCK_NAME}.new"
    fd = os.open(pending, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    if own_workdir is not None:
        (path / WORKDIR_NOTE).write_text(str(own_workdir))
    os.rename(pending, path / LOCK_NAME)
    return Harness(path, fd)


@cache
def sweep_stale_once() -> int:
    return sweep_stale()


def sweep_stale(root: Path | None = None) -> int:
    """Remove the harnesses (and their runs' scratch work directories) whose owner is gone; how many."""
    root = Path(root or tempfile.gettempdir())
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(HARNESS_PREFIX)]
    except OSError:
        return 0
    swept = 0
    for entry in entries:
        with contextlib.suppress(OSError):
            if _sweep(root, Path(entry.path)):
                swept += 1
    if swept:
        log.info("removed %d scratch directories left by sandboxed runs whose process was killed", swept)
    return swept


def _sweep(root: Path, harness: Path) -> bool:
    info = os.lstat(harness)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False
    try:
        fd = os.open(harness / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:  # being created, or left by an older qwenkit: not ours to judge
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its owner is alive
        note = harness / WORKDIR_NOTE
        if note.is_file() and not note.is_symlink():
            work = Path(note.read_text())
            if work.parent == root and work.name.startswith(WORKDIR_PREFIXES) and not work.is_symlink():
                shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(harness, ignore_errors=True)
        return True
    finally:
        os.close(fd)
