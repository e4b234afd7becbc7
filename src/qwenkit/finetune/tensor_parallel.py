"""Tensor parallelism for training: inference's sharding plan (``distributed.plan``) laid out as DTensors
on the "tp" dimension of a 2-D ("dp", "tp") device mesh; FSDP2 then shards over "dp" (``distributed``).

The plan's column-parallel modules split their output rows (``ColwiseParallel``), the row-parallel ones
their input columns (``RowwiseParallel``, one all-reduce of the output); the embedding holds vocabulary
rows and the output head's logits are gathered, so the loss sees whole (.., V) logits. Each rank's q/k/v
carry only its own whole heads; attention takes its head count from them, so the network code is shared.

LoRA on a column-parallel layer: A (r, in) replicated, B (out, r) split by output rows like the base, so
the update is split exactly as the base output is. On a row-parallel layer: A split by input columns like
the base (its partial (.., r) outputs are summed by one all-reduce), B replicated.

Qwen3's q/k norms are replicated but see only a rank's own heads: their weights become replicated DTensors
over inputs split by heads, so autograd sums their gradients over the tensor-parallel ranks.

Mixture-of-experts layers split their experts the same way but compute them on local shards, summed
once a block (``tensor_parallel_moe``); the router stays whole, so every rank routes alike.
"""

from __future__ import annotations

from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.distributed.plan import EXPERT_PARENTS, PER_HEAD_MODULES, check_shardable, split_role
from qwenkit.errors import ConfigError
from qwenkit.finetune.lora import LoRALinear
from qwenkit.finetune.tensor_parallel_moe import parallelize_experts


def check_processes(processes: int, tp: int) -> None:
    """Refuse a tensor-parallel size the processes cannot be laid out in (before any collective)."""
    if tp < 1:
        raise ConfigError(f"--tensor-parallel must be at least 1, got {tp}")
    if processes % tp:
        raise ConfigError(
            f"--tensor-parallel {tp} does not divide the {processes} process(es); use a process count "
            f"that is a multiple of {tp} (data-parallel replicas x {tp})"
        )


def check_model(config: ModelConfig, tp: int, method: str) -> None:
    """Refuse, with the numbers, a split inference's plan refuses (heads, FFN, vocabulary, experts)."""
    if tp == 1:
        return
    if method == "qlora":
        raise ConfigError(
            "--tensor-parallel does not split QLoRA's quantized base; use --method lora or full with it"
        )
    check_shardable(config, tp)


def module_styles(model: nn.Module) -> dict[str, object]:
    """The plan as ``parallelize_module`` takes it: module name -> ParallelStyle."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    styles: dict[str, object] = {}
    for name, module in model.named_modules():
        role = split_role(name)
        if any(parent in name for parent in EXPERT_PARENTS):
            continue  # experts compute on their local shards, summed once a block (tensor_parallel_moe)
        if role == "column":
            if isinstance(module, nn.Embedding):  # vocabulary rows: torch calls that Rowwise for an Embedding
                styles[name] = RowwiseParallel(input_layouts=Replicate())
            elif isinstance(module, LoRALinear):
                styles[f"{name}.base_layer"] = ColwiseParallel()
                styles[f"{name}.lora_B"] = ColwiseParallel()
            elif name.endswith("lm_head"):
                styles[name] = ColwiseParallel(output_layouts=Replicate())  # whole logits for the loss
            else:
                styles[name] = ColwiseParallel()
        elif role == "row":
            if isinstance(module, LoRALinear):
                styles[f"{name}.base_layer"] = RowwiseParallel()
                styles[f"{name}.lora_A"] = RowwiseParallel()
            else:
                styles[name] = RowwiseParallel()
        elif name.endswith(PER_HEAD_MODULES):
            # replicated weight over (B, T, heads, D) split by heads: torch's style for "replicated
            # parameters, input split along one dimension" is SequenceParallel, here along the heads
            styles[name] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return styles


def parallelize_for_training(model: nn.Module, tp_mesh) -> nn.Module:
    """Turn the plan's weights into DTensors on ``tp_mesh`` (each rank keeps its slice) and the per-head
    norms into replicated DTensors; the other norms stay plain tensors (their inputs are whole)."""
    from torch.distributed.tensor.parallel import parallelize_module

    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and name.endswith("lm_head"):
            raise ConfigError(
                "--tensor-parallel cannot split a LoRA adapter on lm_head; leave it out of --target-modules"
            )
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    trainable = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    parallelize_module(model, tp_mesh, module_styles(model))
    parallelize_experts(model, tp_mesh)
    # The styles register new Parameters (SequenceParallel's replicated q/k norms among them), which are
    # trainable by default: a LoRA run would then train the frozen norms too, and save none of it.
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(trainable[name])
    if tied:  # both were split into the same vocabulary rows; keep them one parameter
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
