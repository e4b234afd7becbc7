"""The server started exactly as the image starts it: `qwenkit serve` with no arguments, configured only
by the image's ENV (read from Dockerfile.cpu) plus what compose or the Deployment add (model mount, key
file, port). SIGTERM during a streaming request: the image's health check turns unhealthy, the request
finishes (or, at the end of the grace period, ends with an error event and [DONE]), and the process exits
0 in time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from deploy_files import BIN, DEPLOY, DOCKERFILES, dockerfile_env

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from live import free_port

from qwenkit.kernels.build import cache_root

KEY = "sk-deploy-test"


def read_only_copy(model: Path, into: Path) -> Path:
    """The model as a read-only mount presents it."""
    target = shutil.copytree(model, into / "models" / "model")
    for p in [target, *target.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return target


def start_like_the_image(tmp_path: Path, model: Path, grace: float) -> tuple[subprocess.Popen, str]:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "api-key").write_text(KEY + "\n")
    port = free_port()
    env = dockerfile_env(DOCKERFILES[0])
    env.update(
        # what the image's ENV cannot know: this machine's paths (the venv stands in for /opt/qwenkit)
        PATH=f"{BIN}:{os.environ['PATH']}",
        HOME=str(tmp_path),
        PYTHONPATH=os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        # the image carries its CPU kernels prebuilt in its venv (install.sh KERNELS=venv); this venv's are
        # in the user cache `make setup` filled: without it each start here compiles them again (30-60 s)
        XDG_CACHE_HOME=str(cache_root().parents[1]),
        # what compose / the Deployment add
        QWENKIT_MODEL=str(read_only_copy(model, tmp_path)),
        QWENKIT_API_KEY_FILE=str(tmp_path / "secrets" / "api-key"),
        QWENKIT_SERVED_MODEL_NAME="qwen",
        QWENKIT_GRACEFUL_TIMEOUT=str(grace),
        # `docker run -p` maps the port; here the test binds loopback on a free one
        QWENKIT_HOST="127.0.0.1",
        QWENKIT_PORT=str(port),
    )
    proc = subprocess.Popen(
        ["qwenkit", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if healthcheck(env) == 0:
            return proc, url
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not become healthy: " + proc.stdout.read())


def healthcheck(env: dict[str, str]) -> int:
    """Run the image's HEALTHCHECK command (python /opt/healthcheck.py) against the server."""
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env, timeout=30).returncode


def stream_with_sigterm(proc: subprocess.Popen, url: str, max_tokens: int) -> tuple[list[str], float, bool]:
    """Stream a chat completion; SIGTERM the server at the first chunk. Returns the data lines, the time
    of the signal, and whether the stream ended with a closed connection instead of [DONE]."""
    payload = {
        "model": "qwen",
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    lines: list[str] = []
    signalled = 0.0
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=payload, headers=auth, timeout=120) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if not signalled:
                        proc.send_signal(signal.SIGTERM)
                        signalled = time.monotonic()
    except httpx.RemoteProtocolError:  # the server closed the stream at the end of the grace period
        return lines, signalled, True
    return lines, signalled, False


@pytest.mark.slow
def test_sigterm_mid_stream_lets_the_request_finish_and_exits_0(tmp_path, tiny_chat_model):
    proc, url = start_like_the_image(tmp_path, tiny_chat_model, grace=30)
    try:
        env = {"QWENKIT_PORT": url.rsplit(":", 1)[1], "PATH": os.environ["PATH"]}
        assert httpx.get(url + "/v1/models").status_code == 401  # the key file is in force
        lines, signalled, cut = stream_with_sigterm(proc, url, max_tokens=48)
        assert healthcheck(env) == 1  # draining (503) or already gone: never healthy again
        code = proc.wait(timeout=30)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert not cut and lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and sum(1 for f in finishes if f) == 1
    assert chunks[-1]["usage"]["completion_tokens"] == 48  # every token the client asked for
    assert code == 0 and exited < 30
    assert "Traceback" not in output and "serving qwen on http://127.0.0.1" in output


@pytest.mark.slow
def test_sigterm_past_the_grace_period_ends_the_stream_cleanly_and_exits_0_in_time(tmp_path, tiny_chat_model):
    grace = 2.0
    proc, url = start_like_the_image(tmp_path, tiny_chat_model, grace=grace)
    try:
        lines, signalled, cut = stream_with_sigterm(proc, url, max_tokens=8000)
        code = proc.wait(timeout=60)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    # 8,000 tokens take far longer than the grace period here: just before it ends the request is stopped
    # and its stream ends cleanly, with an OpenAI error event and [DONE], not a cut connection.
    assert not cut and lines[-1] == "[DONE]"
    error = json.loads(lines[-2])["error"]
    assert error["code"] == "server_shutdown" and "--graceful-timeout" in error["message"]
    for line in lines[:-2]:  # the tokens before it are whole chunks
        assert json.loads(line)["object"] == "chat.completion.chunk"
    assert len(lines) > 3
    assert code == 0
    assert exited < grace + 10, f"exited {exited:.1f} s after SIGTERM with a {grace} s grace period"
    assert "Traceback" not in output and "Exception in ASGI application" not in output


@pytest.mark.slow
def test_a_client_stalled_mid_upload_holds_the_drain_no_longer_than_the_grace(tmp_path, tiny_chat_model):
    """A client that sent half a body and went quiet (a slow link, a peer gone without a FIN) keeps its
    request task alive. The drain waits for it until the grace period ends; uvicorn used to give it its
    whole timeout again after that, so the process exited after twice the grace period (65 s with the
    Deployment's preStop: killed at terminationGracePeriodSeconds, 45)."""
    grace = 4.0
    proc, url = start_like_the_image(tmp_path, tiny_chat_model, grace=grace)
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            client.sendall(head.encode() + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
            time.sleep(0.5)  # the request's task is reading the body
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = proc.wait(timeout=60)
            exited = time.monotonic() - signalled
            while client.recv(4096):  # the server closed the connection as it went
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert grace - 0.5 < exited < grace + 2.5, f"exited {exited:.1f} s after SIGTERM, grace {grace} s"
