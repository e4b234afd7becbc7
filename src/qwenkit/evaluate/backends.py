"""Where the model runs: a local ``LLM`` or any OpenAI-compatible endpoint, behind one small protocol.

Both give, for a batch of token-id contexts, the log-probability of each candidate next token (letter
scoring), and greedy text for prompts or chat messages. The endpoint path uses only what lm-eval's
``local-completions`` uses (``/tokenize``; ``/v1/completions`` with token-id prompts, ``echo`` and
``logprobs``; ``/v1/chat/completions``), so it works against ``qwenkit serve`` and vLLM alike.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from qwenkit.engine.kv_cache import chunk_attention, kernel_attention_runs
from qwenkit.errors import QwenkitError
from qwenkit.tools.template_style import template_style


class BackendError(QwenkitError, RuntimeError):
    """The model backend failed or an endpoint answered with something unusable."""


class Backend(Protocol):
    name: str  # "local" or "endpoint"

    def encode(self, text: str) -> list[int]:
        """The text's own ids, nothing added (a letter's spelling)."""
        ...

    def encode_prompt(self, text: str) -> list[int]:
        """A raw-text prompt's ids as the model reads it: with the tokenizer's BOS where it has one, as
        lm-eval's HF models and transformers' perplexity guide encode contexts."""
        ...

    def max_context(self) -> int | None:
        """Tokens the model takes in one sequence, where known."""
        ...

    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: list[int]) -> list[list[float]]:
        """For each context, log p(candidate | context) for every candidate token id."""
        ...

    def sequence_logprobs(
        self, sequences: Sequence[list[int]], first: Sequence[int] | None = None
    ) -> list[list[float]]:
        """For each sequence, log p(token i | tokens before it) for i = first .. len - 1 (``first`` per
        sequence, default 1: a sliding window's context tokens are never scored, so never computed)."""
        ...

    def complete(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy continuations of raw prompts (no chat template)."""
        ...

    def chat(self, messages: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str]:
        """Greedy replies with the model's own chat template."""
        ...

    def chat_tools(
        self, messages: Sequence[list[dict[str, Any]]], tools: Sequence[list[dict[str, Any]]], max_tokens: int
    ) -> list[ToolReply]:
        """Greedy replies offered ``tools`` (OpenAI form, one list per conversation), calls parsed."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the results file records about the model."""
        ...


@dataclass
class ToolReply:
    """A reply to a request with tools: the raw text (local) or message (endpoint), and its parts."""

    output: str
    content: str
    reasoning: str
    calls: list[dict[str, str]]  # {"name", "arguments" (JSON text)}


@dataclass
class LocalBackend:
    """A loaded ``LLM``. Letter scoring runs the network directly over right-padded batches (one forward
    per context, no KV cache needed; causal attention makes padding invisible to real tokens), with the
    engine's attention where its kernels run, so its log-probabilities are a server's; text generation
    goes through the engine, batched."""

    llm: Any  # qwenkit.generate.LLM
    batch_size: int = 8
    max_seq_len: int | None = None
    record: dict[str, Any] | None = None
    share_prefix_from: int = 64  # contexts sharing at least this many first tokens compute them once
    name: str = "local"

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode(text)

    def encode_prompt(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode_prompt(text)

    def max_context(self) -> int | None:
        return self.max_seq_len or self.llm.engine.max_seq_len

    @torch.inference_mode()
    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: list[int]) -> list[list[float]]:
        limit = self.max_seq_len or self.llm.engine.max_seq_len
        contexts = [c[-(limit - 1) :] if len(c) >= limit else c for c in contexts]  # keep the end, as Qwen
        out: list[list[float]] = [[] for _ in contexts]
        for prefix_len, members in _shared_prefix_groups(contexts, self.share_prefix_from):
            if self.llm.model.config.use_dynamic_ntk:
                prefix_len = 0  # the NTK alpha depends on each row's full length: nothing to share
            self._score_group(contexts, members, prefix_len, candidates, out)
        return out

    def _score_group(
        self,
        contexts: Sequence[list[int]],
        members: list[int],
        prefix_len: int,
        candidates: list[int],
        out: list[list[float]],
    ) -> None:
        """Score contexts sharing their first ``prefix_len`` tokens: the prefix runs once, then the rest of
        each context in right-padded batches attending over it."""
        model, dev = self.llm.model, self._device
        cache = _ScoringAttention(prefix=bool(prefix_len))
        if prefix_len:
            model(torch.tensor([contexts[members[0]][:prefix_len]], device=dev), cache=cache)
            cache.filling = False
        cand = torch.tensor(candidates, device=dev)
        order = sorted(members, key=lambda i: -len(contexts[i]))  # similar lengths together
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            tails = [contexts[i][prefix_len:] for i in rows]
            width = max(map(len, tails))
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for r, tail in enumerate(tails):
                ids[r, : len(tail)] = torch.tensor(tail)
            last = torch.tensor([r * width + len(t) - 1 for r, t in enumerate(tails)], device=dev)
            positions = torch.arange(prefix_len, prefix_len + width, device=dev).expand(len(rows), width)
            alphas = [model.ntk_alpha(len(contexts[i])) for i in rows]
            logits = model(
                ids.to(dev),
                positions=positions,
                cache=cache,
                ntk_alphas=alphas if any(a != 1.0 for a in alphas) else None,
                logits_index=last,
            ).float()  # (rows, V)
            logprobs = torch.log_softmax(logits, dim=-1)[:, cand].cpu()
            for r, i in enumerate(rows):
                out[i] = logprobs[r].tolist()

    @torch.inference_mode()
    def sequence_logprobs(
        self, sequences: Sequence[list[int]], first: Sequence[int] | None = None
    ) -> list[list[float]]:
        model, out = self.llm.model, []
        for seq, start in zip(sequences, first or [1] * len(sequences), strict=True):
            # one at a time: windows are long, and this keeps memory to one window; the output head only
            # where a token is scored (a 2,048-token window of stride 512 scores a quarter of them)
            ids = torch.tensor([seq], device=self._device)
            alpha = model.ntk_alpha(len(seq))
            attention = _ScoringAttention(prefix=False)
            at = torch.arange(start - 1, len(seq) - 1, device=ids.device)
            logits = model(
                ids, cache=attention, ntk_alphas=[alpha] if alpha != 1.0 else None, logits_index=at
            ).float()
            lps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, start:, None])[:, 0]
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

    def chat_tools(
        self, messages: Sequence[list[dict[str, Any]]], tools: Sequence[list[dict[str, Any]]], max_tokens: int
    ) -> list[ToolReply]:
        """The template renders the tools and the reply is parsed as the server parses it: hermes
        ``<tool_call>`` blocks (and a leading ``<think>``), Llama 3's JSON calls, or ReAct for a template
        without tools (v1)."""
        tokenizer = self.llm.tokenizer
        style = template_style(tokenizer.chat_template)
        prompts = [
            style.tool_prompt(tokenizer, m, offered) for m, offered in zip(messages, tools, strict=True)
        ]
        params = self.llm.default_params(temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.0)
        params = _with(params, top_k=0, top_p=1.0, stop=style.stop)
        replies = []
        for prompt, completion in zip(prompts, self.llm.generate(prompts, params), strict=True):
            text = completion.text
            parsed = style.parse_reply(tokenizer.decode, prompt, text)
            calls = [{"name": c.name, "arguments": c.arguments} for c in parsed.tool_calls]
            replies.append(ToolReply(text, parsed.content, parsed.reasoning, calls))
        return replies

    def describe(self) -> dict[str, Any]:
        # the context a prompt is cut to (its last tokens kept): what the truncation record refers to
        return {"backend": "local", **(self.record or {}), "context_tokens": self.max_context()}


class _ScoringAttention:
    """The attention of a scoring forward (``qwenkit.model.attention.KVCache``): causal over each row of
    a right-padded batch, after the KV of one shared prefix (few-shot examples) where one was filled by a
    first forward. Where the engine's kernels run (bf16 on the CPU) each row is the engine's own
    ``chunk_attention``, so a context's log-probabilities are the bits a server's engine gives for it
    (torch's SDPA, used elsewhere, rounds a query's result by the call's query count: through the int8
    activations of quantized layers that moved the bundled model's letters by up to 0.3 nats)."""

    def __init__(self, prefix: bool) -> None:
        self.k: dict[int, torch.Tensor] = {}  # the prefix's (1, Hkv, P, D)
        self.v: dict[int, torch.Tensor] = {}
        self.filling = prefix
        # each row's key slots and query positions, by (rows, width, prefix): the same at every layer
        self._where: dict[tuple[int, int, int], tuple[list[torch.Tensor], torch.Tensor]] = {}

    def decode_pools(self) -> None:
        """Never: scoring runs the modules."""
        return None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.filling:
            self.k[layer], self.v[layer] = k, v
        pk, pv = self.k.get(layer), self.v.get(layer)
        if self.filling or pk is None:
            pk = pv = None
        batch, heads, t, dim = q.shape
        if kernel_attention_runs(q.dtype, q.device, dim) and not q.requires_grad:
            return self._rows(q, k, v, pk, pv)
        gqa = heads != k.shape[1]
        if pk is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        p = pk.shape[2]
        keys = torch.cat([pk.expand(batch, -1, -1, -1), k], dim=2)  # (B, Hkv, P+T, D)
        values = torch.cat([pv.expand(batch, -1, -1, -1), v], dim=2)
        mask = torch.ones(t, p + t, dtype=torch.bool, device=q.device)
        mask[:, p:] = torch.tril(mask[:, p:])  # own tokens causally; the whole prefix always
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)

    def _rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pk: torch.Tensor | None,
        pv: torch.Tensor | None,
    ) -> torch.Tensor:
        """Each row's queries over the prefix's keys and its own, read from one pool of all of them."""
        batch, _, t, dim = q.shape
        parts_k = [k.transpose(1, 2).reshape(batch * t, -1, dim)]  # (B*T, Hkv, D): row b at b*T
        parts_v = [v.transpose(1, 2).reshape(batch * t, -1, dim)]
        p = 0
        if pk is not None:
            p = pk.shape[2]
            parts_k.insert(0, pk[0].transpose(0, 1))
            parts_v.insert(0, pv[0].transpose(0, 1))
        kc, vc = torch.cat(parts_k), torch.cat(parts_v)
        if (batch, t, p) not in self._where:
            prefix = torch.arange(p, device=q.device)
            slots = [
                torch.cat([prefix, torch.arange(p + b * t, p + (b + 1) * t, device=q.device)])
                for b in range(batch)
            ]
            self._where[batch, t, p] = slots, torch.arange(p, p + t, device=q.device)
        slots, positions = self._where[batch, t, p]
        scale, out = dim**-0.5, []
        for b in range(batch):
            queries = q[b].transpose(0, 1).contiguous()  # (T, H, D)
            rows = chunk_attention(queries, kc, vc, slots[b], p, scale, positions)
            out.append(rows.transpose(0, 1))  # (H, T, D)
        return torch.stack(out)


def _shared_prefix_groups(contexts: Sequence[list[int]], min_shared: int) -> list[tuple[int, list[int]]]:
    """Groups of context indices with the length of the prefix they all share (0: none worth sharing).
    Lexicographic order puts contexts with the same few-shot prefix next to each other."""
    order = sorted(range(len(contexts)), key=lambda i: contexts[i])
    groups: list[tuple[int, list[int]]] = []
    members: list[int] = []
    shared = 0
    for i in order:
        if members:
            common = _common_prefix(contexts[members[0]], contexts[i], shared)
            if common >= min_shared:
                members.append(i)
                shared = common
                continue
            groups.append((shared if len(members) > 1 else 0, members))
        members, shared = [i], len(contexts[i]) - 1
    if members:
        groups.append((shared if len(members) > 1 else 0, members))
    # every context keeps at least one token of its own, so its last position has logits
    return [(min(n, *(len(contexts[i]) - 1 for i in m)) if n else 0, m) for n, m in groups]


def _common_prefix(a: list[int], b: list[int], at_most: int) -> int:
    n = min(len(a), len(b), at_most)
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _with(params: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(params, **changes)


# Greedy with no repetition penalty, as Qwen's scripts generate (a server's own defaults may add one).
# repetition_penalty is a vLLM / qwenkit extension field; OpenAI's own API does not take it.
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}


class EndpointRefusal(BackendError):
    """The endpoint answered, with an HTTP status other than 200."""


def _without_password(url: str) -> str:
    """The URL with a password written into it (``http://user:secret@host``) starred out, so that it
    never lands in results.json or on the screen."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:  # not a URL httpx will take either: it says so, naming what was given
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


@dataclass
class EndpointBackend:
    """An OpenAI-compatible server. Letter scoring sends each context + candidate as token ids with
    ``echo`` and ``logprobs=0`` and ``max_tokens=0``, and reads the last prompt token's log-probability
    (the contract lm-eval's ``local-completions`` relies on). A reply that is not what that contract
    says (not JSON, a field missing) or none within ``timeout`` seconds is a one-line ``BackendError``
    naming the endpoint."""

    url: str
    model: str | None = None
    api_key: str | None = None
    concurrency: int = 4
    timeout: float = 600.0  # seconds a request may wait for its answer (--request-timeout)
    name: str = "endpoint"

    def __post_init__(self) -> None:
        import httpx

        self.url = self.url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.shown_url = _without_password(self.url)  # what messages and results.json say
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(headers=headers, timeout=self.timeout)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.model:
            body = {"model": self.model, **body}
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON object the endpoint answers; one line naming it for no answer, a status other than 200
        (EndpointRefusal), or a body that is not a JSON object."""
        import httpx

        where = f"endpoint {self.shown_url}{path}"
        try:
            response = self._client.request(method, self.url + path, json=body)
        except httpx.TimeoutException:
            raise BackendError(
                f"{where} did not answer within {self.timeout:g} s (--request-timeout)"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:  # InvalidURL ("http://[::1") is no HTTPError
            raise BackendError(f"{where}: {e}") from None
        if response.status_code != 200:
            raise EndpointRefusal(f"{where} answered {response.status_code}: {_excerpt(response.text)}")
        try:
            reply = response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise BackendError(
                f"{where} answered with a body that is not JSON ({kind}): {_excerpt(response.text)}"
            ) from None
        if not isinstance(reply, dict):
            raise BackendError(f"{where} answered JSON that is not an object: {_excerpt(response.text)}")
        return reply

    def _field(self, reply: dict[str, Any], path: str, *keys: str | int) -> Any:
        """``reply[k0][k1]...``, or a one-line error naming the endpoint and the field it lacks."""
        value: Any = reply
        for n, key in enumerate(keys):
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                field = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys[: n + 1])
                raise BackendError(
                    f"endpoint {self.shown_url}{path} answered without {field.lstrip('.')}: "
                    f"{_excerpt(json.dumps(reply))}"
                ) from None
        return value

    def _map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        """``fn`` over ``items``, ``concurrency`` requests at a time, results in order. After a failure or
        an interrupt (Ctrl-C, SIGTERM) no further request is sent, and those in flight are left behind on
        daemon threads rather than waited for: each could take --request-timeout, and a socket blocked in
        a worker cannot be woken (a thread pool's shutdown, and its join at exit, waited for them)."""
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(items)):
            todo.put(i)
        done: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()
        stop = threading.Event()

        def work() -> None:
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((i, fn(items[i]), None))
                except BaseException as e:  # the caller's thread raises it; nothing more is sent
                    stop.set()
                    done.put((i, None, e))

        for _ in range(min(max(1, self.concurrency), len(items))):
            threading.Thread(target=work, daemon=True).start()
        results: list[Any] = [None] * len(items)
        try:
            for _ in items:
                i, value, error = done.get()
                if error is not None:
                    raise error
                results[i] = value
        finally:
            stop.set()
        return results

    def encode(self, text: str) -> list[int]:
        return self._tokenize(text, add_special_tokens=False)

    def encode_prompt(self, text: str) -> list[int]:
        return self._tokenize(text, add_special_tokens=True)

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        reply = self._post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})
        return self._field(reply, "/tokenize", "tokens")

    def max_context(self) -> int | None:
        """The server's ``max_model_len`` in ``GET /v1/models`` (qwenkit serve and vLLM report it), for
        the model named (or the first listed). None where the server does not say: no such route (any
        status but 200), no such field, not the model asked for; it is not part of the OpenAI API. An
        endpoint that cannot be reached, or answers what is not JSON, is the one-line error of any request.
        """
        try:
            reply = self._request("GET", "/v1/models")
        except EndpointRefusal:
            return None
        listed = reply.get("data")
        cards = [m for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []
        if self.model is not None:
            cards = [m for m in cards if m.get("id") == self.model]
        length = cards[0].get("max_model_len") if cards else None
        return length if type(length) is int and length > 0 else None

    @functools.cached_property
    def _context_limit(self) -> int | None:
        return self.max_context()

    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: list[int]) -> list[list[float]]:
        path = "/v1/completions"
        limit = self._context_limit
        if limit is not None:
            # Keep the end, as Qwen and the local backend do (which keep limit - 1 tokens): here the letter
            # rides in the prompt, and a server refuses a prompt that fills its context (qwenkit serve even
            # with max_tokens 0), so one token fewer.
            contexts = [c[-(limit - 2) :] if len(c) >= limit - 1 else c for c in contexts]

        def one(context: list[int]) -> list[float]:
            body = {
                "prompt": [[*context, c] for c in candidates],
                "max_tokens": 0,
                "echo": True,
                "logprobs": 0,
                "temperature": 0,
            }
            reply = self._post(path, body)
            n = len(self._field(reply, path, "choices"))
            order = sorted(range(n), key=lambda i: self._field(reply, path, "choices", i, "index"))
            values = [self._field(reply, path, "choices", i, "logprobs", "token_logprobs", -1) for i in order]
            if len(values) != len(candidates) or any(v is None for v in values):
                raise BackendError(
                    f"endpoint {self.shown_url}{path} returned no prompt log-probabilities (echo + logprobs)"
                )
            return values

        return self._map(one, contexts)

    def sequence_logprobs(
        self, sequences: Sequence[list[int]], first: Sequence[int] | None = None
    ) -> list[list[float]]:
        path = "/v1/completions"

        def one(item: tuple[list[int], int]) -> list[float]:
            seq, start = item
            body = {"prompt": seq, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
            reply = self._post(path, body)
            values = self._field(reply, path, "choices", 0, "logprobs", "token_logprobs")[start:]
            if any(v is None for v in values):
                raise BackendError(
                    f"endpoint {self.shown_url}{path} returned no prompt log-probabilities (echo + logprobs)"
                )
            return values

        return self._map(one, list(zip(sequences, first or [1] * len(sequences), strict=True)))

    def complete(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str]) -> list[str]:
        path = "/v1/completions"

        def one(prompt: str) -> str:
            body = {
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stop": list(stop)[:4] or None,
            }
            return self._field(self._post(path, body), path, "choices", 0, "text")

        return self._map(one, prompts)

    def chat(self, messages: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str]:
        path = "/v1/chat/completions"

        def one(conversation: list[dict[str, str]]) -> str:
            body = {"messages": conversation, "max_tokens": max_tokens, **GREEDY}
            return self._field(self._post(path, body), path, "choices", 0, "message", "content") or ""

        return self._map(one, messages)

    def chat_tools(
        self, messages: Sequence[list[dict[str, Any]]], tools: Sequence[list[dict[str, Any]]], max_tokens: int
    ) -> list[ToolReply]:
        """The OpenAI ``tools`` field with ``tool_choice: auto``; the server parses the calls."""
        path = "/v1/chat/completions"

        def one(pair: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> ToolReply:
            conversation, offered = pair
            body = {
                "messages": conversation,
                "tools": offered,
                "tool_choice": "auto",
                "max_tokens": max_tokens,
            }
            reply = self._post(path, {**body, **GREEDY})
            message = self._field(reply, path, "choices", 0, "message")
            if not isinstance(message, dict):
                raise BackendError(
                    f"endpoint {self.shown_url}{path} answered a choices[0].message that is not an object: "
                    f"{_excerpt(json.dumps(reply))}"
                )
            calls = []
            for call in message.get("tool_calls") or []:
                fn = call.get("function") or {}
                calls.append({"name": str(fn.get("name", "")), "arguments": str(fn.get("arguments", ""))})
            content = message.get("content") or ""
            reasoning = message.get("reasoning_content") or ""
            return ToolReply(json.dumps(message, ensure_ascii=False), content, reasoning, calls)

        return self._map(one, list(zip(messages, tools, strict=True)))

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "endpoint",
            "url": self.shown_url,
            "model": self.model,
            "context_tokens": self._context_limit,
            "system_fingerprint": self.system_fingerprint(),
        }

    def system_fingerprint(self) -> str | None:
        """The server's ``system_fingerprint`` from a one-token chat answer: what tells a resumed run
        that another model (or dtype, or quantization) now answers behind the same URL and name, where
        the server sets it (qwenkit serve does; None otherwise, or where the endpoint has no chat)."""
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **GREEDY}
        try:
            return self._post("/v1/chat/completions", body).get("system_fingerprint")
        except EndpointRefusal:  # no chat here; an endpoint that is down or silent fails the run now
            return None


def _excerpt(text: str, length: int = 120) -> str:
    """The start of a reply body on one line (an HTML page or a traceback has many)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= length else flat[:length] + "..."
