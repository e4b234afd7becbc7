"""An async OpenAI-API load generator with the metric definitions of vLLM's `vllm bench serve`.

Figures from this client compare with `vllm bench serve` runs because they are measured the same way:

- TTFT: from sending the request to the first streamed chunk that carries generated text. A role-only first
  chunk does not count (llama-server sends `{"role": "assistant", "content": null}` just before the first
  token; a server that sent it on accept would otherwise report a fake, tiny TTFT).
- ITL: the gaps between consecutive chunks that carry text (one chunk per token on both servers here).
- E2EL (latency): from sending to the last chunk that has `choices` (the usage chunk and `[DONE]` do not
  extend it).
- Output tokens: `usage.completion_tokens` of the final usage chunk (`stream_options.include_usage`).
- TPOT: (latency - TTFT) / (output tokens - 1) per request; requests with one output token are left out.
- Request throughput: completed requests / wall time of the run; output throughput: sum of output tokens
  / wall time. Percentiles are numpy's linear interpolation, as vLLM's.

Load shapes: a closed loop of C users (rate inf, at most C requests in flight) or an open loop of Poisson
arrivals at R requests/s (exponential gaps from a seeded generator), optionally also capped at C.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np


@dataclass
class RequestResult:
    """What one streamed request measured; times in seconds from sending the request."""

    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


@dataclass
class RunSummary:
    """Aggregate figures of one load run (times in milliseconds)."""

    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    mean_cached_tokens: float
    tokens_per_chunk: float  # above 1 when a server packs several tokens into one chunk (fewer, longer ITLs)
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]
    errors: list[str]


def _text_of(choice: dict[str, Any]) -> str:
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


async def stream_request(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> RequestResult:
    """Send one streaming chat or completion request and time its chunks."""
    start = time.perf_counter()
    ttft: float | None = None
    last_text = last_choice = start
    itl: list[float] = []
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                return RequestResult(ok=False, error=f"HTTP {response.status_code}: {body[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and ": ping" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(ok=False, error=f"stream error: {str(chunk['error'])[:200]}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                if not choices:
                    continue
                last_choice = now
                if any(_text_of(choice) for choice in choices):
                    if ttft is None:
                        ttft = now - start
                    else:
                        itl.append(now - last_text)
                    last_text = now
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        return RequestResult(ok=False, error=f"{type(e).__name__}: {e}"[:200])
    if ttft is None:
        return RequestResult(ok=False, error="no chunk with generated text")
    if usage is None:
        return RequestResult(ok=False, error="no usage chunk (stream_options.include_usage ignored)")
    details = usage.get("prompt_tokens_details") or {}
    return RequestResult(
        ok=True,
        ttft=ttft,
        latency=last_choice - start,
        itl=itl,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        output_tokens=int(usage.get("completion_tokens", 0)),
        cached_tokens=int(details.get("cached_tokens") or 0),
    )


def poisson_gaps(count: int, rate: float | None, seed: int) -> list[float]:
    """Seconds to wait before each request: 0 for all when rate is None (inf), else exponential gaps."""
    if rate is None:
        return [0.0] * count
    rng = random.Random(seed)
    return [rng.expovariate(rate) if i else 0.0 for i in range(count)]


async def run_load(
    url: str,
    payloads: list[dict[str, Any]],
    *,
    rate: float | None = None,
    concurrency: int | None = None,
    seed: int = 0,
    headers: dict[str, str] | None = None,
    timeout_s: float = 600.0,
) -> tuple[list[RequestResult], float]:
    """Send ``payloads`` with Poisson arrivals at ``rate`` (None: all at once), at most ``concurrency``
    in flight (None: no cap). Return the per-request results in order and the run's wall time."""
    limit = asyncio.Semaphore(concurrency or len(payloads))
    connections = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=connections) as client:

        async def one(payload: dict[str, Any]) -> RequestResult:
            async with limit:
                return await stream_request(client, url, payload, headers)

        start = time.perf_counter()
        tasks = []
        for gap, payload in zip(poisson_gaps(len(payloads), rate, seed), payloads, strict=True):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(payload)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def _percentiles(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    ms = np.asarray(values_s) * 1000.0
    return {
        "mean": float(ms.mean()),
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
    }


def summarize(results: list[RequestResult], duration_s: float) -> RunSummary:
    """vLLM's aggregate metrics over one run."""
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return RunSummary(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        request_throughput=len(ok) / duration_s,
        output_throughput=output / duration_s,
        mean_prompt_tokens=float(np.mean([r.prompt_tokens for r in ok])) if ok else 0.0,
        mean_output_tokens=output / len(ok) if ok else 0.0,
        mean_cached_tokens=float(np.mean([r.cached_tokens for r in ok])) if ok else 0.0,
        tokens_per_chunk=output / sum(len(r.itl) + 1 for r in ok) if ok else 0.0,
        ttft_ms=_percentiles([r.ttft for r in ok]),
        tpot_ms=_percentiles(tpots),
        itl_ms=_percentiles([gap for r in ok for gap in r.itl]),
        e2el_ms=_percentiles([r.latency for r in ok]),
        errors=[r.error for r in results if not r.ok][:10],
    )
