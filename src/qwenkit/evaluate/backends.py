"""Where the model runs: a local ``LLM`` or any OpenAI-compatible endpoint, behind one small protocol.

Both give, for a batch of token-id contexts, the log-probability of each candidate next token (letter
scoring), and greedy text for prompts or chat messages. The endpoint path uses only what lm-eval's
``local-completions`` uses (``/tokenize``; ``/v1/completions`` with token-id prompts, ``echo`` and
``logprobs``; ``/v1/chat/completions``), so it works against ``qwenkit serve`` and vLLM alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from qwenkit.errors import QwenkitError


class BackendError(QwenkitError, RuntimeError):
    """The model backend failed or an endpoint answered with something unusable."""


class Backend(Protocol):
    name: str  # "local" or "endpoint"

    def encode(self, text: str) -> list[int]: ...

    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: list[int]) -> list[list[float]]:
        """For each context, log p(candidate | context) for every candidate token id."""
        ...

    def sequence_logprobs(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        """For each sequence, log p(token i | tokens before it) for i = 1 .. len - 1."""
        ...

    def complete(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy continuations of raw prompts (no chat template)."""
        ...

    def chat(self, messages: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str]:
        """Greedy replies with the model's own chat template."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the results file records about the model."""
        ...


@dataclass
class LocalBackend:
    """A loaded ``LLM``. Letter scoring runs the network directly over right-padded batches (one forward
    per context, no KV cache needed; causal attention makes padding invisible to real tokens); text
    generation goes through the engine, batched."""

    llm: Any  # qwenkit.generate.LLM
    batch_size: int = 8
    max_seq_len: int | None = None
    record: dict[str, Any] | None = None
    name: str = "local"

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode(text)

    @torch.inference_mode()
    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: list[int]) -> list[list[float]]:
        model = self.llm.model
        limit = self.max_seq_len or self.llm.engine.max_seq_len
        contexts = [c[-(limit - 1) :] if len(c) >= limit else c for c in contexts]  # keep the end, as Qwen
        order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))  # similar lengths together
        out: list[list[float]] = [[] for _ in contexts]
        cand = torch.tensor(candidates)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(contexts[i]) for i in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(contexts[i])] = torch.tensor(contexts[i])
            last = torch.tensor([r * width + len(contexts[i]) - 1 for r, i in enumerate(rows)])
            alphas = [model.ntk_alpha(len(contexts[i])) for i in rows]
            logits = model(
                ids.to(self._device),
                ntk_alphas=alphas if any(a != 1.0 for a in alphas) else None,
                logits_index=last.to(self._device),
            ).float()  # (rows, V)
            logprobs = torch.log_softmax(logits, dim=-1)[:, cand.to(logits.device)].cpu()
            for r, i in enumerate(rows):
                out[i] = logprobs[r].tolist()
        return out

    @torch.inference_mode()
    def sequence_logprobs(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        model, out = self.llm.model, []
        for seq in sequences:  # one at a time: windows are long, and this keeps memory to one window
            ids = torch.tensor([seq], device=self._device)
            alpha = model.ntk_alpha(len(seq))
            logits = model(ids, ntk_alphas=[alpha] if alpha != 1.0 else None)[0, :-1].float()  # (T-1, V)
            lps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
            out.append(lps.cpu().tolist())
        return out

    @property
    def _device(self) -> torch.device:
        return next(self.llm.model.parameters()).device

    def complete(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str]) -> list[str]:
        params = self.llm.default_params(temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.0)
        params = _with(params, stop=tuple(stop), top_k=0, top_p=1.0)
        return [c.text for c in self.llm.generate(list(prompts), params)]

    def chat(self, messages: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str]:
        params = self.llm.default_params(temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.0)
        params = _with(params, top_k=0, top_p=1.0)
        prompts = [self.llm.tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in messages]
        return [c.text for c in self.llm.generate(prompts, params)]

    def describe(self) -> dict[str, Any]:
        return {"backend": "local", **(self.record or {})}


def _with(params: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(params, **changes)


# Greedy with no repetition penalty, as Qwen's scripts generate (a server's own defaults may add one).
# repetition_penalty is a vLLM / qwenkit extension field; OpenAI's own API does not take it.
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}


@dataclass
class EndpointBackend:
    """An OpenAI-compatible server. Letter scoring sends each context + candidate as token ids with
    ``echo`` and ``logprobs=0`` and ``max_tokens=0``, and reads the last prompt token's log-probability
    (the contract lm-eval's ``local-completions`` relies on)."""

    url: str
    model: str | None = None
    api_key: str | None = None
    concurrency: int = 4
    timeout: float = 600.0
    name: str = "endpoint"

    def __post_init__(self) -> None:
        import httpx

        self.url = self.url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(headers=headers, timeout=self.timeout)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        if self.model:
            body = {"model": self.model, **body}
        try:
            response = self._client.post(self.url + path, json=body)
        except httpx.HTTPError as e:
            raise BackendError(f"endpoint {self.url}{path}: {e}") from None
        if response.status_code != 200:
            raise BackendError(
                f"endpoint {self.url}{path} answered {response.status_code}: {response.text[:200]}"
            )
        return response.json()

    def _map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(fn, items))

    def encode(self, text: str) -> list[int]:
        return self._post("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]

    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: list[int]) -> list[list[float]]:
        def one(context: list[int]) -> list[float]:
            body = {
                "prompt": [[*context, c] for c in candidates],
                "max_tokens": 0,
                "echo": True,
                "logprobs": 0,
                "temperature": 0,
            }
            choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
            values = [c["logprobs"]["token_logprobs"][-1] for c in choices]
            if len(values) != len(candidates) or any(v is None for v in values):
                raise BackendError("the endpoint returned no prompt log-probabilities (echo + logprobs)")
            return values

        return self._map(one, contexts)

    def sequence_logprobs(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        def one(seq: list[int]) -> list[float]:
            body = {"prompt": seq, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
            values = self._post("/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"][1:]
            if any(v is None for v in values):
                raise BackendError("the endpoint returned no prompt log-probabilities (echo + logprobs)")
            return values

        return self._map(one, sequences)

    def complete(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str]) -> list[str]:
        def one(prompt: str) -> str:
            body = {
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stop": list(stop)[:4] or None,
            }
            return self._post("/v1/completions", body)["choices"][0]["text"]

        return self._map(one, prompts)

    def chat(self, messages: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str]:
        def one(conversation: list[dict[str, str]]) -> str:
            body = {"messages": conversation, "max_tokens": max_tokens, **GREEDY}
            return self._post("/v1/chat/completions", body)["choices"][0]["message"]["content"] or ""

        return self._map(one, messages)

    def describe(self) -> dict[str, Any]:
        return {"backend": "endpoint", "url": self.url, "model": self.model}
