"""Agreement checks every rank runs before loading: all ranks must hold the same checkpoint, or their
slices would not add up to one model (and the error must say so on every rank, not hang one of them)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

import torch.distributed as dist

from qwenkit.distributed.group import TensorParallel
from qwenkit.errors import CheckpointError


class Checkpoint(Protocol):
    hf_config: dict[str, Any]

    @property
    def total_bytes(self) -> int: ...


def fingerprint(source: Checkpoint) -> str:
    """config.json and the weights' total size: cheap, and different for any two different models."""
    config = json.dumps(source.hf_config, sort_keys=True, default=str)
    return hashlib.sha256(f"{config}|{source.total_bytes}".encode()).hexdigest()[:16]


def check_same_checkpoint(source: Checkpoint, tp: TensorParallel) -> None:
    prints: list[str | None] = [None] * tp.world
    dist.all_gather_object(prints, fingerprint(source), group=tp.group)
    differ = [rank for rank, p in enumerate(prints) if p != prints[0]]
    if differ:
        raise CheckpointError(
            f"tensor-parallel ranks {', '.join(map(str, differ))} have a different checkpoint from rank 0 "
            "(config.json or weight files differ); every rank must load the same model files"
        )
