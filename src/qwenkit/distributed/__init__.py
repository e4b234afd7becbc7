"""Tensor parallelism on torch.distributed: which slice of each weight a rank holds (``plan``), the
collectives that make the slices compute the whole model (``parallel``), and process groups (``group``)."""

from qwenkit.distributed.group import TensorParallel, init_tensor_parallel, launched_world
from qwenkit.distributed.parallel import parallelize
from qwenkit.distributed.plan import check_shardable, local_config, shard_tensor

__all__ = [
    "TensorParallel",
    "check_shardable",
    "init_tensor_parallel",
    "launched_world",
    "local_config",
    "parallelize",
    "shard_tensor",
]
