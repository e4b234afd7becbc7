"""Run untrusted Python (model-written code) in an isolated child process; never in ours.

API (stable; the evaluation harness and the code-interpreter tool both use it)::

    run_python(code, *, timeout=10.0, memory_mb=1024, max_output=64_000, workdir=None, stdin=None,
               cpu_seconds=None, max_file_mb=16, max_processes=32, python=None) -> SandboxResult

    SandboxResult(ok, exit_code, stdout, stderr, timed_out, reason, output_truncated, isolation,
                  wall_seconds)

``ok`` is True only for a clean exit (status 0) *after the whole program ran*: the child prints a
per-run random token once ``code`` has finished, and the token is never in the program text, its
files, its environment or its command line. A program that exits early (``sys.exit(0)``,
``os._exit(0)``), prints "passed", or is killed is therefore not ok. ``reason`` says why not in a few
words ("timeout", "exit status 1", "killed by SIGKILL", "no completion token").

Isolation, each step degrading with one logged warning where the system does not allow it:

- rlimits (``prlimit``): address space ``memory_mb``, CPU seconds, file size ``max_file_mb`` (this also
  caps what stdout/stderr can grow to), open files, no core dumps, and ``max_processes`` processes;
- a new network namespace (no network at all), a new PID namespace (the child sees only its own
  processes, and they all die with it), a new IPC namespace (a System V shared memory segment or
  message queue it leaves vanishes with it), and a new mount namespace in which ``/tmp``, ``/var/tmp``,
  ``/dev/shm`` and ``/run/lock`` are small private tmpfs mounts (writes there vanish with the run); when
  we are not root, inside a user namespace of the run's own (where the system allows unprivileged ones),
  the program left without capabilities there so that it cannot undo the mounts;
- when we are root: a dedicated unprivileged uid per run, no other run's in any process (so it cannot
  write outside its directory or read files only root may read, and the process limit applies),
  ``no_new_privs``;
- a scrubbed environment, ``python -I`` (no user site, no ``PYTHON*`` variables), its own private
  working directory (deleted afterwards unless the caller gave ``workdir``; one a caller killed with
  ``kill -9`` left is swept by the next run: ``qwenkit.sandbox_scratch``);
- a wall-clock timeout that kills the whole process group (and, through the PID namespace, every
  process the program started, even one that left the group).

This stops accidents and naive cheating (the catalogue in tests/test_sandbox.py). A program that
deliberately inspects the interpreter's own frames could still find the token; a container or VM is
the answer to a hostile model, and the docs say so.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from qwenkit.sandbox_scratch import claim_harness

log = logging.getLogger(__name__)

# The child reads its program (and the token) from an inherited file descriptor, runs it as __main__,
# and only then prints the token: the token never appears in any file or argument the program can read.
# An uncaught exception is reported as `python program.py` reports it: from the program's own first frame
# (not the bootstrap's), with its source lines (from linecache: the program has no file), then status 1
# (raised, not sys.exit, which the program could have replaced).
_BOOTSTRAP = """\
import os, sys
def _run(fd):
    with os.fdopen(fd, "rb") as f:
        spec = f.read()
    import json, linecache
    spec = json.loads(spec)
    source = spec.pop("code")
    linecache.cache["program.py"] = (len(source), None, source.splitlines(True), "program.py")
    tail = ("\\n" + spec.pop("token") + "\\n").encode()
    del spec
    try:
        code = compile(source, "program.py", "exec")
        del source
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except Exception as e:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        raise SystemExit(1) from None
    sys.stdout.flush()
    os.write(1, tail)
_run(int(sys.argv[1]))
"""

# Inside the new mount namespace: private tmpfs over the world-writable directories (/run/lock too: the
# sandbox uid could fill the disk under it, and what it wrote stayed), then the run's directory bound back
# at its own path (it lives under /tmp, which the tmpfs just hid). The source is the working directory the
# child starts in, taken as is: mount would canonicalize a path (even /proc/self/fd/N) to its name, which
# by then names an empty directory in the tmpfs, so HOME and absolute paths missed the caller's files.
# The interpreter's environment, where the tmpfs would hide it too (its venv under /tmp: $1, from
# ``_hidden_prefix``), is bound back read-only from a descriptor opened before the tmpfs covered it.
_MOUNT_SCRIPT = """\
set -e
keep=$1
shift
[ -z "$keep" ] || exec 8<"$keep"
for d in $COVERED; do
  [ -d "$d" ] && [ ! -L "$d" ] && mount -t tmpfs -o size=16m,mode=1777,nosuid,nodev tmpfs "$d"
done
mkdir -p "$QK_WORK"
mount --no-canonicalize --bind . "$QK_WORK"
if [ -n "$keep" ]; then
  mkdir -p "$keep"
  mount --no-canonicalize --bind /proc/self/fd/8 "$keep"
  mount -o remount,bind,ro,nosuid,nodev "$keep"
  exec 8<&-
fi
exec "$@"
"""
COVERED = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # private tmpfs mounts in the run's namespace
_MOUNT_SCRIPT = _MOUNT_SCRIPT.replace("$COVERED", " ".join(COVERED))


def _hidden_prefix(interpreter: str) -> str:
    """The interpreter's environment (a venv: the directory above its bin/) where a private tmpfs would
    hide it (a checkout under /tmp), for the mount script to bind back read-only; else ""."""
    prefix = os.path.abspath(os.path.dirname(os.path.dirname(interpreter)))
    return prefix if any(prefix.startswith(d + "/") for d in COVERED) else ""


UID_BASE = 61000  # dedicated uids for runs when we are root (61000 .. 61999)
UID_COUNT = 1000
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class SandboxResult:
    ok: bool  # clean exit after the whole program ran
    exit_code: int | None  # negative: killed by that signal; None: never started
    stdout: str
    stderr: str
    timed_out: bool
    reason: str  # "" when ok, else a few words
    output_truncated: bool = False
    isolation: tuple[str, ...] = ()  # in force: "rlimits", "netns", "pidns", "ipcns", "mountns", "uid"
    wall_seconds: float = 0.0


def run_python(
    code: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_output: int = 64_000,
    workdir: Path | None = None,
    stdin: str | None = None,
    cpu_seconds: int | None = None,
    max_file_mb: int = 16,
    max_processes: int = 32,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a fresh isolated Python; see the module docstring."""
    token = secrets.token_hex(16)
    own_workdir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="qwenkit-sandbox-")) if own_workdir else Path(workdir).resolve()
    claimed = claim_harness(work if own_workdir else None)  # swept by the next run if we are killed
    harness = claimed.path  # 0700, ours: the program cannot read it
    work.mkdir(parents=True, exist_ok=True)
    uid = _run_uid() if _can_drop_privileges() else None
    mode: int | None = None  # the caller's directory's own, while the run's uid holds it
    try:
        spec_path = harness / "spec.json"
        spec_path.write_text(json.dumps({"code": code, "token": token}))
        out_path, err_path = harness / "stdout", harness / "stderr"
        mode = _lend_workdir(work, uid) if uid is not None else None
        with (
            open(spec_path, "rb") as spec_file,
            open(out_path, "wb") as out_file,
            open(err_path, "wb") as err_file,
        ):
            spec_path.unlink()  # the open descriptor is the only way left to the program text
            argv, isolation = _command(
                python,
                uid,
                (spec_file.fileno(),),
                memory_mb=memory_mb,
                cpu_seconds=cpu_seconds or max(1, int(timeout) + 1),
                max_file_mb=max(max_file_mb, -(-max_output // 2**20)),
                max_processes=max_processes,
            )
            start = time.monotonic()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=out_file,
                stderr=err_file,
                cwd=work,
                env=_child_env(work),
                pass_fds=(spec_file.fileno(),),
                start_new_session=True,
            )
            timed_out = _wait(proc, stdin, timeout)
            wall = time.monotonic() - start
        if uid is not None:
            _kill_uid(uid)  # anything that escaped the group and the PID namespace
        code = _status_under_unshare(proc.returncode, err_path)
        finished = _ends_with(out_path, f"\n{token}\n".encode())
        stdout, out_truncated = _read_capped(
            out_path, max_output, strip_tail=len(token) + 2 if finished else 0
        )
        stderr, err_truncated = _read_capped(err_path, max_output, keep_end=True)  # the error is last
        return _verdict(
            code,
            stdout.replace(token, ""),
            stderr,
            finished,
            timed_out,
            out_truncated or err_truncated,
            isolation,
            wall,
        )
    finally:
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif mode is not None:
            _return_workdir(work, mode)
        claimed.release()
        if uid is not None:
            _release_uid(uid)


def _child_env(work: Path) -> dict[str, str]:
    """The scrubbed environment of a sandboxed child; the mount script reads QK_WORK."""
    return {
        "PATH": SAFE_PATH,
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "QK_WORK": str(work),
    }


def _verdict(
    code: int | None,
    stdout: str,
    stderr: str,
    finished: bool,
    timed_out: bool,
    truncated: bool,
    isolation: tuple[str, ...],
    wall: float,
) -> SandboxResult:
    if timed_out:
        reason = "timeout"
    elif code is None:
        reason = "did not start"
    elif code < 0 or (code > 128 and not finished):
        number = -code if code < 0 else code - 128
        try:
            reason = f"killed by {signal.Signals(number).name}"
        except ValueError:
            reason = f"killed by signal {number}"
    elif code != 0:
        reason = f"exit status {code}"
    elif not finished:
        reason = "no completion token (exited before the program finished)"
    else:
        reason = ""
    return SandboxResult(
        ok=not reason,
        exit_code=code,
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
        reason=reason,
        output_truncated=truncated,
        isolation=isolation,
        wall_seconds=wall,
    )


def _wait(proc: subprocess.Popen, stdin: str | None, timeout: float) -> bool:
    """Feed stdin, wait; on timeout kill the whole process group. True when it timed out."""
    try:
        if stdin is not None:
            proc.communicate(stdin.encode(), timeout=timeout)
        else:
            proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _command(
    python: str | None,
    uid: int | None,
    fds: tuple[int, ...],
    *,
    bootstrap: str = _BOOTSTRAP,
    memory_mb: int,
    cpu_seconds: int,
    max_file_mb: int,
    max_processes: int,
) -> tuple[list[str], tuple[str, ...]]:
    """The command line: prlimit -> unshare (namespaces + mounts) -> setpriv (uid) -> python -I running
    ``bootstrap`` with the inherited descriptors ``fds`` as its arguments."""
    interpreter = python or _interpreter(uid is not None)
    argv: list[str] = []
    isolation: list[str] = []
    if shutil.which("prlimit"):
        argv += [
            "prlimit",
            f"--as={memory_mb * 2**20}",
            f"--cpu={cpu_seconds}",
            f"--fsize={max_file_mb * 2**20}",
            "--nofile=64",
            "--core=0",
            f"--nproc={max_processes}",
            "--",
        ]
        isolation.append("rlimits")
    else:
        _warn_once("prlimit not found: the sandbox runs without resource limits")
    if _namespaces_work():
        keep = _hidden_prefix(interpreter)
        argv += [*_unshare(), "sh", "-c", _MOUNT_SCRIPT, "sandbox", keep, *_drop_namespace_root()]
        isolation += ["netns", "pidns", "ipcns", "mountns"]
    else:
        _warn_once(
            "cannot create namespaces (unshare; setpriv too when not root): "
            "the sandbox has network access and a shared /tmp"
        )
    if uid is not None:
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"]
        isolation.append("uid")
    argv += [interpreter, "-I", "-c", bootstrap, *map(str, fds)]
    return argv, tuple(isolation)


_uids_in_use: dict[int, int | None] = {}  # uid -> the descriptor holding its lock (None: no lock)
_uid_lock = threading.Lock()
UID_LOCKS = "qwenkit-sandbox-uids"  # in the temp directory: a flocked file per uid a run holds


def _run_uid() -> int:
    """A uid no other run is using, in this process or another: each run holds a flock on its uid's file,
    which the kernel drops when the process ends, however it ends. Two processes that picked one uid (two
    evaluations, a chat beside them) killed each other's programs with ``_kill_uid`` and shared files."""
    with _uid_lock:
        while True:
            uid = UID_BASE + secrets.randbelow(UID_COUNT)
            if uid in _uids_in_use:
                continue
            fd = _lock_uid(uid)
            if fd != -1:
                _uids_in_use[uid] = fd
                return uid


def _lock_uid(uid: int) -> int | None:
    """The descriptor holding ``uid``'s lock; -1 when another process holds it; None without a lock
    directory of our own (the uid is then unique in this process only)."""
    folder = Path(tempfile.gettempdir()) / UID_LOCKS
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise PermissionError(f"{folder} is not a private directory of ours")
        fd = os.open(folder / str(uid), os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        _warn_once(f"no uid lock directory ({e}): two qwenkit processes may pick one uid")
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def _release_uid(uid: int) -> None:
    with _uid_lock:
        fd = _uids_in_use.pop(uid, None)
        if fd is not None:
            os.close(fd)


@cache
def _can_drop_privileges() -> bool:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        if os.geteuid() == 0:
            _warn_once("setpriv not found: sandboxed programs run as root (no process limit)")
        return False
    return True


def _unshare() -> list[str]:
    """The namespaces' command. Not root, they are created inside a user namespace of their own (our
    uid as its root, no more rights outside), the one way the kernel lets an ordinary user have them:
    without it `qwenkit chat --code-interpreter` run by a user had the network and the real /tmp."""
    namespaces = ["--net", "--pid", "--ipc", "--fork", "--kill-child", "--mount", "--mount-proc"]
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, *namespaces]


def _drop_namespace_root() -> list[str]:
    """Not root, the program would run as its user namespace's root, with the capabilities to undo the
    mounts (``umount -l /tmp`` bared the real /tmp): once the mounts are made, every capability goes
    (an empty bounding set, so exec grants none) and it keeps uid 0 in name only."""
    if os.geteuid() == 0:
        return []
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"]


@cache
def _namespaces_work() -> bool:
    if os.geteuid() != 0 and not shutil.which("setpriv"):
        return False  # namespaces the program could undo (see _drop_namespace_root) are not isolation
    try:
        probe = subprocess.run(
            [*_unshare(), *_drop_namespace_root(), "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@cache
def _interpreter(other_user: bool) -> str:
    """This Python, or (when the program runs as another uid that cannot reach it) the system one."""
    if not other_user or _world_executable(Path(sys.executable)):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(candidate).exists() and _world_executable(Path(candidate)):
            log.info("sandbox: %s is not reachable by the sandbox uid; using %s", sys.executable, candidate)
            return candidate
    _warn_once("no Python reachable by an unprivileged uid; sandboxed programs will fail to start")
    return sys.executable


def _world_executable(path: Path) -> bool:
    """True when every directory on the way to ``path`` is searchable, and it is executable, by others."""
    real = path.resolve()
    for part in [*reversed(real.parents), real]:
        mode = part.stat().st_mode
        if not mode & stat.S_IXOTH:
            return False
    return True


def _kill_uid(uid: int, patience: float = 5.0) -> None:
    """SIGKILL every process of the run's uid (kill -1 as that uid reaches exactly those), and wait
    until the kernel has reaped them, so a finished run leaves no process behind."""
    deadline = time.monotonic() + patience
    while _processes_of(uid) and time.monotonic() < deadline:
        subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", "kill", "-KILL", "-1"],
            capture_output=True,
            timeout=10,
        )
        time.sleep(0.02)


def _processes_of(uid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    found.append(int(name))
            except FileNotFoundError:
                pass
    return found


def _lend_workdir(work: Path, uid: int) -> int:
    """The run's directory to the run's uid alone (0700); the mode it had, for ``_return_workdir``."""
    mode = stat.S_IMODE(os.stat(work).st_mode)
    os.chown(work, uid, uid)
    os.chmod(work, 0o700)
    return mode


def _return_workdir(work: Path, mode: int) -> None:
    """A caller's directory, and what the run left in it, back to the caller, with the mode it had (a
    directory the user named kept the run's 0700)."""
    _chown_tree(work, os.getuid(), os.getgid())
    with contextlib.suppress(OSError):
        os.chmod(work, mode)


# Mode bits a run may not leave on what it hands back: a world-writable setgid directory (or a setuid
# file) the run made in a user's --code-dir kept its mode when it became the caller's (root's).
UNSAFE_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_IWGRP | stat.S_IWOTH


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """What a run owns under ``root`` (``root``, lent to it, and what it made) to ``uid``, without the run's
    unsafe mode bits; the caller's own files there keep their owner, group and mode (the run could change
    none of them). Links are not followed (the run's processes are gone: nothing can swap a file for a
    link in between)."""
    runs = range(UID_BASE, UID_BASE + UID_COUNT)  # a run's, or one a killed process never handed back
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            with contextlib.suppress(OSError):
                if os.lstat(name).st_uid not in runs:
                    continue
                os.lchown(name, uid, gid)
                info = os.lstat(name)
                if not stat.S_ISLNK(info.st_mode) and info.st_mode & UNSAFE_BITS:
                    os.chmod(name, stat.S_IMODE(info.st_mode) & ~UNSAFE_BITS)


# What util-linux's unshare (2.38) says when a SIGKILL ended its child (the OOM killer's, or the caller's
# kill of the run's uid): it cannot pass that signal on, so it writes this into the program's stderr and
# exits 1, which read as the program's own "exit status 1" (and "the interpreter exited (status 1)").
UNSHARE_SIGKILL = b"unshare: sigprocmask unblock failed: Invalid argument\n"


def _status_under_unshare(code: int | None, err_path: Path) -> int | None:
    """The exit status of the program under ``unshare``: -SIGKILL where unshare could not say so (its
    words are taken out of the program's stderr), else ``code``."""
    if code != 1 or not _ends_with(err_path, UNSHARE_SIGKILL):
        return code
    with open(err_path, "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) - len(UNSHARE_SIGKILL))
    return -signal.SIGKILL


def _ends_with(path: Path, tail: bytes) -> bool:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < len(tail):
            return False
        f.seek(size - len(tail))
        return f.read() == tail


def _read_capped(path: Path, limit: int, strip_tail: int = 0, keep_end: bool = False) -> tuple[str, bool]:
    """The first ``limit`` bytes (less a known tail) as text, or with ``keep_end`` the last ``limit``
    (stderr: a traceback's last line names the error), and whether there was more. Only whole characters
    are kept where the cut falls inside one (not shown as U+FFFD)."""
    size = path.stat().st_size - strip_tail
    with open(path, "rb") as f:
        if keep_end and size > limit:
            f.seek(size - limit)
            data = f.read(limit)
            start = next((i for i in range(min(4, len(data))) if data[i] & 0xC0 != 0x80), 0)
            return data[start:].decode("utf-8", errors="replace"), True
        data = f.read(min(limit, size))
    if size > limit:
        return codecs.getincrementaldecoder("utf-8")("replace").decode(data), True
    return data.decode("utf-8", errors="replace"), False


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("sandbox: %s", message)
