"""Passkey against an endpoint takes its lengths from the server's context (``max_model_len`` in
``GET /v1/models``, as qwenkit serve and vLLM report it): the defaults stop where the server's context
does, and longer ``--lengths`` are refused before any prompt is sent. It used to assume 32k and send
prompts the server refused. A server that does not say falls back to the 32k defaults; one that cannot
be reached is the usual one-line error."""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qwenkit.cli import main as qwenkit_main
from qwenkit.evaluate.backends import BackendError
from qwenkit.evaluate.endpoint import EndpointBackend

MAX_MODEL_LEN = 3000


@pytest.fixture(scope="module")
def served(tiny_chat_model) -> Iterator[str]:
    """``qwenkit serve MODEL --max-model-len 3000 --served-model-name tiny`` on 127.0.0.1."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from live import LiveServer

    from qwenkit.generate import LLM
    from qwenkit.server import ServerConfig, create_app

    llm = LLM.load(
        tiny_chat_model, dtype="float32", max_seq_len=MAX_MODEL_LEN, max_batch_size=4, progress=False
    )
    app = create_app(llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    with LiveServer(app) as server:
        yield server.url
    llm.close()


def test_default_lengths_stop_at_the_servers_context(served, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--endpoint", served, "--model", "tiny", "--task", "passkey", "--depths", "0.5"]
    assert qwenkit_main([*argv, "--no-progress", "--output", str(out)]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["record"]["lengths"] == [1024, 2048]  # of 1k..32k, those within 3000 tokens
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["length"] for r in rows] == [1024, 2048]
    assert all(r["prompt_tokens"] + 16 <= r["length"] <= MAX_MODEL_LEN for r in rows)


def test_lengths_past_the_servers_context_are_refused(served, capsys):
    argv = ["eval", "--endpoint", served, "--task", "passkey", "--lengths", "1024", "4096", "--no-progress"]
    assert qwenkit_main(argv) == 2
    assert (
        capsys.readouterr().err
        == f"error: --lengths 4096 exceeds the model's context of {MAX_MODEL_LEN} tokens\n"
    )


def test_the_model_asked_for_is_the_one_read(served):
    assert EndpointBackend(served, model="tiny").max_context() == MAX_MODEL_LEN
    assert EndpointBackend(served).max_context() == MAX_MODEL_LEN  # the first listed
    assert EndpointBackend(served, model="another").max_context() is None  # the server will refuse it


@contextmanager
def models_route(status: int, body: str) -> Iterator[str]:
    """A server answering ``GET /v1/models`` with ``status`` and ``body``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body.encode())))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, '{"detail": "Not Found"}'),  # no such route
        (200, '{"object": "list", "data": [{"id": "m", "object": "model"}]}'),  # no such field (OpenAI's own)
        (200, '{"object": "list", "data": [{"id": "m", "max_model_len": "4k"}]}'),
        (200, '{"object": "list", "data": 5}'),
        (200, "{}"),
    ],
)
def test_a_server_that_does_not_say_gives_no_context(status, body):
    with models_route(status, body) as url:
        assert EndpointBackend(url).max_context() is None


def test_an_endpoint_that_cannot_be_reached_is_one_line(capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert qwenkit_main(["eval", "--endpoint", url, "--task", "passkey", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: endpoint {url}/v1/models: ") and "refused" in err and err.count("\n") == 1
    with pytest.raises(BackendError, match=f"^endpoint {url}/v1/models: "):
        EndpointBackend(url).max_context()


def test_letter_contexts_past_the_servers_context_keep_their_end_as_locally(served, local):
    """A few-shot prompt longer than the model's context keeps its last tokens, as Qwen's scripts (and the
    local backend) do, on an endpoint too: it used to be sent whole, and the server's refusal ended the
    run, where the same run on a local model of that context scored it."""
    from qwenkit.evaluate.backends import LocalBackend

    tok = local.llm.tokenizer
    long = tok.encode("The stones by the road are warm. " * 500 + "Answer:")  # past 3000 tokens
    short = tok.encode("Question: 1 + 1?\nAnswer:")
    letters = [tok.encode(s)[0] for s in (" A", " B", " C", " D")]
    assert len(long) > MAX_MODEL_LEN
    # the letter rides in the endpoint's prompt, which must stay short of the context: one token fewer
    here = LocalBackend(local.llm, max_seq_len=MAX_MODEL_LEN - 1).next_token_logprobs([long, short], letters)
    there = EndpointBackend(served, model="tiny").next_token_logprobs([long, short], letters)
    for theirs, ours in zip(there, here, strict=True):
        assert theirs == pytest.approx(ours, abs=1e-4)


def test_perplexity_at_the_servers_full_window_equals_local(served, local, tmp_path, capsys):
    """``qwenkit eval --task ppl --window 3000`` against a server of a 3000-token context scores windows
    that fill it, with ``max_tokens 0`` (echo + logprobs): nothing is generated, so the server takes them
    and gives the local figures. It answered 400 (the prompt fills the context), as if a token had to
    follow."""
    from qwenkit.evaluate.perplexity import perplexity

    text = tmp_path / "text.txt"
    text.write_text("The stones by the road are warm. A dog sleeps in the shade. " * 300, encoding="utf-8")
    window, stride = MAX_MODEL_LEN, 1000
    out = tmp_path / "run"
    argv = ["eval", "--endpoint", served, "--task", "ppl", "--data", str(text), "--window", str(window)]
    argv += ["--stride", str(stride), "--no-progress", "--output", str(out)]
    assert qwenkit_main(argv) == 0, capsys.readouterr().err
    there = json.loads((out / "results.json").read_text())["scores"]
    here = perplexity(local, text.read_text(encoding="utf-8"), window, stride)
    assert len(local.encode(text.read_text(encoding="utf-8"))) > window  # whole windows, then the tail
    assert there["windows"] == here["windows"] >= 2
    assert there["tokens_scored"] == here["tokens_scored"]
    assert there["token_perplexity"] == pytest.approx(here["token_perplexity"], rel=1e-5)


def test_a_full_window_prompt_that_asks_for_a_token_is_still_refused(served):
    import httpx

    body = {"prompt": [11] * MAX_MODEL_LEN, "echo": True, "logprobs": 0, "temperature": 0}
    scored = httpx.post(f"{served}/v1/completions", json={**body, "max_tokens": 0}, timeout=60)
    assert scored.status_code == 200
    assert len(scored.json()["choices"][0]["logprobs"]["token_logprobs"]) == MAX_MODEL_LEN
    for more in ({"max_tokens": 1}, {}):  # no max_tokens: the room left, which is none
        refused = httpx.post(f"{served}/v1/completions", json={**body, **more}, timeout=60)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "context_length_exceeded"
