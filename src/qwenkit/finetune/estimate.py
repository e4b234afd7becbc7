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
    trainable_state: int  # float32 master copy (LoRA) + gradients + Adam moments
    activations: int
    activations_checkpointed: int
    checkpointing: bool

    @property
    def total(self) -> int:
        act = self.activations_checkpointed if self.checkpointing else self.activations
        return self.weights + self.trainable_state + act

    def table(self) -> str:
        rows = [
            ("weights", self.weights),
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
) -> TrainingMemory:
    b = dtype_bytes(dtype)
    weights = weight_bytes(config, dtype, f"int{quant_bits}" if quant_bits else None)
    # full: grads in the model dtype + two float32 Adam moments (the weights are counted above);
    # LoRA: the float32 adapter, its grads, two Adam moments
    state = trainable * (b + 8) if method == "full" else trainable * (4 + 4 + 8)
    h, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_token_layer = (4 * h + 2 * q + 2 * kv + 2 * q + 5 * f) * b  # saved tensors per token and layer
    tokens = batch * seq_len
    logits = tokens * config.vocab_size * 4 * 3  # float32 logits, log-softmax, their gradient
    activations = tokens * per_token_layer * L + logits
    checkpointed = tokens * (h * b * L + per_token_layer) + logits
    return TrainingMemory(weights, trainable, state, activations, checkpointed, checkpointing)


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
