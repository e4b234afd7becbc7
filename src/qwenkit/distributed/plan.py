"""The sharding plan: which slice of each checkpoint tensor a tensor-parallel rank holds.

Column-parallel (split the output rows): q/k/v projections by whole heads, gate/up by FFN columns, the
embedding and the output head by vocabulary rows. Row-parallel (split the input columns): o_proj and
down_proj, whose partial outputs are summed by one all-reduce each (``parallel``). Norms are replicated.
A rank's model is the ordinary model built from ``local_config``: the network code does not change.

A mixture-of-experts layer splits each expert as a dense MLP (``EXPERT_PARENTS``: every routed expert's
and the shared expert's gate/up by their FFN columns, down by its inputs), keeps the router and the
shared expert's gate whole (every rank routes every token alike), and sums the block's output once.

A GPTQ checkpoint's packed tensors split the same way (``GPTQ_BUFFERS``): a column-parallel layer's
``qweight``, ``scales`` and ``qzeros`` by their output dimension (the last; ``qzeros`` packs the outputs
32 / bits to a word) with ``g_idx`` whole; a row-parallel layer's ``qweight`` by its packed input rows,
``scales`` and ``qzeros`` by whole groups, ``g_idx`` renumbered from the rank's first group. That needs
whole groups and whole packed words on every rank (``check_shardable`` says where they are not) and
groups in column order: act-order with dynamic groups is refused.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from qwenkit.config import ModelConfig
from qwenkit.distributed.group import TensorParallel
from qwenkit.errors import ConfigError

if TYPE_CHECKING:
    from qwenkit.quant.gptq_format import GPTQConfig

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
# Where a mixture-of-experts layer's expert MLPs live; their gate_proj/up_proj split as columns, their
# down_proj as rows (``split_role``), and ``parallel`` sums the whole block's output, not each expert's.
EXPERT_PARENTS = (".mlp.experts.", ".mlp.shared_expert.")
# Replicated like every norm, but applied to each of this rank's heads (Qwen3's q/k norm): a rank sees
# only its own heads, so training sums these weights' gradients over the tensor-parallel ranks.
PER_HEAD_MODULES = ("self_attn.q_norm", "self_attn.k_norm")

GPTQ_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")  # a GPTQ layer's packed checkpoint tensors


def split_role(module: str) -> str | None:
    """ "column" (split outputs), "row" (split inputs) or None (whole on every rank) for a module name."""
    if module.endswith(COLUMN_MODULES):
        return "column"
    if module.endswith(ROW_MODULES):
        return "row"
    if any(parent in module for parent in EXPERT_PARENTS):
        leaf = module.rpartition(".")[2]
        return {"gate_proj": "column", "up_proj": "column", "down_proj": "row"}.get(leaf)
    return None


def check_shardable(config: ModelConfig, world: int) -> None:
    """Refuse, naming the number, any split that is not whole heads, whole FFN columns and whole rows."""
    if world < 1:
        raise ConfigError(f"--tensor-parallel must be at least 1, got {world}")
    if world == 1:
        return
    if config.quantization and _gptq(config).act_order == "dynamic":
        raise ConfigError(
            "--tensor-parallel cannot split this GPTQ checkpoint: it was made with act-order and dynamic "
            "groups (desc_act without static_groups), so each rank's input columns would need every "
            "group's scales; use a checkpoint without desc_act, or run it in one process"
        )
    if config.quantization and _gptq(config).per_layer:
        raise ConfigError(
            "--tensor-parallel cannot split this GPTQ checkpoint: it keeps some layers float or quantizes "
            "them otherwise (modules_in_block_to_quantize or GPTQModel's dynamic); run it in one process"
        )
    heads = config.num_attention_heads
    if world > heads:
        raise ConfigError(
            f"--tensor-parallel {world} is more ranks than the model's {heads} attention heads; "
            f"this model splits over {_splits_that_work(config)}"
        )
    for what, n in _split_sizes(config):
        if n % world:
            raise ConfigError(
                f"--tensor-parallel {world} does not divide the model's {n} {what}; "
                f"this model splits over {_splits_that_work(config)}"
            )
    problem = _gptq_split_problem(config, world)
    if problem:
        raise ConfigError(f"{problem}; this checkpoint splits over {_splits_that_work(config)}")


def _gptq(config: ModelConfig) -> GPTQConfig:
    """The checkpoint's GPTQ fields, as the quantized layers read them."""
    from qwenkit.quant.gptq_format import GPTQConfig  # distributed/ reads quant's one parser, lazily

    return GPTQConfig.from_dict(config.quantization)


def _splits_that_work(config: ModelConfig) -> str:
    """ "1, 2, 4 ranks", or "1 rank only" (run it in one process)."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    fits = [str(d) for d in range(1, min(heads, kv) + 1) if _divides_all(config, d)]
    return "1 rank only" if fits == ["1"] else f"{', '.join(fits)} ranks"


def _split_sizes(config: ModelConfig) -> list[tuple[str, int]]:
    """What every rank takes an equal share of, by name."""
    sizes = [
        ("attention heads", config.num_attention_heads),
        ("key/value heads", config.num_key_value_heads),
        ("FFN width (intermediate_size)", config.intermediate_size),
        ("vocabulary rows", config.vocab_size),
    ]
    if config.num_experts:
        sizes.append(("experts' FFN width (moe_intermediate_size)", config.moe_intermediate_size))
    if config.shared_expert_intermediate_size:
        width = config.shared_expert_intermediate_size
        sizes.append(("shared expert's FFN width (shared_expert_intermediate_size)", width))
    return sizes


def _divides_all(config: ModelConfig, world: int) -> bool:
    divides = all(n % world == 0 for _, n in _split_sizes(config))
    return divides and _gptq_split_problem(config, world) is None


def _gptq_split_problem(config: ModelConfig, world: int) -> str | None:
    """Why a GPTQ checkpoint does not split over ``world`` ranks (None where it does): every rank needs
    whole groups of a row-parallel layer's inputs and whole packed words (``GPTQ_BUFFERS``)."""
    if not config.quantization or world == 1:
        return None
    gptq = _gptq(config)
    per_word = 32 // gptq.bits
    head_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    outputs = {"q_proj": head_width, "k_proj": kv_width, "gate_proj": config.intermediate_size}
    inputs = {"o_proj": head_width, "down_proj": config.intermediate_size}
    if config.num_experts:
        outputs["the experts' gate_proj"] = inputs["the experts' down_proj"] = config.moe_intermediate_size
    if config.shared_expert_intermediate_size:
        width = config.shared_expert_intermediate_size
        outputs["the shared expert's gate_proj"] = inputs["the shared expert's down_proj"] = width
    for layer, n in outputs.items():
        if n % world == 0 and (n // world) % per_word:
            return (
                f"--tensor-parallel {world} would give each rank {n // world} of {layer}'s {n} GPTQ "
                f"outputs, not whole words of {per_word}"
            )
    group = gptq.group_size
    for layer, k in inputs.items():
        local = k // world
        if k % world == 0 and ((group != -1 and local % group) or local % per_word):
            unit = f"groups of {group}" if group != -1 else f"words of {per_word}"
            return (
                f"--tensor-parallel {world} would cut the GPTQ {unit} of {layer}'s {k} inputs "
                f"({local} a rank)"
            )
    return None


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
        moe_intermediate_size=config.moe_intermediate_size // world,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size // world,
        vocab_size=config.vocab_size // world,
        head_dim=config.head_dim,
        rotary_dim=config.rotary_dim,
    )


def shard_tensor(name: str, tensor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's slice of a full checkpoint tensor (our parameter names), copied out of the file so
    the rank's memory holds only its own part once loading is done."""
    if tp.world == 1:
        return tensor
    module, _, leaf = name.rpartition(".")
    role = split_role(module)
    if role == "column" and leaf in GPTQ_BUFFERS:
        if leaf == "g_idx":  # the input columns, all on every rank
            return tensor.clone()
        return _slice(tensor, tensor.dim() - 1, tp).clone()  # the outputs: scales' and (packed) qzeros' last
    if role == "row" and leaf in GPTQ_BUFFERS:
        if leaf != "g_idx" and tensor.shape[0] == 1:  # one group a row (group_size -1): every rank keeps it
            return tensor.clone()
        part = _slice(tensor, 0, tp)  # qweight's packed input rows, whole groups of scales and qzeros
        return (part - part[0]).clone() if leaf == "g_idx" else part.clone()
    if role == "column" and leaf in ("weight", "bias"):
        return _slice(tensor, 0, tp).clone()
    if role == "row" and leaf == "weight":
        return _slice(tensor, 1, tp).clone()
    if role == "row" and leaf == "bias":  # added once: rank 0 keeps it, the others zeros
        return tensor.clone() if tp.rank == 0 else torch.zeros_like(tensor)
    # Copied too: one view kept into the memory-mapped file would keep every page this rank read mapped
    # (and counted in its resident memory) for as long as the model lives.
    return tensor.clone()


def shard_lora(
    module: str, lora_a: torch.Tensor, lora_b: torch.Tensor, tp: TensorParallel
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of a LoRA pair on ``module``: B's rows of a column-parallel layer (its outputs),
    A's columns of a row-parallel one (its inputs, whose partial update the layer's all-reduce sums with
    its output); the rank r of A and B is never split."""
    role = split_role(module) if tp.world > 1 else None
    if role == "column":
        return lora_a, _slice(lora_b, 0, tp).clone()
    if role == "row":
        return _slice(lora_a, 1, tp).clone(), lora_b
    return lora_a, lora_b


def shard_weight(module: str, weight: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's part of ``module``'s whole weight held elsewhere (peft's copy of the output head)."""
    return shard_tensor(f"{module}.weight", weight, tp)


def rank_range(n: int, tp: TensorParallel) -> tuple[int, int]:
    """[lo, hi) of ``n`` items that this rank holds: the ``tp.rank``-th of ``tp.world`` equal runs."""
    size = n // tp.world
    return tp.rank * size, (tp.rank + 1) * size


def _slice(tensor: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    size = tensor.shape[dim] // tp.world
    return tensor.narrow(dim, tp.rank * size, size)
