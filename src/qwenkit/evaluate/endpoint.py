"""An OpenAI-compatible server as an evaluation backend. It uses only what lm-eval's ``local-completions``
uses (``/tokenize``; ``/v1/completions`` with token-id prompts, ``echo`` and ``logprobs``;
``/v1/chat/completions``), so it works against ``qwenkit serve`` and vLLM alike.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwenkit.evaluate.backends import BackendError, ToolReply
from qwenkit.tokenizer.thinking import THINK_CLOSE, THINK_OPEN

GREEDY = {"temperature": 0, "repetition_penalty": 1.0}


class EndpointRefusal(BackendError):
    """The endpoint answered, with an HTTP status other than 200."""


def _reasoning(message: dict[str, Any]) -> str:
    """The thinking a server split off a reply: vLLM's ``reasoning`` (newer) or ``reasoning_content``."""
    for key in ("reasoning", "reasoning_content"):
        if isinstance(message.get(key), str) and message[key]:
            return message[key]
    return ""


def whole_turn(reasoning: str, content: str, finish_reason: str | None) -> str:
    """A chat reply as a local run records it: the thinking the server split off back in its ``<think>``
    block before the answer, as Qwen3 writes it, so evaluation's one split gives the sample its
    ``thinking`` (and ``--rescore`` reads the saved reply again). A reply cut off while thinking never
    wrote its ``</think>``."""
    if not reasoning:
        return content
    if not content and finish_reason == "length":
        return f"{THINK_OPEN}\n{reasoning}"
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{content}"


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
            # Keep the end, as Qwen and the local backend do (which keep limit - 1 tokens). Here the letter
            # rides in the prompt, so limit - 1 would send a prompt of limit tokens: qwenkit serve scores it
            # (max_tokens 0), but vLLM refuses any prompt of max_model_len tokens or more ("input length can
            # be up to model context length - 1"; echo with max_tokens 0 runs as max_tokens 1 there), so
            # one token fewer, and the prompt (context and letter) is limit - 1 tokens.
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
            reply = self._post(path, body)
            content = self._field(reply, path, "choices", 0, "message", "content") or ""
            choice = reply["choices"][0]
            return whole_turn(_reasoning(choice["message"]), content, choice.get("finish_reason"))

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
            reasoning = _reasoning(message)
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
