"""`qwenkit serve --tensor-parallel 2` and `qwenkit chat --tensor-parallel 2` on CPU (gloo).

serve: a real server on 127.0.0.1 whose greedy answers, token for token (and their log-probabilities),
equal the single-process server's, with requests that arrive while others decode; SIGTERM drains it (a
streaming request finishes) and every rank exits 0; a server that loses a rank drains and stops with
one line naming it. chat: the same conversation, sampled with a seed, prints exactly what one process
prints (rank 0 keeps the terminal and samples; rank 1 follows). Across machines: two torchrun agents
(node ranks 0 and 1, here both on 127.0.0.1) run `generate` and `serve` with the single process's
answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from qwenkit.distributed.launch import free_port

QWENKIT = [sys.executable, "-m", "qwenkit.cli"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from factories import write_tiny_chat_model

    return str(write_tiny_chat_model(tmp_path_factory.mktemp("tp") / "chat", num_key_value_heads=2))


def start(model: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QWENKIT_RESPONSE_CACHE": "0"}
    argv = [*QWENKIT, "serve", model, "--port", str(port), "--dtype", "float32"]
    proc = subprocess.Popen(
        [*argv, "--max-batch", "4", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("qwenkit serve did not become healthy")


REQUESTS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name three rivers."}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to five, please."}]}),
    ("/v1/completions", {"prompt": [9, 8, 7, 6, 5, 4, 3, 2, 1], "logprobs": 0}),
    ("/v1/completions", {"prompt": "Once upon a time", "logprobs": 0}),
]


def answers(url: str) -> list[tuple[list[str], list[float], str]]:
    """Greedy answers to REQUESTS sent at once (they join the batch while others decode)."""

    def ask(i: int):
        path, body = REQUESTS[i]
        body = {**body, "temperature": 0, "max_tokens": 12 + 4 * i, "ignore_eos": True}
        if path == "/v1/chat/completions":
            body["logprobs"] = True
        choice = httpx.post(url + path, json=body, timeout=60).json()["choices"][0]
        if path == "/v1/chat/completions":
            lps = choice["logprobs"]["content"]
            return [t["token"] for t in lps], [t["logprob"] for t in lps], choice["message"]["content"]
        lps = choice["logprobs"]
        return lps["tokens"], lps["token_logprobs"], choice["text"]

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        return list(pool.map(ask, range(len(REQUESTS))))


def scores(url: str) -> list[tuple[list[float], int]]:
    """Two scoring requests (echo, logprobs, max_tokens 0) on one 40-token context, one after the other:
    the second reads the first's blocks and their kept log-probabilities, recomputing one position in a
    copy of a block (every rank copies its own pool's)."""
    context = list(range(500, 540))
    out = []
    for candidate in (7, 8):
        body = {"prompt": [*context, candidate], "max_tokens": 0, "echo": True, "logprobs": 0}
        reply = httpx.post(url + "/v1/completions", json={**body, "temperature": 0}, timeout=60).json()
        cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        out.append((reply["choices"][0]["logprobs"]["token_logprobs"][1:], cached))
    return out


def kill_follower(proc: subprocess.Popen) -> None:
    """Kill rank 1: the command's own process is rank 0, the spawned one is rank 1."""
    import psutil

    (follower,) = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    follower.kill()


@pytest.mark.slow
def test_serve_with_tensor_parallel_answers_like_one_process_and_drains(model):
    single, single_url = start(model)
    sharded, sharded_url = start(model, "--tensor-parallel", "2", "--graceful-timeout", "20")
    doomed, doomed_url = start(model, "--tensor-parallel", "2")  # loses a rank below
    servers = (single, sharded, doomed)
    try:
        wait_healthy(single, single_url)
        wait_healthy(sharded, sharded_url)
        wait_healthy(doomed, doomed_url)
        # A rank that dies: rank 0 drains and leaves, the command names the rank (no half-up server).
        kill_follower(doomed)

        want = answers(single_url)
        got = answers(sharded_url)
        for (tokens, lps, text), (ref_tokens, ref_lps, ref_text) in zip(got, want, strict=True):
            assert tokens == ref_tokens and text == ref_text and len(tokens) >= 12
            assert max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True)) < 1e-4
        (first, none), (second, cached) = scores(sharded_url)
        assert none == 0 and cached == 31
        for (lps, _), (ref_lps, _) in zip([(first, 0), (second, 0)], scores(single_url), strict=True):
            assert max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True)) < 1e-4

        # SIGTERM mid-stream: the request still finishes, then rank 0 stops rank 1 and all exit 0.
        payload = {"prompt": "Tell me a story", "max_tokens": 40, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", sharded_url + "/v1/completions", json=payload, timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and not lines:
                    sharded.send_signal(signal.SIGTERM)
                if line.startswith("data: "):
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
        assert finishes[-1] == "length"
        assert sharded.wait(timeout=40) == 0
        assert doomed.wait(timeout=40) == 2
    finally:
        for proc in servers:
            if proc.poll() is None:
                proc.kill()
    output = sharded.stdout.read()
    assert "on 2 tensor-parallel ranks on http://127.0.0.1" in output and "Traceback" not in output
    output = doomed.stdout.read()
    assert "error: tensor-parallel rank 1 of 2 was killed by signal 9" in output and "Traceback" not in output
    with pytest.raises(httpx.HTTPError):
        httpx.get(doomed_url + "/health", timeout=2)


@pytest.mark.slow
def test_chat_with_tensor_parallel_prints_what_one_process_prints(model):
    script = "hello there\n:history\n:seed 11\nsecond question\n"
    argv = [*QWENKIT, "chat", model, "--temperature", "0.8", "--seed", "7", "--max-new-tokens", "10"]
    argv += ["--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*argv, *extra], input=script, capture_output=True, text=True, timeout=60, env=env
        )

    single, sharded = run(), run("--tensor-parallel", "2")
    assert single.returncode == 0 and sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == single.stdout
    answers = [line for line in single.stdout.splitlines() if line.startswith("assistant: ")]
    assert len(answers) == 1 and len(answers[0].strip()) > len("assistant: ") + 5  # real text, not blanks
    assert "Traceback" not in sharded.stderr


@pytest.mark.slow
def test_ctrl_c_in_a_tensor_parallel_chat_stops_the_answer_not_the_ranks(model):
    """A terminal's Ctrl-C reaches every process of the group: rank 1 ignores it, rank 0 stops the answer;
    a rank that dies ends the chat with one line."""
    import pty

    from chat_driver import Terminal  # tests/ is on sys.path (conftest)

    master, slave = pty.openpty()
    argv = [
        *QWENKIT,
        "chat",
        model,
        "--max-new-tokens",
        "6000",
        "--temperature",
        "1",
        "--tensor-parallel",
        "2",
    ]
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    term = Terminal(master)
    try:
        term.read_until(b">>> ")
        os.write(master, b":conf ignore_eos=True\n")
        term.read_until(b">>> ")
        for question in (b"tell me a long story", b"and another one"):
            os.write(master, question + b"\n")
            term.read_until(question + b"\r\n")
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGINT)
            term.read_until(b"[interrupted]")
            term.read_until(b">>> ")
        os.write(master, b":history\n")
        out = term.read_until(b">>> ")
        assert b"user: and another one" in out and b"assistant: " in out
        # Rank 1 dies while the chat waits at its prompt: one line naming it, exit 2, nothing left running.
        kill_follower(proc)
        assert proc.wait(timeout=30) == 2
        assert b"error: tensor-parallel rank 1 of 2 was killed by signal 9" in term.read_until(b"signal 9")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(master)


def launch_nodes(*argv: str) -> list[subprocess.Popen]:
    """Two torchrun agents, as two machines would start them (static rendezvous, node ranks 0 and 1, one
    process each), here both on 127.0.0.1, running ``qwenkit <argv>``."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QWENKIT_RESPONSE_CACHE": "0"}
    agents = []
    for node in (0, 1):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node)]
        launcher += ["--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
        agents.append(
            subprocess.Popen(
                [*launcher, "-m", "qwenkit.cli", *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return agents


@pytest.mark.slow
def test_generate_across_two_launched_nodes_prints_the_single_process_answer(model):
    argv = ["generate", model, "--prompt-ids", "9,8,7,6", "--max-new-tokens", "8", "--json"]
    argv += ["--logprobs", "1", "--dtype", "float32", "--temperature", "0"]
    single = subprocess.run([*QWENKIT, *argv], capture_output=True, text=True, timeout=60)
    nodes = launch_nodes(*argv)
    outs = [node.communicate(timeout=120) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][1][-2000:]
    got, want = json.loads(outs[0][0]), json.loads(single.stdout)
    assert {**got, "timings": None} == {**want, "timings": None} and len(got["output_token_ids"]) == 8
    assert outs[1][0] == ""  # rank 1 writes nothing


@pytest.mark.slow
def test_serve_across_two_launched_nodes_answers_like_one_process(model):
    """torchrun's rank 0 serves HTTP (only it binds the port) and rank 1 follows; SIGTERM to rank 0's
    process drains it, releases rank 1, and both launchers exit 0."""
    import psutil

    port = free_port()
    single, single_url = start(model)
    nodes = launch_nodes("serve", model, "--port", str(port), "--dtype", "float32", "--max-batch", "4")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(single, single_url)
        deadline = time.monotonic() + 90
        while True:
            assert all(node.poll() is None for node in nodes), nodes[0].stderr.read()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the launched server did not become healthy"
                time.sleep(0.3)
        want, got = answers(single_url), answers(url)
        for (tokens, lps, text), (ref_tokens, ref_lps, ref_text) in zip(got, want, strict=True):
            assert tokens == ref_tokens and text == ref_text and len(tokens) >= 12
            assert max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True)) < 1e-4
        (rank0,) = psutil.Process(nodes[0].pid).children()  # the worker torchrun started on node 0
        rank0.send_signal(signal.SIGTERM)
        assert [node.wait(timeout=60) for node in nodes] == [0, 0]
    finally:
        for proc in (single, *nodes):
            if proc.poll() is None:
                proc.kill()
    out0 = nodes[0].stdout.read() + nodes[0].stderr.read()
    assert "on 2 tensor-parallel ranks on http://127.0.0.1" in out0 and "Traceback" not in out0
    assert "Traceback" not in nodes[1].stderr.read()


def test_a_tensor_parallel_size_other_than_the_launchers_is_refused(model, monkeypatch, capsys):
    from qwenkit.cli import main

    launched = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for name, value in launched.items():
        monkeypatch.setenv(name, value)
    assert main(["generate", model, "--prompt-ids", "1,2", "--tensor-parallel", "4"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --tensor-parallel 4 does not match the 2 processes the launcher started (WORLD_SIZE); "
        "leave it out under torchrun"
    ]


@pytest.mark.slow
def adapter_answers(url: str, names: tuple[str, ...] = ("a", "chat", "b", "a")) -> list[list[str]]:
    """Greedy tokens of one question asked at once through each adapter (or the base model) named."""

    def ask(name: str) -> list[str]:
        body = {
            "model": name,
            "messages": [{"role": "user", "content": "Name three rivers."}],
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": True,
        }
        choice = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        return [t["token"] for t in choice["logprobs"]["content"]]

    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(ask, names))


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_lora_modules_with_tensor_parallel_answers_like_one_process(model, tmp_path):
    """`--lora-modules` over 2 ranks: each rank serves its slices of the adapters; requests naming an
    adapter, the other or the base model, sent at once, get the one-process server's greedy tokens."""
    from pathlib import Path

    from factories import write_lora_adapter

    modules = [
        f"{name}={write_lora_adapter(Path(model), tmp_path / name, seed, std=0.5)}"
        for name, seed in (("a", 1), ("b", 2))
    ]
    single, single_url = start(model, "--lora-modules", *modules)
    sharded, sharded_url = start(model, "--tensor-parallel", "2", "--lora-modules", *modules)
    try:
        wait_healthy(single, single_url)
        wait_healthy(sharded, sharded_url)

        want, got = adapter_answers(single_url), adapter_answers(sharded_url)
        assert got == want and len({tuple(t) for t in want}) == 3
    finally:
        stop(single, sharded)


def test_adapters_loaded_while_serving_with_tensor_parallel_answer_like_one_process(model, tmp_path):
    """`--allow-runtime-lora --max-loras 2` over 2 ranks: adapters loaded over HTTP (and one replaced in
    place) reach both ranks' held slots, in the slot rank 0 chose, and requests naming them get the
    greedy tokens of a one-process server given the same adapters at start; a third is refused."""
    from pathlib import Path

    from factories import write_lora_adapter

    paths = {
        name: str(write_lora_adapter(Path(model), tmp_path / name, seed, std=0.5))
        for name, seed in (("a", 1), ("b", 2), ("c", 3))
    }
    single, single_url = start(model, "--lora-modules", f"a={paths['c']}", f"b={paths['b']}")
    sharded, sharded_url = start(
        model, "--tensor-parallel", "2", "--allow-runtime-lora", "--max-loras", "2", "--max-lora-rank", "8"
    )
    try:
        wait_healthy(single, single_url)
        wait_healthy(sharded, sharded_url)

        def load(name: str, path: str, inplace: bool = False) -> httpx.Response:
            body = {"lora_name": name, "lora_path": path, "load_inplace": inplace}
            return httpx.post(sharded_url + "/v1/load_lora_adapter", json=body, timeout=60)

        assert load("a", paths["a"]).status_code == 200
        assert load("b", paths["b"]).status_code == 200
        assert load("a", paths["c"], inplace=True).status_code == 200  # its own slot: none runs on it
        refused = load("c", paths["c"])
        assert refused.status_code == 400 and "(--max-loras 2)" in refused.json()["error"]["message"]

        want, got = adapter_answers(single_url), adapter_answers(sharded_url)
        assert got == want and len({tuple(t) for t in want}) == 3
    finally:
        stop(single, sharded)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["chat", "serve", "generate"])
def test_a_checkpoint_every_rank_fails_to_read_is_one_error_line(model, tmp_path, command):
    """Every rank meets the broken file; the user reads its error once (each rank printed it before)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    argv = [*QWENKIT, command, str(broken), "--tensor-parallel", "2"]
    argv += ["--port", str(free_port())] if command == "serve" else ["-p", "hi"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {weights} is not a readable safetensors file"), r.stderr
