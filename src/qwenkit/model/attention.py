"""Multi-head attention with grouped-query heads, optional qkv bias, Qwen3 q/k norm, RoPE and LogN.

Notation:
    B  batch rows            T  new tokens this step        S  keys visible (cached + new)
    H  query heads           Hkv key/value heads            D  head_dim

The attention never sees how the KV cache is stored: it hands this step's q/k/v to ``cache.attend``,
which stores k/v and attends over everything each query may see. Without a cache it is plain causal
attention, or, given a mask (packed training rows), attention limited to what the mask allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.model.norm import RMSNorm
from qwenkit.model.rope import apply_rope, apply_rope_


@dataclass(frozen=True)
class DecodePools:
    """What a decode step's ``kernels.decode_layers`` calls need from the cache. The pool lists are the
    cache's own, the same objects every step (the library holds runs made from them)."""

    k: list[torch.Tensor]  # per layer index: (slots, Hkv, D), the step's K written at ``slots``
    v: list[torch.Tensor]
    slots: torch.Tensor  # (rows,) where each row's new K/V goes
    gather: torch.Tensor  # (rows, S) slot of every key each row sees
    positions: torch.Tensor  # (rows,) each row's position: it sees keys 0..position


class KVCache(Protocol):
    """What attention needs from a KV cache; the engine owns the storage (and its layout) behind it."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's k, v (B, Hkv, T, D); return attention of q (B, H, T, D) over every key each
        query may see (cached and new, causal): (B, H, T, D)."""
        ...

    def decode_pools(self) -> DecodePools | None:
        """The pools and the step's tensors when this step can run whole layers inside
        ``kernels.decode_layers`` calls (the engine's paged cache, every row decoding one token on the CPU
        kernels), else None."""
        ...


@dataclass
class AttentionInputs:
    """Per-step tensors shared by every layer: computed once, not per layer."""

    cos: torch.Tensor  # (B, 1, T, rotary_dim): float32, or the activation dtype where RoPE runs in it
    sin: torch.Tensor
    logn: torch.Tensor | None  # (B, 1, T, 1) query scale for Qwen v1 LogN, or None
    cache: KVCache | None
    # (B, 1, T, T) bool, True where a query may see a key; None means plain causal. Only without a cache.
    mask: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=config.o_bias)
        # q, k and v as one product (heads side by side), set only by an inference load on the fast CPU
        # kernels (``quant.fused``), which then removes q_proj, k_proj and v_proj.
        self.qkv_proj: nn.Module | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rope_in_fp32 = config.family == "qwen"

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, D)
            q, k, v = qkv.split((H, Hkv, Hkv), dim=2)
        else:
            # Head counts come from the projections' outputs, not the config: under training's tensor
            # parallelism (DTensor) a rank's q/k/v carry only its own whole heads.
            q = self.q_proj(x).view(B, T, -1, D)
            k = self.k_proj(x).view(B, T, -1, D)
            v = self.v_proj(x).view(B, T, -1, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.transpose(1, 2)  # (B, heads, T, D)
        if self.qkv_proj is not None and self.q_norm is None:
            # q and k sit side by side: rotate them in one pass (RoPE acts on each head alone), in place
            qk = apply_rope_(qkv[:, :, : H + Hkv], inputs.cos, inputs.sin, self.rope_in_fp32)
            q, k = qk.transpose(1, 2).split((H, Hkv), dim=1)
        else:
            q = apply_rope(q.transpose(1, 2), inputs.cos, inputs.sin, self.rope_in_fp32)
            k = apply_rope(k.transpose(1, 2), inputs.cos, inputs.sin, self.rope_in_fp32)
        if inputs.logn is not None:
            q = q * inputs.logn.to(q.dtype)

        if inputs.mask is not None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=inputs.mask, enable_gqa=self.n_kv != self.n_heads
            )
        elif inputs.cache is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=T > 1, enable_gqa=self.n_kv != self.n_heads
            )
        else:
            out = inputs.cache.attend(self.layer_idx, q, k, v)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.o_proj(out)
