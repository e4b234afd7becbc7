"""An endpoint that answers something other than the OpenAI contract (an HTML page, choices without
``index``) or nothing at all ends the run with one line naming the endpoint and what was wrong, and
``--request-timeout`` bounds the wait."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwenkit.cli import main as qwenkit_main
from qwenkit.evaluate.backends import BackendError
from qwenkit.evaluate.endpoint import EndpointBackend


@contextmanager
def stub(replies: dict[str, tuple[str, str]]) -> Iterator[str]:
    """A server answering 200 with ``replies[path]`` = (content type, body) to every POST (404 elsewhere)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            kind, body = replies.get(self.path, ("application/json", '{"error": "not here"}'))
            self.send_response(200 if self.path in replies else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body.encode())))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def silent() -> Iterator[tuple[str, list[socket.socket]]]:
    """A server that accepts every connection and never answers; yields its URL and the connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def test_an_html_page_is_one_line_naming_the_endpoint(capsys):
    page = "<!DOCTYPE html>\n<html>\n  <body>Sign in to continue</body>\n</html>\n"
    with stub({"/v1/completions": ("text/html; charset=utf-8", page)}) as url:
        args = ["eval", "--endpoint", url, "--task", "gsm8k", "--limit", "1", "--no-progress"]
        assert qwenkit_main(args) == 2
    assert capsys.readouterr().err == (
        f"error: endpoint {url}/v1/completions answered with a body that is not JSON "
        "(text/html; charset=utf-8): <!DOCTYPE html> <html> <body>Sign in to continue</body> </html>\n"
    )


def test_a_password_in_the_url_is_never_shown():
    """http://user:secret@host sends the credentials (httpx takes them as basic auth) but messages and the
    run's record star the password out."""
    page = "<html>Sign in</html>"
    with stub({"/v1/completions": ("text/html", page)}) as url:
        backend = EndpointBackend(url.replace("http://", "http://eval:s3cret@") + "/v1/")
        with pytest.raises(BackendError) as error:
            backend.next_token_logprobs([[1, 2]], [3, 4])
        record = backend.describe()
    shown = url.replace("http://", "http://eval:***@")
    assert str(error.value) == (
        f"endpoint {shown}/v1/completions answered with a body that is not JSON (text/html): {page}"
    )
    assert record["url"] == shown and "s3cret" not in json.dumps(record)


def test_choices_without_index_name_the_missing_field():
    choice = {"logprobs": {"token_logprobs": [None, -1.5]}}
    with stub({"/v1/completions": ("application/json", json.dumps({"choices": [choice] * 2}))}) as url:
        backend = EndpointBackend(url, concurrency=1)
        with pytest.raises(BackendError) as error:
            backend.next_token_logprobs([[1, 2]], [3, 4])
    assert str(error.value) == (
        f"endpoint {url}/v1/completions answered without choices[0].index: "
        '{"choices": [{"logprobs": {"token_logprobs": [null, -1.5]}}, {"logprobs": {"token_logprobs": '
        "[null, -1.5]}}]}"
    )


def test_a_reply_without_tokens_names_the_field():
    reply = ("application/json", '{"detail": "not found"}')
    with (
        stub({"/tokenize": reply}) as url,
        pytest.raises(BackendError, match=f"^endpoint {url}/tokenize answered without tokens: "),
    ):
        EndpointBackend(url).encode("hi")


def test_an_endpoint_that_never_answers_times_out_once(capsys):
    with silent() as (url, accepted):
        args = ["eval", "--endpoint", url, "--task", "gsm8k", "--limit", "3", "--batch-size", "1"]
        assert qwenkit_main([*args, "--request-timeout", "0.5", "--no-progress"]) == 2
        assert capsys.readouterr().err == (
            f"error: endpoint {url}/v1/models did not answer within 0.5 s (--request-timeout)\n"
        )
        assert len(accepted) == 1  # the first request (the context's, recorded) timed out: no other was sent


@pytest.mark.parametrize("seconds", ["0", "nan", "inf"])
def test_the_request_timeout_must_be_positive_and_finite(capsys, seconds):
    argv = ["eval", "--endpoint", "http://127.0.0.1:9", "--task", "gsm8k", "--request-timeout", seconds]
    assert qwenkit_main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: --request-timeout must be a finite number of seconds above 0, got {seconds}\n"
    )


def test_requests_still_queued_are_not_sent_after_one_times_out():
    with silent() as (url, accepted):
        backend = EndpointBackend(url, concurrency=1, timeout=0.5)
        with pytest.raises(BackendError, match="did not answer within 0.5 s"):
            backend.complete(["a", "b", "c"], 4, [])
        assert len(accepted) < 3


def test_an_interrupt_leaves_requests_in_flight_behind_instead_of_waiting_for_them():
    """Ctrl-C or SIGTERM while requests are out: the run stops now, not when the server answers them
    (a request may take --request-timeout, 600 s by default; a container's stop grace is 10-30 s)."""
    import os
    import signal
    import time

    class Stopped(Exception):
        pass

    def stop(_signum, _frame):
        raise Stopped

    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        with silent() as (url, accepted):
            backend = EndpointBackend(url, concurrency=2, timeout=20)
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            start = time.monotonic()
            with pytest.raises(Stopped):
                backend.complete(["a", "b", "c"], 4, [])
            assert time.monotonic() - start < 5  # not the 20 s the requests in flight could take
            assert len(accepted) == 2  # the third was never sent
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:port"])
def test_a_malformed_endpoint_url_is_one_line(capsys, url):
    """httpx refuses such a URL with InvalidURL, which is not one of its HTTPErrors: it used to end the
    run in a traceback."""
    args = ["eval", "--endpoint", url, "--task", "gsm8k", "--limit", "1", "--no-progress"]
    assert qwenkit_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: endpoint {url}/v1/") and err.count("\n") == 1
    assert "Traceback" not in err
