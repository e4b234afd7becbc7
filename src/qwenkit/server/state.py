"""What the request handlers share: the model, the server's settings, metrics and the response cache."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

from qwenkit.generate import LLM
from qwenkit.server.errors import APIError
from qwenkit.server.metrics import ServerMetrics
from qwenkit.server.response_cache import ResponseCache


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str = "qwenkit"
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_queue: int = 256  # waiting requests (beyond the running batch) before 429
    request_timeout: float | None = None  # seconds, arrival to last token
    response_cache_entries: int = 512  # 0 turns the response cache off


@dataclass
class ServerState:
    llm: LLM
    config: ServerConfig
    metrics: ServerMetrics = field(init=False)
    response_cache: ResponseCache | None = field(init=False)
    active: int = 0  # submitted requests not yet finished
    draining: bool = False  # shutting down: not ready, no new requests
    # perf_counter() time at which running requests are stopped (shortly before the grace period ends, so
    # their streams end with an error event and [DONE] instead of being cancelled mid-write)
    drain_deadline: float | None = None

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.llm.engine, self.config.served_model_name)
        entries = self.config.response_cache_entries
        self.response_cache = ResponseCache(entries) if entries > 0 else None
        digest = hashlib.sha256(repr(self.llm.config).encode()).hexdigest()[:12]
        self.fingerprint = f"fp_qwenkit_{digest}"

    @property
    def model_name(self) -> str:
        return self.config.served_model_name

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                400,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )

    def waiting_estimate(self) -> int:
        return max(self.active - self.llm.engine.scheduler.max_batch, 0)

    def key_matches(self, given: str) -> bool:
        expected = self.config.api_key or ""
        return secrets.compare_digest(
            hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
        )
