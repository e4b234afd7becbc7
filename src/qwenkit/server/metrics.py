"""Prometheus metrics under the names vLLM exports, so existing vLLM dashboards and alerts work as-is.

Gauges are read from the engine when scraped; counters and histograms are fed by the request handlers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from qwenkit.engine.engine import Engine

disable_created_metrics()  # no *_created series: vLLM's dashboards do not use them

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# the methods labelled by name (RFC 9110 and PATCH); any other is "other"
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))


class _PrefixCacheCollector:
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self):
        stats = self.engine.stats()
        for name, value, doc in (
            (
                "vllm:prefix_cache_queries",
                stats.prefix_queries,
                "Prompt tokens looked up in the prefix cache.",
            ),
            ("vllm:prefix_cache_hits", stats.prefix_hits, "Prompt tokens found in the prefix cache."),
            ("vllm:num_preemptions", stats.preemptions, "Requests preempted for lack of KV blocks."),
        ):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class _LoraCollector:
    """vLLM's ``vllm:lora_requests_info``: the served adapters of the running and of the waiting requests
    as labels (comma-separated), ``--max-loras`` as ``max_lora`` (without it, the number served), the
    scrape time as the value."""

    def __init__(self, engine: Engine, adapters: Mapping[str, str]) -> None:
        self.engine, self.adapters = engine, adapters  # the server's, changed by loads at run time

    def collect(self):
        scheduler = self.engine.scheduler
        # copies made in one C call each, so the engine thread cannot change them halfway
        running, waiting = list(scheduler.running), list(scheduler.waiting)

        def names(requests) -> str:
            return ",".join(sorted({r.params.adapter for r in requests if r.params.adapter}))

        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["running_lora_adapters", "max_lora", "waiting_lora_adapters"],
        )
        bank = self.engine.adapters  # --max-loras where given (vLLM's label), else the number served
        most = len(self.adapters) if bank is None or bank.capacity is None else bank.capacity
        family.add_metric([names(running), str(most), names(waiting)], time.time())
        yield family


class ServerMetrics:
    def __init__(self, engine: Engine, model_name: str, adapters: Mapping[str, str] | None = None) -> None:
        """``adapters``: the adapters served by name (None: the server serves none, and never will)."""
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r, m = self.registry, model_name

        def gauge(name: str, doc: str, read) -> None:
            Gauge(name, doc, labels, registry=r).labels(m).set_function(read)

        gauge("vllm:num_requests_running", "Requests in the running batch.", lambda: engine.stats().running)
        gauge("vllm:num_requests_waiting", "Requests waiting to start.", lambda: engine.stats().waiting)
        gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (1 = full).",
            lambda: engine.stats().kv_usage,
        )
        r.register(_PrefixCacheCollector(engine, m))
        if adapters is not None:
            r.register(_LoraCollector(engine, adapters))
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=r
        ).labels(m)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", labels, registry=r
        ).labels(m)
        self._success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to the first token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(m)
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token after the first.",
            labels,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        ).labels(m)
        # vLLM's: one observation per delivery of new tokens after a choice's first (an engine step's
        # tokens, or several steps' that reached the handler together)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between deliveries of a choice's new tokens.",
            labels,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        ).labels(m)
        # vLLM's: from the request's submission to the engine's first step of it (its time waiting)
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time a request waited, from its submission to its first scheduled step.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(m)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(m)
        self.response_cache_hits = Counter(
            "qwenkit:response_cache_hits", "Requests answered from the response cache.", labels, registry=r
        ).labels(m)
        # Every answer by route and exact status (vLLM's instrumentator names, though it groups statuses
        # as 4xx): refusals (401, 400, 429, a draining 503) reach no engine, so nothing else counts them.
        self._http = Counter(
            "http_requests",
            "HTTP requests answered, by route, method and status.",
            ["handler", "method", "status"],
            registry=r,
        )
        self.model_name = m

    def answered(self, handler: str, method: str, status: int) -> None:
        # the HTTP parser takes any token as a method: a label for each would grow without bound
        method = method if method in _METHODS else "other"
        self._http.labels(handler, method, str(status)).inc()

    def finished(
        self,
        reason: str | None,
        prompt_tokens: int,
        output_tokens: int,
        ttft: float | None,
        e2e: float,
        from_cache: bool = False,
        queued: float | None = None,
    ) -> None:
        """Record one finished choice. One answered from the response cache (``from_cache``) counts as a
        request with its latency, but its tokens were neither processed nor generated: the token
        counters (throughput on vLLM's dashboards) and the time per output token leave it out, and it
        never queued. ``queued``: seconds from submission to its first step (None: it had none)."""
        self._success.labels(self.model_name, reason or "abort").inc()
        self.e2e.observe(e2e)
        if ttft is not None:
            self.ttft.observe(ttft)
        if from_cache:
            return
        if queued is not None:
            self.queue_time.observe(queued)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        if ttft is not None and output_tokens > 1:
            self.tpot.observe((e2e - ttft) / (output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
