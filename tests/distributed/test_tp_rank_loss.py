"""A tensor-parallel run that loses a process mid-run ends in one line, not a traceback wall or orphans.

A rank killed while `generate`, `chat` or `serve` is decoding: the command prints the one line naming it
(the surviving ranks' failed collectives stay quiet) and exits 2. A launcher killed outright: its ranks
die with it instead of generating on, unseen."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from qwenkit.distributed.launch import free_port

QWENKIT = [sys.executable, "-m", "qwenkit.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "QWENKIT_RESPONSE_CACHE": "0"}
LONG = ["--max-new-tokens", "6000", "--temperature", "0", "--dtype", "float32", "--tensor-parallel", "2"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from factories import write_tiny_chat_model

    return str(write_tiny_chat_model(tmp_path_factory.mktemp("tp") / "chat", num_key_value_heads=2))


def ranks(proc: subprocess.Popen | psutil.Process) -> list[psutil.Process]:
    """The spawned ranks of a command, in the order they were started."""
    spawned = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    return sorted(spawned, key=lambda p: (p.create_time(), p.pid))


def start_decoding(argv: list[str]) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """Start ``argv`` and return once it has streamed some text (every rank is then decoding)."""
    proc = subprocess.Popen(
        argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    os.read(proc.stdout.fileno(), 1)  # blocks until the first streamed byte
    time.sleep(0.5)
    return proc, ranks(proc)


def assert_gone(procs: list[psutil.Process], within_s: float = 10) -> None:
    _, alive = psutil.wait_procs(procs, timeout=within_s)
    for p in alive:
        p.kill()
    assert not alive, f"ranks left running: {[p.pid for p in alive]}"


@pytest.mark.slow
def test_a_rank_killed_while_generating_is_one_line(model):
    proc, procs = start_decoding([*QWENKIT, "generate", model, "-p", "Tell me a story", *LONG])
    try:
        procs[1].kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2
    # rank 0's all-reduce failed too; it left quietly, the launcher names the rank that died
    assert err.decode().splitlines() == [
        "error: tensor-parallel rank 1 of 2 was killed by signal 9 (then rank(s) 0 stopped too)"
    ]
    assert_gone(procs)


@pytest.mark.slow
def test_a_rank_killed_while_chat_answers_is_one_line(model):
    proc, procs = start_decoding([*QWENKIT, "chat", model, "-p", "Tell me a story", *LONG])
    try:
        procs[0].kill()  # rank 1: the command's own process is rank 0
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2
    assert err.decode().splitlines() == ["error: tensor-parallel rank 1 of 2 was killed by signal 9"]
    assert_gone(procs)


@pytest.mark.slow
def test_a_killed_launcher_takes_its_ranks_with_it(model):
    proc, procs = start_decoding([*QWENKIT, "generate", model, "-p", "Tell me a story", *LONG])
    try:
        assert len(procs) == 2
        proc.kill()
        assert_gone(procs)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_a_rank_killed_while_serving_a_stream_drains_without_a_traceback(model):
    port = free_port()
    argv = [*QWENKIT, "serve", model, "--port", str(port), "--dtype", "float32", "--tensor-parallel", "2"]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not become healthy"
                time.sleep(0.3)
        (follower,) = ranks(proc)
        payload = {"prompt": "Once", "max_tokens": 6000, "temperature": 0, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=payload, timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and len(lines) == 3:
                    follower.kill()
                if line.startswith("data: "):
                    lines.append(line)
        assert proc.wait(timeout=60) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
    assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2], lines[-3:]
    output = proc.stdout.read()
    assert "Traceback" not in output, output[-3000:]
    assert output.rstrip().endswith("error: tensor-parallel rank 1 of 2 was killed by signal 9")


@pytest.mark.slow
def test_ctrl_c_in_a_tensor_parallel_generate_stops_every_rank_quietly(model):
    """Ctrl-C in a terminal reaches the whole process group: the command exits 130 with only a newline on
    stderr, as one process does, not with each rank's KeyboardInterrupt traceback."""

    def terminal_default() -> None:  # a shell that ignores SIGINT for background jobs passes that on
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    argv = [*QWENKIT, "generate", model, "-p", "Tell me a story", *LONG]
    proc = subprocess.Popen(
        argv,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=terminal_default,
    )
    try:
        os.read(proc.stdout.fileno(), 1)
        time.sleep(0.5)
        procs = ranks(proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (proc.returncode, err.decode()) == (130, "\n")  # one process's: the line the answer was on ended
    assert_gone(procs)


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("unshare"),
    reason="a PID namespace needs root and unshare",
)
@pytest.mark.parametrize("command, parallel", [("generate", 2), ("chat", 2), ("generate", 1)])
def test_sigterm_to_a_tensor_parallel_command_that_is_pid_1_stops_every_rank(model, command, parallel):
    """A container's PID 1 never gets a signal it has no handler for: `qwenkit generate` (or `chat -p`)
    `--tensor-parallel 2` as the container's command ignored `docker stop`'s SIGTERM and its ranks
    generated on to the end; so did a one-process `generate`. Now it exits 143 at once, as the default
    action does elsewhere, its ranks stopped, nothing printed."""
    options = LONG if parallel == 2 else LONG[: LONG.index("--tensor-parallel")]
    prompt = ["-p", "Tell me a story", *options, *(["--ignore-eos"] if command == "chat" else [])]
    argv = ["unshare", "-fp", "--mount-proc", *QWENKIT, command, model, *prompt]
    proc = subprocess.Popen(
        argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        os.read(proc.stdout.fileno(), 1)
        time.sleep(0.5)
        (launcher,) = psutil.Process(proc.pid).children()  # PID 1 in its namespace
        procs = ranks(launcher) if parallel == 2 else [launcher]
        assert len(procs) == (1 if command == "chat" or parallel == 1 else 2)  # chat's process is rank 0
        launcher.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (proc.returncode, err.decode()) == (143, "")
    assert_gone(procs)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_ctrl_c_while_the_ranks_start_is_quiet(model, command):
    """Ctrl-C pressed while the ranks are still importing torch (seconds, the moment a user who mistyped
    presses it) reached ranks that had not yet come to ignore it: each printed its KeyboardInterrupt
    traceback into the terminal. They are born ignoring it now; the command exits 130 with nothing."""

    def terminal_default() -> None:  # a shell that ignores SIGINT for background jobs passes that on
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    argv = {"generate": ["-p", "Tell me a story", *LONG], "chat": LONG, "serve": LONG[-2:]}[command]
    extra = ["--port", str(free_port())] if command == "serve" else []
    proc = subprocess.Popen(
        [*QWENKIT, command, model, *argv, *extra],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=terminal_default,
    )
    try:
        deadline = time.monotonic() + 60
        while not ranks(proc) and time.monotonic() < deadline:
            time.sleep(0.01)
        procs = ranks(proc)
        time.sleep(0.3)  # into their imports
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert procs
    assert "Traceback" not in err.decode() and "KeyboardInterrupt" not in err.decode(), err.decode()
    assert proc.returncode == 130
    assert_gone(procs)


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("unshare"),
    reason="a PID namespace needs root and unshare",
)
def test_sigterm_to_a_tensor_parallel_server_that_is_pid_1_while_it_loads_stops_it(model):
    """`qwenkit serve --tensor-parallel 2` as a container's PID 1 had no SIGTERM handler until uvicorn's,
    once every rank had loaded (minutes, for a model that needs splitting): `docker stop` then was
    ignored, and the server started serving and waited for SIGKILL. It stops now, as one process does."""
    argv = [
        "unshare",
        "-fp",
        "--mount-proc",
        *QWENKIT,
        "serve",
        model,
        "--port",
        str(free_port()),
        *LONG[-4:],
    ]
    proc = subprocess.Popen(
        argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            children = psutil.Process(proc.pid).children()
            if children and ranks(children[0]):
                break
            time.sleep(0.01)
        (launcher,) = children  # PID 1 in its namespace, rank 0
        procs = ranks(launcher)
        launcher.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (proc.returncode, err.decode()) == (0, "stopped by SIGTERM before the server started\n")
    assert_gone(procs)
