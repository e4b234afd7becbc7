"""The sharding plan: which slice of each checkpoint tensor a tensor-parallel rank holds.

Column-parallel (split the output rows): q/k/v projections by whole heads, gate/up by FFN columns, the
embedding and the output head by vocabulary rows. Row-parallel (split the input columns): o_proj and
down_proj, whose partial outputs are summed by one all-reduce each (``parallel``). Norms are replicated.
A rank's model is the ordinary model built from ``local_config``: the network code does not change.
"""

from __future__ import annotations

import dataclasses

import torch

from qwenkit.config import ModelConfig
from qwenkit.distributed.group import TensorParallel
from qwenkit.errors import ConfigError

# The plan itself, by module (suffixes of our module names); inference slices checkpoint tensors by it
# (``shard_tensor``, ``parallel``) and training lays DTensors out by it (``finetune.tensor_parallel``).
COLUMN_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "embed_tokens",  # vocabulary rows
    "lm_head",  # vocabulary rows
)
ROW_MODULES = ("self_attn.o_proj", "mlp.down_proj")
# Replicated like every norm, but applied to each of this rank's heads (Qwen3's q/k norm): a rank sees
# only its own heads, so training sums these weights' gradients over the tensor-parallel ranks.
PER_HEAD_MODULES = ("self_attn.q_norm", "self_attn.k_norm")

COLUMN = tuple(f"{m}.{t}" for m in COLUMN_MODULES for t in ("weight", "bias"))
ROW = tuple(f"{m}.weight" for m in ROW_MODULES)
ROW_BIAS = tuple(f"{m}.bias" for m in ROW_MODULES)  # added once: rank 0 keeps it, others zero


def check_shardable(config: ModelConfig, world: int) -> None:
    """Refuse, naming the number, any split that is not whole heads, whole FFN columns and whole rows."""
    if world < 1:
        raise ConfigError(f"--tensor-parallel must be at least 1, got {world}")
    if world == 1:
        return
    if config.quantization:
        raise ConfigError(
            "--tensor-parallel does not shard pre-quantized (GPTQ) checkpoints yet; load the float "
            "checkpoint instead"
        )
    if config.num_experts:
        raise ConfigError(
            "--tensor-parallel does not split mixture-of-experts layers yet; run this model without it"
        )
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if world > heads:
        raise ConfigError(
            f"--tensor-parallel {world} is more ranks than the model's {heads} attention heads; "
            f"use at most {heads}"
        )
    for what, n in (
        ("attention heads", heads),
        ("key/value heads", kv),
        ("FFN width (intermediate_size)", config.intermediate_size),
        ("vocabulary rows", config.vocab_size),
    ):
        if n % world:
            fits = [d for d in range(1, min(heads, kv) + 1) if _divides_all(config, d)]
            raise ConfigError(
                f"--tensor-parallel {world} does not divide the model's {n} {what}; "
                f"this model splits over {', '.join(map(str, fits))} ranks"
            )


def _divides_all(config: ModelConfig, world: int) -> bool:
    sizes = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    return all(n % world == 0 for n in (*sizes, config.vocab_size))


def local_config(config: ModelConfig, world: int) -> ModelConfig:
    """The config of one rank's shard: 1/world of the heads, FFN columns and vocabulary rows."""
    check_shardable(config, world)
    if world == 1:
        return config
    return dataclasses.replace(
        config,
        num_attention_heads=config.num_attention_heads // world,
        num_key_value_heads=config.num_key_value_heads // world,
        intermediate_size=config.intermediate_size // world,
        vocab_size=config.vocab_size // world,
        head_dim=config.head_dim,
        rotary_dim=config.rotary_dim,
    )


def shard_tensor(name: str, tensor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's slice of a full checkpoint tensor (our parameter names), copied out of the file so
    the rank's memory holds only its own part once loading is done."""
    if tp.world == 1:
        return tensor
    if name.endswith(COLUMN):
        return _slice(tensor, 0, tp).clone()
    if name.endswith(ROW):
        return _slice(tensor, 1, tp).clone()
    if name.endswith(ROW_BIAS):
        return tensor.clone() if tp.rank == 0 else torch.zeros_like(tensor)
    # Copied too: one view kept into the memory-mapped file would keep every page this rank read mapped
    # (and counted in its resident memory) for as long as the model lives.
    return tensor.clone()


def _slice(tensor: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    size = tensor.shape[dim] // tp.world
    return tensor.narrow(dim, tp.rank * size, size)
