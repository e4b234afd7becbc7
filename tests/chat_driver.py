"""How the chat tests drive `qwenkit chat`: through a pipe (``run_chat``) or on a pseudo-terminal
(``in_a_terminal``, whose ``Terminal`` reads what the chat shows), with the settings they share."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator

QWENKIT = [sys.executable, "-m", "qwenkit.cli"]


NO_END = {151643: -100, 151645: -100}  # the end tokens banned: the answer runs to max_tokens


def run_chat(model, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*QWENKIT, "chat", str(model), *args], input=script, capture_output=True, text=True, timeout=120
    )


class Terminal:
    """Reads a pseudo-terminal; text after a matched needle stays for the next wait (reads can merge)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pending = fd, b""

    def read_until(self, needle: bytes, timeout: float = 60.0) -> bytes:
        end = time.time() + timeout
        while needle not in self.pending:
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {needle!r}; got {self.pending[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.pending += os.read(self.fd, 4096)
                except OSError:
                    break
        cut = self.pending.index(needle) + len(needle)
        seen, self.pending = self.pending[:cut], self.pending[cut:]
        return seen

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def read_rest(self, proc: subprocess.Popen, timeout: float = 30.0) -> bytes:
        """Everything ``proc`` writes until it exits (read as it comes: a full terminal would block it)."""
        end = time.time() + timeout
        while time.time() < end:
            if not select.select([self.fd], [], [], 0.5)[0]:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # the process exited and its end of the terminal closed
                break
            if not data:
                break
            self.pending += data
        rest, self.pending = self.pending, b""
        return rest


@contextlib.contextmanager
def in_a_terminal(argv: list[str]) -> Iterator[tuple[subprocess.Popen, Terminal]]:
    """``argv`` run on a pseudo-terminal (standard error a pipe), killed and closed however the test ends."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, close_fds=True)
    os.close(slave)
    try:
        yield proc, Terminal(master)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
