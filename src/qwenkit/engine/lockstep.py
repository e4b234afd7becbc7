"""Tensor-parallel serving: rank 0's engine decides every step; the other ranks run the same forwards.

Only rank 0 schedules, samples and answers clients, so requests may arrive at any time and in any
order. Before each forward it sends the forward (a ``ForwardCall``: token ids, positions and KV block
tables, plain lists) to the other ranks, which run it on their own shards and KV pools of the same
layout; the model's collectives then line up, one forward at a time. The calls travel on a gloo group
of their own without a practical timeout: a follower waiting for the next request is idle, not hung
(if rank 0 dies, its connections close and the followers fail at once). The model's own collectives
keep their short timeout.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from qwenkit.engine.engine import Engine
from qwenkit.engine.forward import ForwardCall, run_forward

IDLE_TIMEOUT = timedelta(days=365)


class Lockstep:
    """Every rank of the default group creates one together (a collective), then rank 0 ``lead``s and
    the others ``follow`` until rank 0 calls ``stop``."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def lead(self, engine: Engine) -> None:
        """Send every forward ``engine`` runs to the followers first (rank 0)."""
        engine.before_forward = self._send

    def stop(self) -> None:
        """Release the followers (rank 0, once the engine has stopped stepping)."""
        self._send(None)

    def follow(self, engine: Engine) -> None:
        """Run rank 0's forwards on this rank's shard and KV pool until rank 0 stops (ranks > 0)."""
        while (call := self._receive()) is not None:
            with torch.inference_mode():
                run_forward(engine.model, engine.cache, call)

    def _send(self, call: ForwardCall | None) -> None:
        dist.broadcast_object_list([call], src=0, group=self.group)

    def _receive(self) -> ForwardCall | None:
        box: list[ForwardCall | None] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
