"""`qwenkit serve` as a user (or a container) runs it: the bundled model, options from the environment,
a real answer, and a clean drain on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from live import free_port


def start_server(env_extra: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "QWENKIT_PORT": str(port), "QWENKIT_MAX_BATCH": "4", **env_extra}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwenkit.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("qwenkit serve did not become healthy")


def test_serve_bundled_model_answers_and_drains_on_sigterm(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k3y\n")
    # a generous grace period: the drained request must finish even on a busy 2-core machine
    proc, url = start_server({"QWENKIT_API_KEY_FILE": str(key_file), "QWENKIT_GRACEFUL_TIMEOUT": "300"})
    auth = {"Authorization": "Bearer k3y"}
    try:
        page = httpx.get(url + "/")  # the web chat page, open without the key; its assets ship with it
        assert page.status_code == 200 and "<title>" in page.text and 'src="static/app.js"' in page.text
        script = httpx.get(url + "/static/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        models = httpx.get(url + "/v1/models", headers=auth).json()
        assert models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
        question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        r = httpx.post(
            url + "/v1/chat/completions",
            headers=auth,
            timeout=120,
            json={"messages": question, "max_tokens": 20, "temperature": 0},
        ).json()
        assert "Paris" in r["choices"][0]["message"]["content"]

        payload = {"messages": question, "max_tokens": 400, "ignore_eos": True, "stream": True}
        lines, while_draining = [], []
        with httpx.stream("POST", url + "/v1/chat/completions", headers=auth, json=payload, timeout=120) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and not lines:
                    proc.send_signal(signal.SIGTERM)  # mid-stream: this request must still finish
                    # ... while the listener stays open: not ready, and new requests refused with a 503
                    while_draining = draining_answers(url, auth)
                if line.startswith("data: "):
                    lines.append(line)
        assert while_draining == [
            (503, {"status": "draining"}),
            (503, {"message": "the server is shutting down", "code": "shutting_down"}),
        ]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        assert all("choices" in c for c in chunks), [c for c in chunks if "choices" not in c]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks]
        assert finishes[-1] == "length" and sum(1 for f in finishes if f) == 1
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert "serving SmolLM2-135M-Instruct.Q4_1 on http://127.0.0.1" in output and "Traceback" not in output


def draining_answers(url: str, auth: dict) -> list[tuple[int, dict]]:
    """/health and a new chat request, on new connections, once the server has taken the signal."""
    deadline = time.monotonic() + 10
    while (health := httpx.get(url + "/health", timeout=5)).status_code == 200:
        assert time.monotonic() < deadline, "still healthy 10 s after SIGTERM"
        time.sleep(0.05)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    refused = httpx.post(url + "/v1/chat/completions", headers=auth, json=body, timeout=5)
    error = refused.json()["error"]
    return [
        (health.status_code, health.json()),
        (refused.status_code, {k: error[k] for k in ("message", "code")}),
    ]


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwenkit.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_a_taken_port_is_one_line_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_serve("--port", str(port))
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert r.stdout == ""  # no "serving ..." line, no load progress: nothing slow ran first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "99999"], "error: --port must be at most 65535, got 99999\n"),
        (["--port", "0"], "error: --port must be positive, got 0\n"),
        (
            ["--host", "192.0.2.1", "--port", "8123"],  # an address of no interface here (TEST-NET-1)
            "error: cannot listen on 192.0.2.1:8123: Cannot assign requested address\n",
        ),
    ],
)
def test_a_port_or_host_the_server_cannot_listen_on_is_one_line(args, message):
    r = run_serve(*args)
    assert (r.returncode, r.stderr) == (2, message)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            [],
            {"QWENKIT_DEVICE": "tpu"},
            "error: unknown --device 'tpu' (QWENKIT_DEVICE); choose cpu or cuda\n",
        ),
        (
            ["--request-timeout", "0"],
            {},
            "error: --request-timeout must be a positive number of seconds, got 0.0\n",
        ),
        (
            [],
            {"QWENKIT_REQUEST_TIMEOUT": "nan"},
            "error: --request-timeout must be a positive number of seconds, got nan\n",
        ),
        (["--graceful-timeout", "-5"], {}, "error: --graceful-timeout must be 0 or more seconds, got -5.0\n"),
        (
            ["--api-key", "clé"],
            {},
            "error: --api-key holds U+00E9, which an HTTP header cannot carry as it is: use printable ASCII "
            "(openssl rand -hex 32 makes one)\n",
        ),
        (
            [],
            {"QWENKIT_API_KEY": "key\u200bwith a zero-width space"},
            "error: --api-key holds U+200B, which an HTTP header cannot carry as it is: use printable ASCII "
            "(openssl rand -hex 32 makes one)\n",
        ),
        (["--max-request-size", "0"], {}, "error: --max-request-size must be at least 1 byte, got '0'\n"),
        (
            [],
            {"QWENKIT_MAX_REQUEST_SIZE": "lots"},
            "error: --max-request-size: cannot read 'lots' as a size; write it like 2GiB, 512MiB or 1GB\n",
        ),
    ],
)
def test_a_device_or_timeout_the_server_cannot_use_is_one_line_before_the_model_loads(args, env, message):
    r = run_serve("--port", str(free_port()), *args, env=env)
    assert (r.returncode, r.stderr, r.stdout) == (2, message, "")


def bundled_answer(adapter, question: list[dict]) -> str:
    """The library's greedy 16-token answer of the bundled model through ``adapter``."""
    from qwenkit.default_model import default_model_path
    from qwenkit.engine import SamplingParams
    from qwenkit.generate import LLM

    with LLM.load(default_model_path(), progress=False, adapter=adapter) as llm:
        prompt = llm.tokenizer.apply_chat_template(question, add_generation_prompt=True)
        return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0].text


def test_lora_modules_from_the_environment_serve_a_trained_adapter(tmp_path):
    """`QWENKIT_LORA_MODULES` as a container sets it: an adapter of the bundled model served beside it, chosen
    by the request's model name, its answer what the library gives through that adapter."""
    from factories import write_lora_adapter

    from qwenkit.default_model import default_model_path

    adapter = write_lora_adapter(default_model_path(), tmp_path / "terse", seed=5, r=8, std=0.3)
    proc, url = start_server({"QWENKIT_LORA_MODULES": f"terse={adapter}"})
    question = [{"role": "user", "content": "Tell me a short story about a cat."}]
    try:
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ids == ["SmolLM2-135M-Instruct.Q4_1", "terse"]
        answers = {}
        for model in ids:
            body = {"model": model, "messages": question, "max_tokens": 16, "temperature": 0}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
            assert r["model"] == model
            answers[model] = r["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    direct = bundled_answer(adapter, question)
    assert answers["terse"] == direct != answers["SmolLM2-135M-Instruct.Q4_1"]


def test_an_adapter_loaded_at_run_time_answers_as_one_given_at_start(tmp_path):
    """`QWENKIT_ALLOW_RUNTIME_LORA=1` behind an API key, one adapter slot held from the start
    (`QWENKIT_MAX_LORAS=1`, rank 8): an adapter of the bundled model loaded over HTTP (vLLM's
    /v1/load_lora_adapter) answers as the library does through it, a second is refused while it is
    served, and it unloads."""
    from factories import write_lora_adapter

    from qwenkit.default_model import default_model_path

    adapter = write_lora_adapter(default_model_path(), tmp_path / "terse", seed=5, r=8, std=0.3)
    env = {"QWENKIT_ALLOW_RUNTIME_LORA": "1", "QWENKIT_API_KEY": "k", "QWENKIT_MAX_LORAS": "1"}
    proc, url = start_server({**env, "QWENKIT_MAX_LORA_RANK": "8"})
    auth = {"Authorization": "Bearer k"}
    question = [{"role": "user", "content": "Tell me a short story about a cat."}]
    body = {"model": "terse", "messages": question, "max_tokens": 16, "temperature": 0}
    try:
        r = httpx.post(
            url + "/v1/load_lora_adapter",
            json={"lora_name": "terse", "lora_path": str(adapter)},
            headers=auth,
            timeout=60,
        )
        assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'terse' added successfully.")
        r = httpx.post(
            url + "/v1/load_lora_adapter",
            json={"lora_name": "second", "lora_path": str(adapter)},
            headers=auth,
            timeout=60,
        )
        assert r.status_code == 400 and "(--max-loras 1)" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=120).json()
        served = r["choices"][0]["message"]["content"]
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "terse"}, headers=auth, timeout=60)
        assert r.status_code == 200
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    direct = bundled_answer(adapter, question)
    assert served == direct


def test_sigterm_while_a_request_is_read_drains_with_the_listener_open():
    """A request still being read (its body arriving; a long prompt being tokenized alike) is not yet
    counted as running; SIGTERM then closed the listener at once, so probes and new clients saw
    "connection refused" instead of the drain's 503s. (A long prompt no longer serves here: the bundled
    model's is refused from its length before any is tokenized.)"""
    proc, url = start_server({"QWENKIT_GRACEFUL_TIMEOUT": "300"})
    body = json.dumps({"prompt": "Hello", "max_tokens": 1}).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    try:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60) as sock:
            sock.sendall(head.encode() + body[:5])  # the rest is still on its way
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert draining_answers(url, {}) == [
                (503, {"status": "draining"}),
                (503, {"message": "the server is shutting down", "code": "shutting_down"}),
            ]
            sock.sendall(body[5:])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 200 OK", answer
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["usage"]["completion_tokens"] == 1
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in proc.stdout.read()
