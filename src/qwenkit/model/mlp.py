"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.config import ModelConfig


class MLP(nn.Module):
    """The dense FFN; also one routed or shared expert of a MoE layer (``intermediate_size`` given)."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        h, bias = config.hidden_size, config.mlp_bias
        f = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=bias)
        self.up_proj = nn.Linear(h, f, bias=bias)
        self.down_proj = nn.Linear(f, h, bias=bias)
        # x -> silu(gate(x)) * up(x) in one module (one product, one activation op), set only by an
        # inference load on the fast CPU kernels (``quant.fused``), which then removes gate_proj, up_proj.
        self.gate_up_silu: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_silu is not None:
            return self.down_proj(self.gate_up_silu(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
