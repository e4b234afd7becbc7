"""Training memory before training starts: weights, adapter, gradients, optimizer, activations.

Activations are a per-token estimate for this network (what autograd keeps per decoder layer: norms,
q/k/v, attention output, the SwiGLU intermediates) plus the logits' cross entropy, so the number is a
planning figure, not a promise; it errs high. With gradient checkpointing a layer keeps only its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenkit.config import ModelConfig
from qwenkit.errors import OutOfMemoryError
from qwenkit.memory import GiB, dtype_bytes, free_bytes, weight_bytes


@dataclass
class TrainingMemory:
    weights: int
    trainable: int  # trainable parameters (count)
    trainable_state: int  # float32 adapter (LoRA) or half copy (mixed precision) + gradients + Adam moments
    activations: int
    activations_checkpointed: int
    checkpointing: bool
    masters: bool = False  # full mixed precision: the weights are float32 masters

    @property
    def total(self) -> int:
        act = self.activations_checkpointed if self.checkpointing else self.activations
        return self.weights + self.trainable_state + act

    def table(self) -> str:
        rows = [
            ("weights (float32 masters)" if self.masters else "weights", self.weights),
            (f"trainable state ({self.trainable:,} params: weights, grads, AdamW)", self.trainable_state),
            ("activations", self.activations),
            ("activations with --gradient-checkpointing", self.activations_checkpointed),
            ("total (as configured)", self.total),
        ]
        return "\n".join(f"  {name:<58} {n / GiB:8.2f} GiB" for name, n in rows)


def estimate(
    config: ModelConfig,
    dtype: torch.dtype,
    method: str,
    trainable: int,
    batch: int,
    seq_len: int,
    checkpointing: bool,
    quant_bits: int | None = None,
    masters: bool = False,
) -> TrainingMemory:
    """``dtype``: what the model computes in; ``masters``: full training keeps float32 master weights and
    computes in ``dtype`` (mixed precision, ``trainer.mixed_precision``)."""
    b = dtype_bytes(dtype)
    weights = weight_bytes(
        config, torch.float32 if masters else dtype, f"int{quant_bits}" if quant_bits else None
    )
    if method != "full":  # the float32 adapter, its grads, two Adam moments
        state = trainable * (4 + 4 + 8)
    elif masters:  # float32 grads and moments, and the half copy of the weights the forward computes with
        state = trainable * (4 + 8 + b)
    else:  # grads in the model dtype + two float32 Adam moments (the weights are counted above)
        state = trainable * (b + 8)
    h, L = config.hidden_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attention = 4 * h + 2 * q + 2 * kv + 2 * q  # saved values per token and layer, before the FFN
    per_layer = [(attention + _ffn_saved(config, i)) * b for i in range(L)]  # bytes per token
    tokens = batch * seq_len
    logits = tokens * config.vocab_size * 4 * 3  # float32 logits, log-softmax, their gradient
    activations = tokens * sum(per_layer) + logits
    checkpointed = tokens * (h * b * L + max(per_layer)) + logits
    return TrainingMemory(weights, trainable, state, activations, checkpointed, checkpointing, masters)


def _ffn_saved(config: ModelConfig, layer: int) -> int:
    """Values a token's FFN keeps for the backward: a SwiGLU's 5 of its width (gate, up, their SiLU and
    product, down's input); a MoE layer's for each of its k experts and the shared one, plus the router's
    logits and probabilities and the k copies of the token going into and coming out of the experts."""
    if not config.is_sparse_layer(layer):
        return 5 * config.intermediate_size
    k = config.num_experts_per_tok
    width = k * config.moe_intermediate_size + config.shared_expert_intermediate_size
    return 5 * width + 2 * config.num_experts + 3 * k * config.hidden_size


def check_training_fits(mem: TrainingMemory, device: str, free: int | None = None) -> None:
    have = free_bytes(device) if free is None else free
    if mem.total <= have:
        return
    hint = "lower --batch-size or --max-len"
    if not mem.checkpointing and mem.activations_checkpointed + mem.weights + mem.trainable_state <= have:
        hint = "add --gradient-checkpointing"
    raise OutOfMemoryError(
        f"training needs about {mem.total / GiB:.2f} GiB (weights {mem.weights / GiB:.2f}, trainable state "
        f"{mem.trainable_state / GiB:.2f}, activations "
        f"{(mem.activations_checkpointed if mem.checkpointing else mem.activations) / GiB:.2f}) but only "
        f"{have / GiB:.2f} GiB is free; {hint}, or use --method lora/qlora"
    )
