"""Start an HTTP server as a child process on 127.0.0.1, wait for its /health, and always stop it."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; the message ends with the tail of its log."""


@dataclass
class ManagedServer:
    """One server process: ``argv`` must make it listen on 127.0.0.1:``port``."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    startup_s: float = 0.0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> None:
        """Launch and block until GET /health answers 200 (llama-server answers 503 while loading)."""
        log = self.log_path.open("wb")
        start = time.perf_counter()
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()  # the child holds its own descriptor
        deadline = start + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(f"{self.name} exited with {self.process.returncode}{self._log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    self.startup_s = time.perf_counter() - start
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerFailed(f"{self.name} not healthy after {timeout_s:.0f} s{self._log_tail()}")

    def rss_bytes(self) -> int:
        """Resident memory of the server process and its children."""
        if self.process is None or self.process.poll() is not None:
            return 0
        proc = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far (to spot busy-waiting when idle)."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; only this server's own process."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"; log {self.log_path}:\n" + "\n".join(tail)
