"""A rank's place in a tensor-parallel group, and starting that group (gloo on CPU, NCCL on GPU).

Every collective has a timeout, so a rank that dies or never arrives turns into an error on the others
instead of a hang.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from qwenkit.errors import ConfigError, RankLostError

DEFAULT_TIMEOUT_S = 60.0

_on_rank_lost: Callable[[], None] | None = None


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank among ``world`` shards; ``group`` None means torch's default group.
    ``local_world``: how many of the ranks run on this machine, sharing its RAM (all of them when
    qwenkit starts them; torchrun's LOCAL_WORLD_SIZE), so a CPU load checks room for all of them."""

    rank: int
    world: int
    group: dist.ProcessGroup | None = None
    local_world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ConfigError(f"tensor-parallel rank {self.rank} is not in 0..{self.world - 1}")


def launched_world() -> int:
    """The WORLD_SIZE a launcher (torchrun, on one machine or across several) started this process in;
    1 when none did."""
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return 1
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_gpu(local_rank: int, world: int) -> int:
    """The GPU of this machine that rank ``local_rank`` runs on: its own, or a one-line error where the
    machine has too few (two ranks on one GPU are refused by NCCL, and none at all is not CUDA)."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    if local_rank >= count:
        raise ConfigError(
            f"--tensor-parallel {world} runs one rank a GPU, and this machine has {count} GPU(s); "
            f"use --tensor-parallel {count} or fewer, or more machines (torchrun)"
        )
    return local_rank


def init_tensor_parallel(
    world: int | None = None,
    rank: int | None = None,
    device: str = "cpu",
    init_method: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    local_world: int | None = None,
) -> TensorParallel:
    """Join (or start) the default process group. Without arguments it reads torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_WORLD_SIZE), so `torchrun --nproc-per-node N`
    and its rendezvous across machines work unchanged."""
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    if local_world is None:
        local_world = min(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), world)
    tp = TensorParallel(rank, world, local_world=local_world)
    if device.startswith("cuda"):
        # one GPU per rank on each machine: LOCAL_RANK under torchrun, the rank when qwenkit starts them
        import torch

        torch.cuda.set_device(local_gpu(int(os.environ.get("LOCAL_RANK", rank)), world))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
    return tp


def on_rank_lost(handler: Callable[[], None] | None) -> None:
    """Run ``handler()`` in this process when a collective fails, before RankLostError is raised: the
    launcher's ranks leave quietly there (it names the rank that died in one line), where gloo's error
    would otherwise reach the terminal as a traceback from whichever thread ran the forward."""
    global _on_rank_lost
    _on_rank_lost = handler


@contextmanager
def collective(what: str) -> Iterator[None]:
    """A collective named ``what``: its failure (a peer gone: gloo's RuntimeError) becomes RankLostError,
    after this process's ``on_rank_lost`` handler has run."""
    try:
        yield
    except RuntimeError as e:
        if _on_rank_lost is not None:
            _on_rank_lost()
        raise RankLostError(
            f"a tensor-parallel {what} failed: another rank died or stopped answering ({failure_reason(e)})"
        ) from None


def failure_reason(e: BaseException) -> str:
    """gloo's first line, without its source path and advice: "Read error [...]: Connection reset by peer"."""
    first = (str(e).splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because a peer died or stopped answering (gloo's transport
    error, NCCL's DistBackendError, a store or a network timeout), not a bug of this process."""
    if isinstance(e, RankLostError | dist.DistError):
        return True
    return isinstance(e, RuntimeError) and "gloo/transport/" in str(e)
