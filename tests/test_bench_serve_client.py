"""The serving benchmark's client measures what `vllm bench serve` measures.

A small asyncio HTTP server on 127.0.0.1 streams scripted SSE chunks at known times, so the client's TTFT
(first chunk with text, not the role chunk), ITL, usage-based token counts, failure handling and
concurrency cap can be checked against the script.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from serve_client import RequestResult, poisson_gaps, run_load, stream_request, summarize

ROLE_DELAY, TOKEN_GAP, TOKENS = 0.20, 0.05, 5


def chunk(delta: dict | None = None, usage: dict | None = None, finish: str | None = None) -> bytes:
    body: dict = {"object": "chat.completion.chunk", "choices": []}
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


class ScriptedServer:
    """Answers every POST with one scripted stream; ``mode`` picks the script. Counts requests in flight."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode, self.in_flight, self.max_in_flight = mode, 0, 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.mode == "500":
                body = b'{"error": {"message": "boom"}}'
                writer.write(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                )
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            writer.write(chunk({"role": "assistant", "content": None}))  # role-only: not the first token
            await writer.drain()
            await asyncio.sleep(ROLE_DELAY)
            for i in range(TOKENS):
                if i:
                    await asyncio.sleep(TOKEN_GAP)
                writer.write(chunk({"content": f"t{i}"}))
                await writer.drain()
            writer.write(chunk({}, finish="length"))
            if self.mode != "no-usage":
                usage = {"prompt_tokens": 7, "completion_tokens": TOKENS, "total_tokens": 7 + TOKENS}
                writer.write(chunk(usage=usage | {"prompt_tokens_details": {"cached_tokens": 3}}))
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
        finally:
            self.in_flight -= 1
            writer.close()


async def with_server(mode: str, work):
    server = ScriptedServer(mode)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/v1/chat/completions"
    async with listener:
        return server, await work(url)


def one_request(mode: str) -> RequestResult:
    async def work(url):
        async with httpx.AsyncClient(timeout=10) as client:
            return await stream_request(client, url, {"stream": True})

    return asyncio.run(with_server(mode, work))[1]


def test_ttft_is_the_first_text_chunk_and_tokens_come_from_usage():
    result = one_request("ok")
    assert result.ok, result.error
    assert ROLE_DELAY <= result.ttft < ROLE_DELAY + 0.15  # the role-only chunk at t=0 is not the first token
    assert len(result.itl) == TOKENS - 1
    assert all(TOKEN_GAP * 0.8 <= gap < TOKEN_GAP + 0.1 for gap in result.itl)
    assert result.latency >= result.ttft + (TOKENS - 1) * TOKEN_GAP * 0.8
    assert (result.prompt_tokens, result.output_tokens, result.cached_tokens) == (7, TOKENS, 3)


@pytest.mark.parametrize(("mode", "message"), [("500", "HTTP 500"), ("no-usage", "no usage chunk")])
def test_failures_are_reported_not_counted(mode, message):
    result = one_request(mode)
    assert not result.ok
    assert message in result.error


def test_concurrency_cap_holds_and_all_requests_complete():
    async def work(url):
        return await run_load(url, [{"stream": True}] * 6, concurrency=2)

    server, (results, duration) = asyncio.run(with_server("ok", work))
    assert server.max_in_flight == 2
    assert all(r.ok for r in results) and len(results) == 6
    # three waves of two requests, each ~ROLE_DELAY + 4 gaps long
    assert duration >= 3 * (ROLE_DELAY + (TOKENS - 1) * TOKEN_GAP) * 0.9


def test_summary_uses_vllm_definitions():
    results = [
        RequestResult(ok=True, ttft=0.1, latency=1.1, itl=[0.25] * 4, prompt_tokens=10, output_tokens=5),
        RequestResult(ok=True, ttft=0.3, latency=2.3, itl=[0.5] * 4, prompt_tokens=20, output_tokens=5),
        RequestResult(ok=True, ttft=0.2, latency=0.2, itl=[], prompt_tokens=30, output_tokens=1),
        RequestResult(ok=False, error="HTTP 429: busy"),
    ]
    s = summarize(results, duration_s=2.0)
    assert (s.completed, s.failed, s.errors) == (3, 1, ["HTTP 429: busy"])
    assert s.request_throughput == pytest.approx(1.5)
    assert s.output_throughput == pytest.approx(11 / 2.0)
    assert s.mean_prompt_tokens == pytest.approx(20.0)
    assert s.tokens_per_chunk == pytest.approx(11 / 11)  # 5 + 5 + 1 chunks carried 11 tokens
    # TPOT per request: (1.1-0.1)/4 = 250 ms and (2.3-0.3)/4 = 500 ms; the 1-token request is left out
    assert s.tpot_ms["mean"] == pytest.approx(375.0)
    assert s.tpot_ms["p50"] == pytest.approx(375.0)
    assert s.ttft_ms["p50"] == pytest.approx(200.0)
    assert s.ttft_ms["p99"] == pytest.approx(298.0)  # numpy linear: 200 + 0.98 * (300 - 200)
    assert s.itl_ms["p50"] == pytest.approx(375.0)  # 4 gaps of 250 ms and 4 of 500 ms


def test_poisson_gaps_are_seeded_with_the_requested_mean():
    gaps = poisson_gaps(4000, 4.0, seed=1)
    assert gaps[0] == 0.0 and gaps == poisson_gaps(4000, 4.0, seed=1)
    assert sum(gaps) / (len(gaps) - 1) == pytest.approx(0.25, rel=0.05)
    assert poisson_gaps(3, None, seed=1) == [0.0, 0.0, 0.0]
