"""Sparse mixture-of-experts feed-forward (Qwen1.5/2-MoE, Qwen3-MoE), with Hugging Face names.

Notation:
    N  tokens in the step (batch rows x new tokens, flattened)     E  routed experts
    K  experts per token (top-k)                                   h  hidden size

Each token's router picks its top-K experts by softmax probability (optionally renormalized to sum
to 1); the output is the routing-weighted sum of those experts' SwiGLU outputs, plus, in Qwen2-MoE, a
shared expert scaled by a sigmoid gate. Dispatch is grouped: the N*K (token, expert) pairs are sorted
by expert, and each active expert runs once over all of its tokens, so its weights are read once per
step whatever the batch. A token's K outputs are added in its own rank order, so its result never
depends on what else is in the batch, in float32 and rounded once (as transformers 5's experts, vLLM
and llama.cpp add them; K - 1 bf16 roundings put top-4 logits up to 8 bf16 steps off transformers').

Experts are kept as separate ``MLP`` modules (``mlp.experts.{e}.gate_proj.weight``, the checkpoint's
own names) rather than stacked 3-D tensors: a grouped dispatch reads each active expert's weights
once either way, and separate ``nn.Linear``s let every quantization path (RTN, GPTQ, the AutoGPTQ
format) treat an expert like any other layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit import kernels
from qwenkit.config import ModelConfig
from qwenkit.model.mlp import MLP

if TYPE_CHECKING:
    from qwenkit.model.adapter_bank import AdapterBank


class RouterLinear(nn.Module):
    """A bias-free linear map that quantizers leave in float: the router (``mlp.gate``) and the
    shared-expert gate. It is deliberately not an ``nn.Linear``, which every quantizer replaces: a
    small error in a router logit changes which experts run, not just how much."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        # The same bf16 weight in the CPU kernels' tiles, set by an inference load (``quant.dense``): torch's
        # product took 150 us for a Qwen3-30B-A3B router between the kernels' calls, a tenth of its layer.
        self.packed: kernels.PackedBf16 | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return kernels.linear_bf16(x, self.packed)
        return F.linear(x, self.weight)


class MoEMLP(nn.Module):
    """``mlp`` of a sparse layer: router, E routed experts, optional gated shared expert."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = RouterLinear(h, self.num_experts)
        self.experts = nn.ModuleList(
            MLP(config, config.moe_intermediate_size) for _ in range(self.num_experts)
        )
        self.shared_expert: MLP | None = None
        self.shared_expert_gate: RouterLinear | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config, config.shared_expert_intermediate_size)
            self.shared_expert_gate = RouterLinear(h, 1)
        # Tokens routed to each expert, accumulated while ``count_routed_tokens`` is active.
        self.routed_tokens: torch.Tensor | None = None
        # Every forward's router logits (N, E), appended while ``collect_router_logits`` is active (the
        # load-balancing loss of training reads them).
        self.router_logits: list[torch.Tensor] | None = None
        # The routed experts as one ``kernels.moe_experts`` call's arguments, set only by an inference load
        # on the fast CPU kernels (``quant.fused``): the same results as the loop over experts below.
        self.expert_weights: kernels.ExpertWeights | None = None
        # Served LoRA adapters of the routed experts (``served_adapters``): the model's bank, and the
        # slots whose adapter adapts some expert here. Each expert's side paths then see only the slots
        # of the tokens routed to it, and tokens of those slots take the loop over experts.
        self.adapters: AdapterBank | None = None
        self.expert_adapters: tuple[int, ...] = ()  # a tuple: the prepared-model cache stores no sets

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, h) -> (weights (N, K) in x's dtype, expert ids (N, K)), as transformers computes them."""
        logits = self.gate(x)  # (N, E)
        if self.router_logits is not None:
            self.router_logits.append(logits)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # (N, K)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, h)
        weights, ids = self.route(x2)
        out = self._dispatch(x2, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x2)) * self.shared_expert(x2)
        return out.view(shape)

    def _dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum of each token's experts: sort (token, expert) pairs by expert, one call per active expert."""
        bank = self.adapters
        adapted = bank is not None and bool(bank.used.intersection(self.expert_adapters))
        if (
            not adapted
            and self.expert_weights is not None
            and self.routed_tokens is None
            and x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)
        ):
            return kernels.moe_experts(x, ids, weights, self.expert_weights)
        n_tokens, k = ids.shape
        flat = ids.reshape(-1)  # (N*K,) expert of each (token, rank) pair
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, tokens ascending within
        counts = torch.bincount(flat, minlength=self.num_experts)  # (E,)
        if self.routed_tokens is not None:
            self.routed_tokens += counts.to(self.routed_tokens.device)
        xs = x.index_select(0, order // k)  # (N*K, h) each pair's token, grouped by expert
        ys = torch.empty_like(xs)
        # While training, an expert no token picked still runs, on zero rows: its parameters then get a zero
        # gradient instead of none, as one stacked expert tensor (transformers 5) would. Otherwise ranks of
        # DDP or FSDP would hold gradients for different experts and their reductions would not line up.
        every = self.training and torch.is_grad_enabled()
        if adapted:  # each pair's adapter slot, grouped as xs is (one more host sync per layer)
            slots = bank.slots.index_select(0, order // k)
            on_host = slots.tolist()
        start = 0
        for expert, n in enumerate(counts.tolist()):  # one host sync per layer, not per token
            if n or every:
                rows = slice(start, start + n)
                if adapted:
                    with bank.narrowed(slots[rows], frozenset(on_host[rows])):
                        ys[rows] = self.experts[expert](xs[rows])
                else:
                    ys[rows] = self.experts[expert](xs[rows])
                start += n
        ys = ys * weights.reshape(-1)[order, None]  # (N*K, h) weighted, as transformers weights them
        # Back to (token, rank) order with a gather (CPU scatter-add is slow in bfloat16), then add each
        # token's K outputs in rank order: a token's sum never depends on the other tokens in the step.
        pairs = ys.index_select(0, torch.argsort(order)).view(n_tokens, k, -1)  # (N, K, h)
        out = pairs[:, 0].float()
        for rank in range(1, k):
            out = out + pairs[:, rank]
        return out.to(x.dtype)


@dataclass
class RouterStats:
    """Tokens routed to each expert, per sparse layer, while ``count_routed_tokens`` was active."""

    per_layer: dict[int, list[int]] = field(default_factory=dict)

    @property
    def total(self) -> list[int]:
        """Per-expert token counts summed over layers."""
        sums = [0] * len(next(iter(self.per_layer.values()), []))
        for counts in self.per_layer.values():
            sums = [a + b for a, b in zip(sums, counts, strict=True)]
        return sums

    def table(self) -> str:
        """One line per sparse layer: tokens per expert, and the busiest/idlest share."""
        lines = []
        for layer, counts in self.per_layer.items():
            total = sum(counts) or 1
            busiest = max(range(len(counts)), key=counts.__getitem__)
            idle = sum(1 for c in counts if c == 0)
            lines.append(
                f"layer {layer:3d}: {sum(counts)} routings, busiest expert {busiest} "
                f"({100 * counts[busiest] / total:.1f}%), {idle} idle; counts {counts}"
            )
        return "\n".join(lines)


@contextmanager
def count_routed_tokens(model: nn.Module) -> Iterator[RouterStats]:
    """Count tokens per expert in every MoE layer of ``model`` for the duration of the block.

    The stats object is filled when the block exits. A dense model gives empty stats.
    """
    blocks = {int(name.split(".")[-2]): m for name, m in model.named_modules() if isinstance(m, MoEMLP)}
    stats = RouterStats()
    for block in blocks.values():
        # the router's parameters, not ``gate.weight``: an adapter on the router wraps it in a LoRA layer
        device = next(block.gate.parameters()).device
        block.routed_tokens = torch.zeros(block.num_experts, dtype=torch.int64, device=device)
    try:
        yield stats
    finally:
        for layer, block in sorted(blocks.items()):
            stats.per_layer[layer] = block.routed_tokens.tolist()
            block.routed_tokens = None


@contextmanager
def collect_router_logits(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The router logits (N, E) of every MoE layer's forwards inside the block, in call order (layer order
    within one forward). Empty for a dense model. Forwards recomputed after the block (gradient
    checkpointing's backward) add nothing."""
    blocks = [m for m in model.modules() if isinstance(m, MoEMLP)]
    logits: list[torch.Tensor] = []
    for block in blocks:
        block.router_logits = logits
    try:
        yield logits
    finally:
        for block in blocks:
            block.router_logits = None
