"""Where the model runs: a local ``LLM`` or any OpenAI-compatible endpoint (``endpoint.py``), behind one
small protocol.

Both give, for a batch of token-id contexts, the log-probability of each candidate next token (letter
scoring), and greedy text for prompts or chat messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from qwenkit.engine.kv_cache import chunk_attention, kernel_attention_runs
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer.thinking import THINK_OPEN, prompt_opens_thinking
from qwenkit.tools.template_style import tool_style


class BackendError(QwenkitError, RuntimeError):
    """The model backend failed or an endpoint answered with something unusable."""


class Backend(Protocol):
    name: str  # "local" or "endpoint"

    def encode(self, text: str) -> list[int]:
        """The text's own ids, nothing added (a letter's spelling)."""
        ...

    def encode_prompt(self, text: str) -> list[int]:
        """A raw-text prompt's ids as the model reads it: with the tokenizer's BOS where it has one, as
        lm-eval's HF models and transformers' perplexity guide encode contexts; special-token text in it
        is the token, as they and a server's ``/tokenize`` read it."""
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

    # special-token text in an item is the token, as the endpoint's /tokenize reads a prompt and as
    # lm-eval's HF backend (transformers' tokenizer(text)) reads it: an item gets the same ids either way
    def encode(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode(text, allow_special=True)

    def encode_prompt(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode_prompt(text, allow_special=True)

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
        """Each reply as the assistant's whole turn: where the prompt opened ``<think>`` (Qwen3-2507
        Thinking), the reply starts with it, so the saved reply splits alone, then and on --rescore."""
        params = self.llm.default_params(temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.0)
        params = _with(params, top_k=0, top_p=1.0)
        prompts = [self.llm.tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in messages]
        decode, replies = self.llm.tokenizer.decode, []
        for prompt, completion in zip(prompts, self.llm.generate(prompts, params), strict=True):
            tail = decode(list(prompt[-4:])) if prompt_opens_thinking(decode, prompt) else ""
            opening = tail[tail.rfind(THINK_OPEN) :] if tail else ""  # "<think>\n", as the prompt wrote it
            replies.append(opening + completion.text)
        return replies

    def chat_tools(
        self, messages: Sequence[list[dict[str, Any]]], tools: Sequence[list[dict[str, Any]]], max_tokens: int
    ) -> list[ToolReply]:
        """The template renders the tools and the reply is parsed as the server parses it: hermes
        ``<tool_call>`` blocks (and a leading ``<think>``), Llama 3's JSON calls, or ReAct for a template
        without tools (v1)."""
        tokenizer = self.llm.tokenizer
        # each item's own: the template its tools pick (a model's "tool_use" one where no tools pick none)
        styles = [tool_style(tokenizer, offered) for offered in tools]
        prompts = [
            style.tool_prompt(tokenizer, m, offered)
            for style, m, offered in zip(styles, messages, tools, strict=True)
        ]
        params = self.llm.default_params(temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.0)
        stop = tuple(dict.fromkeys(word for style in styles for word in style.stop))
        params = _with(params, top_k=0, top_p=1.0, stop=stop)
        replies = []
        done = self.llm.generate(prompts, params)
        for style, prompt, completion in zip(styles, prompts, done, strict=True):
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
