"""The auxiliary load-balancing loss of mixture-of-experts training (Switch Transformer, eqs. 4-6), as
transformers adds it to Qwen MoE models' loss when ``output_router_logits`` is on.

Over the real tokens of every sparse layer of a forward, pooled: f_e is the number of top-k picks that go
to expert e divided by the token rows (so f sums to k), P_e the mean router probability of expert e, and
the loss is E * sum_e f_e * P_e. Only P carries a gradient (into the routers). Its minimum, k, is reached
when picks and probability spread evenly over the experts; a router that sends everything to a few
experts pays up to E times that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], top_k: int, real: torch.Tensor | None = None
) -> torch.Tensor:
    """router_logits: each (N, E), one per sparse layer (N = batch rows x positions, flattened);
    ``real`` (B, T) with B x T = N: 1 for a real token, 0 for padding (left out of both averages)."""
    n_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    weight = None if real is None else real.reshape(-1).to(device=device, dtype=torch.float32)
    picks = torch.zeros(n_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(n_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        p = F.softmax(logits.float(), dim=-1)  # (N, E)
        chosen = torch.topk(p, top_k, dim=-1).indices.reshape(-1)  # (N*K,)
        w = torch.ones(p.shape[0], device=device) if weight is None else weight
        picks = picks.index_add(0, chosen, w.repeat_interleave(top_k))
        probs = probs + (p * w[:, None]).sum(dim=0)
        rows = rows + w.sum()
    return n_experts * torch.sum((picks / rows) * (probs / rows))
