"""One build per cache entry at a time: a process that finds another one compiling the same entry waits
on the entry's lock file and takes its result; a dead holder blocks nobody; a stuck one is waited for a
bounded time."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from test_kernel_build import LEVEL, cache_files, fake_cache, needs_isa  # noqa: F401

from qwenkit.kernels import build

HOLDER = """
import fcntl, hashlib, os, sys, time
from pathlib import Path
lock, entry, then, seconds = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(seconds)
if then == "store":  # what a finished build leaves: the library and its checksum, renamed into place
    tmp = entry.with_name("." + entry.name + ".holder")
    tmp.mkdir()
    (tmp / "qwenkit_cpu_kernels.so").write_bytes(b"built by the holder")
    digest = hashlib.sha256((tmp / "qwenkit_cpu_kernels.so").read_bytes()).hexdigest()
    (tmp / "qwenkit_cpu_kernels.so.sha256").write_text(digest + "\\n")
    tmp.rename(entry)
elif then == "die":
    os.kill(os.getpid(), 9)
"""


def hold(entry, then: str, seconds: float) -> subprocess.Popen:
    """A process that takes ``entry``'s lock and says so, then after ``seconds`` stores an entry of its
    own ("store"), is killed ("die") or just lets go ("leave")."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = entry.parent / f".{entry.name}.lock"
    cmd = [sys.executable, "-c", HOLDER, str(lock), str(entry), then, str(seconds)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"  # bounded: the holder prints at once or exits
    return proc


@pytest.fixture
def entry(fake_cache):  # noqa: F811
    return build.cache_root() / build.cache_key(build.compiler_version(build.compiler()), LEVEL)


@needs_isa
def test_a_process_waits_for_the_build_under_way_and_takes_its_result(fake_cache, entry, capsys):  # noqa: F811
    """The entry's lock is held by a process compiling it: this one waits (saying so once), then loads
    what that one stored instead of compiling too (it used to compile at once: two 30 s builds)."""
    holder = hold(entry, "store", 1.0)
    try:
        start = time.monotonic()
        lib = build.ensure_built(LEVEL)
        assert lib == entry / build.LIBRARY_NAME and lib.read_bytes() == b"built by the holder"
        assert time.monotonic() - start >= 0.5  # it waited for the holder
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert fake_cache == []  # no compile here
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qwenkit: another process is building the {LEVEL} CPU kernels; waiting"
    ]
    assert [p.name for p in cache_files(entry.parent)] == [entry.name]


@needs_isa
def test_a_lock_left_by_a_killed_process_does_not_block(fake_cache, entry, capsys):  # noqa: F811
    """The holder dies mid-build (kill -9): the kernel drops its lock, and the next build goes ahead at
    once, without waiting, and compiles the entry itself."""
    holder = hold(entry, "die", 0.0)
    assert holder.wait(timeout=30) == -9
    start = time.monotonic()
    assert build.ensure_built(LEVEL) == entry / build.LIBRARY_NAME
    assert time.monotonic() - start < 5 and len(fake_cache) == 1
    assert "waiting" not in capsys.readouterr().err


@needs_isa
def test_a_stuck_holder_is_waited_for_a_bounded_time(fake_cache, entry, monkeypatch, capsys):  # noqa: F811
    """A holder alive but stuck (stopped, hung on a network file system): after LOCK_WAIT seconds this
    process builds beside it, as it did before there was a lock, and says so."""
    monkeypatch.setattr(build, "LOCK_WAIT", 0.5)
    holder = hold(entry, "leave", 120.0)
    try:
        start = time.monotonic()
        assert build.ensure_built(LEVEL) == entry / build.LIBRARY_NAME
        assert 0.5 <= time.monotonic() - start < 30 and len(fake_cache) == 1
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qwenkit: another process is building the {LEVEL} CPU kernels; waiting",
        "qwenkit: gave up waiting for the other build after 0.5 s",
        f"qwenkit: building the {LEVEL} CPU kernels once into {entry} (about 30 s)",
    ]
