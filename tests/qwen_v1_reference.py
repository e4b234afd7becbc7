"""An independent Qwen v1 forward, written from modeling_qwen.py's equations (transformers has no v1 class).

It works on the original v1 tensor names (fused c_attn, w1/w2/c_proj), builds the RoPE cache the way
QWenModel does (outer product over positions, dynamic-NTK base from the prefill length), applies LogN as
a per-position query multiplier from the hard-coded table, and uses explicit softmax attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _ntk_alpha(true_len: int, seq_length: int) -> float:
    context_value = math.log(true_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def v1_logits(
    sd: dict[str, torch.Tensor],
    cfg: dict,
    ids: torch.Tensor,
    ntk_len: int | None = None,
    training: bool = False,
) -> torch.Tensor:
    """ids (T,) -> logits (T, V). ntk_len: the prefill length that fixed the NTK alpha (default T).
    training: the module in training mode, where modeling_qwen.py skips dynamic NTK (alpha 1) and LogN."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d = cfg["kv_channels"]
    rot = int(d * cfg["rotary_pct"])
    T = ids.shape[0]
    seq_length = cfg["seq_length"]
    eps = cfg["layer_norm_epsilon"]

    alpha = _ntk_alpha(ntk_len or T, seq_length) if cfg["use_dynamic_ntk"] and not training else 1.0
    base = cfg["rotary_emb_base"] * alpha ** (rot / (rot - 2))
    inv = 1.0 / (base ** (torch.arange(0, rot, 2).float() / rot))
    seq = torch.arange(max(2 * T, 16), dtype=inv.dtype)
    freqs = torch.outer(seq, inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:T, None, :], emb.sin()[:T, None, :]  # (T, 1, rot)

    logn = torch.tensor([math.log(i, seq_length) if i > seq_length else 1 for i in range(1, 32768)])

    def rope(t: torch.Tensor) -> torch.Tensor:  # (T, heads, d)
        t_, t_pass = t[..., :rot].float(), t[..., rot:]
        x1, x2 = t_.chunk(2, dim=-1)
        t_ = t_ * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((t_.type_as(t), t_pass), dim=-1)

    x = sd["transformer.wte.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        a = _rms(x, sd[p + "ln_1.weight"], eps)
        mixed = a @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = mixed.split(h, dim=-1)
        q, k, v = (t.view(T, heads, d) for t in (q, k, v))
        q, k = rope(q), rope(k)
        if cfg["use_logn_attn"] and seq_length < T and not training:
            q = q * logn[:T, None, None]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, h)
        x = x + out @ sd[p + "attn.c_proj.weight"].T
        m = _rms(x, sd[p + "ln_2.weight"], eps)
        a1 = m @ sd[p + "mlp.w1.weight"].T
        a2 = m @ sd[p + "mlp.w2.weight"].T
        x = x + (a1 * F.silu(a2)) @ sd[p + "mlp.c_proj.weight"].T
    return _rms(x, sd["transformer.ln_f.weight"], eps) @ sd["lm_head.weight"].T


def v1_greedy(sd: dict[str, torch.Tensor], cfg: dict, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding; the NTK alpha stays the one fixed at prefill, as QWenModel caches it."""
    ids = list(prompt)
    for _ in range(n):
        logits = v1_logits(sd, cfg, torch.tensor(ids), ntk_len=len(prompt))
        ids.append(int(logits[-1].argmax()))
    return ids[len(prompt) :]
