"""Tiny random Qwen MoE models in the exact Hugging Face layout (transformers' own classes)."""

from __future__ import annotations

from typing import Any

import torch
from factories import TINY

MOE_TINY = dict(
    TINY,  # the dense tiny shape, plus experts; intermediate_size is the dense layers' FFN
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    num_hidden_layers=3,
)

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Qwen1.5-MoE-like: shared expert, no renormalization, every layer sparse.
    "qwen2_moe": ("qwen2_moe", dict(shared_expert_intermediate_size=96)),
    # Dense and sparse layers mixed (mlp_only_layers and decoder_sparse_step), top-3 renormalized.
    "qwen2_moe-mixed": (
        "qwen2_moe",
        dict(
            shared_expert_intermediate_size=96,
            num_hidden_layers=4,
            mlp_only_layers=[0],
            decoder_sparse_step=2,  # sparse layers: 1 and 3 (layer 0 is listed dense anyway)
            num_experts_per_tok=3,
            norm_topk_prob=True,
        ),
    ),
    # Qwen3-MoE: no shared expert, q/k norm, renormalized top-k.
    "qwen3_moe": ("qwen3_moe", dict(head_dim=32, norm_topk_prob=True, num_experts_per_tok=4)),
    "qwen3_moe-top1-mixed": (
        "qwen3_moe",
        dict(head_dim=16, num_experts_per_tok=1, mlp_only_layers=[1], tie_word_embeddings=True),
    ),
}


def hf_moe_model(variant: str = "qwen2_moe", **overrides: Any):
    """A random transformers Qwen2Moe/Qwen3Moe model (float32) with every tensor distinctive."""
    import transformers

    family, extra = VARIANTS[variant]
    cfg = {**MOE_TINY, **extra, **overrides}
    if family == "qwen2_moe":
        config, cls = transformers.Qwen2MoeConfig(**cfg), transformers.Qwen2MoeForCausalLM
    else:
        config, cls = transformers.Qwen3MoeConfig(**cfg), transformers.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "mlp.gate" in name and "gate_proj" not in name and "gate_up" not in name:
                p.normal_(0, 0.5)  # transformers initializes the router to zero: make routing real
            elif "shared_expert_gate" in name:
                p.normal_(0, 0.3)
    return model
