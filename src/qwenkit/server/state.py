"""What the request handlers share: the model, the server's settings, metrics and the response cache."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenkit.generate import LLM
from qwenkit.server.errors import model_not_found
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
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, directory) of each adapter served by name
    runtime_lora: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's) are on
    max_request_bytes: int = 64 << 20  # a body past this is a 413, before it is held in memory
    # the chat template's kwargs on every chat request (vLLM's --default-chat-template-kwargs); a
    # request's own chat_template_kwargs win key by key
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


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
        # the adapters served by name -> their directory: --lora-modules', then those loaded at run time
        self.adapters: dict[str, str] = dict(self.config.lora_modules)
        self.adapters_changing = asyncio.Lock()  # one load or unload at a time
        lora = self.adapters if self.adapters or self.config.runtime_lora else None
        self.metrics = ServerMetrics(self.llm.engine, self.config.served_model_name, lora)
        entries = self.config.response_cache_entries
        self.response_cache = ResponseCache(entries) if entries > 0 else None
        self.fingerprint = f"fp_qwenkit_{model_fingerprint(self.llm)}"
        # each served adapter's own: another adapter under a name answers otherwise, as other weights do
        self.adapter_prints = {name: adapter_fingerprint(path) for name, path in self.adapters.items()}

    @property
    def model_name(self) -> str:
        return self.config.served_model_name

    def check_model(self, name: str | None) -> str | None:
        """The adapter a request for model ``name`` runs through (None: the server's default); an
        unknown name is refused. No name, or an empty one, is the base model (as vLLM takes it)."""
        if not name or name == self.model_name:
            return None
        if name in self.adapters:
            return name
        served = ", ".join(repr(n) for n in (self.model_name, *self.adapters))
        raise model_not_found(name, f"; this server serves {served}")

    def forget_answers(self, adapter: str) -> None:
        """Adapter ``adapter`` changed (loaded, replaced or unloaded): no remembered answer of it is
        given again."""
        if self.response_cache is not None:
            self.response_cache.forget(adapter)

    def serve_adapter(self, name: str, path: str) -> None:
        """Adapter ``name`` now answers with the weights at ``path`` (loaded or replaced)."""
        self.adapters[name] = path
        self.adapter_prints[name] = adapter_fingerprint(path)
        self.forget_answers(name)

    def fingerprint_for(self, adapter: str | None) -> str:
        """The ``system_fingerprint`` of answers through ``adapter`` (None: the base model's)."""
        if adapter is None:
            return self.fingerprint
        weights = self.adapter_prints.get(adapter, "unloaded")  # unloaded while this request started
        both = hashlib.sha256(f"{self.fingerprint} {weights}".encode())
        return f"fp_qwenkit_{both.hexdigest()[:12]}"

    def response_model(self, adapter: str | None) -> str:
        """The "model" field of a response: the adapter's name where the request named one."""
        return adapter or self.model_name

    def waiting_estimate(self, more: int = 0) -> int:
        """Requests that would wait for a batch row were ``more`` submitted now: those past the rows, not
        every new one (an idle server under ``--max-queue 0`` still runs a request, or ``n`` choices that
        fit its rows)."""
        return max(self.active + more - self.llm.engine.scheduler.max_batch, 0)

    def key_matches(self, given: str) -> bool:
        expected = self.config.api_key or ""
        return secrets.compare_digest(
            hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
        )


def model_fingerprint(llm) -> str:
    """OpenAI's ``system_fingerprint``: what the answers depend on, so a client (``qwenkit eval`` resuming
    a run) can tell that the server behind a name changed. The config and chat template, and each
    weight's name, shape, dtype and first 4,096 values: another checkpoint, dtype or quantization
    changes it, at the cost of reading a few megabytes at start-up rather than every weight."""
    digest = hashlib.sha256(repr(llm.config).encode())
    digest.update((getattr(llm.tokenizer, "chat_template", None) or "").encode())
    for name, template in sorted(getattr(llm.tokenizer, "chat_templates", {}).items()):
        if name != "default":  # a named one (tool_use) renders requests too
            digest.update(f"\0{name}\0{template}".encode())
    for name, tensor in llm.model.state_dict().items():
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def adapter_fingerprint(path: str | Path) -> str:
    """A digest of an adapter directory's config and weights (peft's files: a few megabytes)."""
    digest = hashlib.sha256()
    for f in sorted(Path(path).glob("adapter_*")):
        if f.is_file():
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()
