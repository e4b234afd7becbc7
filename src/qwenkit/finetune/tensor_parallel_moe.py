"""Tensor-parallel training of mixture-of-experts layers: every expert on its local shards, one sum a block.

Each routed expert and the shared expert split as a dense MLP (gate/up by output rows, down by input
columns), but unlike the dense layers (``tensor_parallel``) an expert is not wrapped in DTensor styles:
with them every expert paid its own all-reduces (forward and backward) and DTensor's dispatch on every
op, 14x one process's step time for a 32-expert model. Here the weights are DTensors only as stored
(FSDP2 shards them, checkpoints gather them); an expert computes with their local shards, so its down
projection leaves a partial sum, and the block (Megatron's pattern) sums once:

* the block's output: summed over the ranks in the forward (its gradient is whole, passed as is);
* the tokens going into the experts, the routing weights and the shared-expert gate: passed as they are
  in the forward, their gradients summed in the backward (the experts' partial sums make each rank's
  share of those gradients partial).

A LoRA pair on an expert splits as on a dense layer (B by rows on gate/up, A by columns on down); the
replicated factor's gradient (A on gate/up, B on down) is then a partial sum too, and all of them are summed
in one collective after the backward (:func:`sum_partial_grads`).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qwenkit.errors import ConfigError
from qwenkit.finetune.lora import LoRALinear
from qwenkit.model.moe import MoEMLP

_SPLIT_DIM = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}  # weight dimension each projection splits on
PARTIAL_GRADS = "tp_partial_grad_names"  # model attribute: parameters whose gradients are partial sums


class _CopyToRanks(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the tensor-parallel group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverRanks(torch.autograd.Function):
    """The forward sums over the tensor-parallel group; the gradient of the sum passes unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def parallelize_experts(model: nn.Module, tp_mesh) -> None:
    """Split every MoE block's experts over ``tp_mesh`` and install the block's sums (see the module)."""
    group = tp_mesh.get_group()
    partial: list[str] = []
    for block_name, block in model.named_modules():
        if not isinstance(block, MoEMLP):
            continue
        mlps = {f"experts.{e}": mlp for e, mlp in enumerate(block.experts)}
        if block.shared_expert is not None:
            mlps["shared_expert"] = block.shared_expert
        for mlp_name, mlp in mlps.items():
            for proj, dim in _SPLIT_DIM.items():
                layer = getattr(mlp, proj)
                prefix = f"{block_name}.{mlp_name}.{proj}"
                if isinstance(layer, LoRALinear):
                    _shard(layer.base_layer, dim, tp_mesh)
                    _shard(layer.lora_B if dim == 0 else layer.lora_A, dim, tp_mesh)
                    partial.append(f"{prefix}.{'lora_A' if dim == 0 else 'lora_B'}.weight")
                else:
                    _shard(layer, dim, tp_mesh)
        _sum_once(block, group)
    setattr(model, PARTIAL_GRADS, partial)


def _shard(linear: nn.Module, dim: int, mesh) -> None:
    """This rank's run of ``linear``'s weight along ``dim`` (and its bias's, split with the outputs) as a
    DTensor; the layer computes with the local run. Every rank holds the same whole weights already."""
    from torch.distributed.tensor import DTensor, Shard

    if dim == 1 and getattr(linear, "bias", None) is not None:
        raise ConfigError(
            "--tensor-parallel cannot split an expert's down projection with a bias (no Qwen MoE has one)"
        )
    rank, world = mesh.get_local_rank(), mesh.size()
    for name, p in list(linear.named_parameters(recurse=False)):
        local = p.detach().chunk(world, dim=dim if name == "weight" else 0)[rank].contiguous()
        shard = DTensor.from_local(local, mesh, [Shard(dim if name == "weight" else 0)], run_check=False)
        linear.register_parameter(name, nn.Parameter(shard, requires_grad=p.requires_grad))
    linear.forward = types.MethodType(_local_forward, linear)


def _local_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, _local(self.weight), _local(self.bias))


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _sum_once(block: MoEMLP, group) -> None:
    dispatch = block._dispatch

    def dispatch_over_ranks(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return dispatch(_CopyToRanks.apply(x, group), _CopyToRanks.apply(weights, group), ids)

    block._dispatch = dispatch_over_ranks
    if block.shared_expert is not None:
        block.shared_expert.register_forward_pre_hook(lambda m, args: (_CopyToRanks.apply(args[0], group),))
        block.shared_expert_gate.register_forward_hook(lambda m, args, out: _CopyToRanks.apply(out, group))
    block.register_forward_hook(lambda m, args, out: _SumOverRanks.apply(out, group))


def sum_partial_grads(model: nn.Module, tp_group) -> None:
    """Sum over the tensor-parallel ranks, in one collective, the gradients :func:`parallelize_experts`
    left as partial sums (this rank's shards of them, after FSDP's reduction over the replicas)."""
    names = set(getattr(model, PARTIAL_GRADS, ()))
    grads = [_local(p.grad) for n, p in model.named_parameters() if n in names and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
