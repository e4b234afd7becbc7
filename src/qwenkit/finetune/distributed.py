"""torch.distributed for training: the process group from torchrun's environment, DDP or FSDP2 wrapping,
and FSDP2 x tensor parallelism on a 2-D ("dp", "tp") device mesh.

gloo on CPU, NCCL on CUDA. One process without torchrun's variables is a world of one and wraps nothing.
FSDP2 shards each decoder layer and then the root; the tied embedding and ``lm_head`` stay together in
the root group (sharding them apart is refused by FSDP). With ``tp`` > 1, ranks ``d*tp .. d*tp+tp-1``
hold one data-parallel replica split by the tensor-parallel plan (``tensor_parallel``) and see the same
batches; FSDP2 shards and averages over "dp" only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    tp: int = 1  # tensor-parallel ranks per data-parallel replica
    mesh: Any = None  # DeviceMesh ("dp", "tp") when tp > 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Which data-parallel replica this process belongs to: what picks its share of a batch."""
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.size // self.tp

    def all_reduce_sum(self, value: float) -> float:
        """Sum over data-parallel replicas (tensor-parallel ranks of one replica hold the same value)."""
        if self.dp_size == 1:
            return value
        return float(self.sum_over_replicas(torch.tensor([value], dtype=torch.float64)).item())

    def sum_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed element-wise over data-parallel replicas (a CPU tensor, in place)."""
        if self.dp_size > 1:
            dist.all_reduce(t, group=self.mesh["dp"].get_group() if self.mesh is not None else None)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_world(device: str, tp: int = 1) -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), if any; with ``tp`` > 1,
    lay the processes out as a (size / tp) x tp device mesh."""
    from qwenkit.finetune.tensor_parallel import check_processes

    size = int(os.environ.get("WORLD_SIZE", "1"))
    check_processes(size, tp)
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    mesh = None
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.split(":")[0], (size // tp, tp), mesh_dim_names=("dp", "tp"))
    return World(dist.get_rank(), dist.get_world_size(), local, tp, mesh)


def close_world(world: World, failing: bool = False) -> None:
    """A barrier first: tearing gloo down while a peer still has work in flight can abort the process.
    ``failing`` (an error or Ctrl-C is on its way out): a peer may be gone already, and the barrier's
    "connection closed by peer" must not replace the error with gloo's traceback."""
    if world.distributed and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:
            if not failing:
                raise
        dist.destroy_process_group()


def wrap(
    model: nn.Module, world: World, strategy: str, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """DDP or FSDP2 (x tensor parallel) around ``model``; nothing in one process. ``compute_dtype``: mixed
    precision over float32 masters (see ``trainer.mixed_precision``): FSDP2 gathers the shards in it and
    reduces gradients in float32, so the sharded gradients and AdamW stay float32."""
    if not world.distributed:
        return model
    shard: dict[str, Any] = {}
    if compute_dtype is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        shard["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if world.tp > 1:  # FSDP2 over "dp" of tensor-parallel DTensors on "tp"
        from torch.distributed.fsdp import fully_shard

        from qwenkit.finetune.tensor_parallel import parallelize_for_training

        # Gathering a 2-D sharded tensor whole (checkpoints, the grad norm) takes one collective per mesh
        # dimension; DTensor warns about that on every rank at every gather. It is expected here.
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        # The tensor-parallel model returns its logits as a view; FSDP2 warns on every rank at every step
        # that an in-place op on it would skip its pre-backward hook. The losses only read the logits.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        parallelize_for_training(model, world.mesh["tp"])
        for layer in model.model.layers:
            fully_shard(layer, mesh=world.mesh["dp"], **shard)
        fully_shard(model, mesh=world.mesh["dp"], **shard)
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, **shard)
        fully_shard(model, **shard)  # embeddings, final norm and (tied) lm_head in one root group
        return model
    raise ValueError(f"unknown strategy {strategy!r}")


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if sync:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 (DTensor) shard; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
