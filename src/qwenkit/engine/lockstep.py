"""Tensor-parallel serving: rank 0's engine decides every step; the other ranks run the same forwards.

Only rank 0 schedules, samples and answers clients, so requests may arrive at any time and in any
order. Before each forward it sends the forward (a ``ForwardCall``: token ids, positions and KV block
tables, plain lists) to the other ranks, which run it on their own shards and KV pools of the same
layout; the model's collectives then line up, one forward at a time. An adapter loaded while serving
(into slots held from the start) goes the same way between two forwards (``AdapterWrite``), in the slot
rank 0 chose. The calls travel on a gloo group
of their own without a practical timeout: a follower waiting for the next request is idle, not hung
(if rank 0 dies, its connections close and the followers fail at once). The model's own collectives
keep their short timeout.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from qwenkit.checkpoint.loader import shard_adapter
from qwenkit.distributed import TensorParallel
from qwenkit.distributed.group import collective
from qwenkit.engine.engine import Engine
from qwenkit.engine.forward import AdapterWrite, ForwardCall, run_forward
from qwenkit.model.served_adapters import write_slot

IDLE_TIMEOUT = timedelta(days=365)


class Lockstep:
    """Every rank of the default group creates one together (a collective), then rank 0 ``lead``s and
    the others ``follow`` until rank 0 calls ``stop``."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def lead(self, engine: Engine) -> None:
        """Send every forward ``engine`` runs, and every adapter it writes between steps, to the
        followers first (rank 0)."""
        engine.before_forward = self._send
        engine.adapter_written = self._send

    def stop(self) -> None:
        """Release the followers (rank 0, once the engine has stopped stepping)."""
        self._send(None)

    def follow(self, engine: Engine, tp: TensorParallel) -> None:
        """Run rank 0's forwards on this rank's shard and KV pool, and write the adapters it loads
        into this rank's slots (their slices), until rank 0 stops (ranks > 0)."""
        while (message := self._receive()) is not None:
            if isinstance(message, AdapterWrite):
                write_slot(engine.model, message.slot, message.name, shard_adapter(message.pairs, tp))
                continue
            with torch.inference_mode():
                run_forward(engine.model, engine.cache, message)

    def _send(self, message: ForwardCall | AdapterWrite | None) -> None:
        with collective("broadcast of rank 0's forward"):
            dist.broadcast_object_list([message], src=0, group=self.group)

    def _receive(self) -> ForwardCall | AdapterWrite | None:
        box: list[ForwardCall | AdapterWrite | None] = [None]
        with collective("broadcast of rank 0's forward"):
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
